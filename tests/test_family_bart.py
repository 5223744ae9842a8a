"""BART (encoder-decoder with learned positions) against independent references.

* Prompt Tuning: the model fed ``inputs_embeds`` with the prompt spliced in by
  hand (after BART's embedding scale), the mask extended, decoder inputs and
  labels left alone;
* Prefix Tuning on encoder self-, decoder self- and cross-attention: a
  hand-written encoder, then BART's decoder given a hand-filled
  ``EncoderDecoderCache`` (``shift_positions=True``) or a hand-written decoder
  (``shift_positions=False``), see ``prefix_oracle.py``;
* greedy ``generate`` against greedy decoding of those references.

Batches are right-padded (BART numbers encoder positions from the sequence
length, so right padding is its convention).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import transformers as tf
from torch import nn

import prompthooks as ph
from prompthooks.locators.bart import BartLocator
from prompthooks.methods.prompt_tuning import PromptTable
from tests.support.builders import BART_EOS as EOS
from tests.support.builders import BART_HEADS as HEADS
from tests.support.builders import BART_START as START
from tests.support.builders import prefix_of as _prefix
from tests.support.builders import prefix_table, tiny_bart
from tests.support.models import CACHE_ARG, batch, decoder_ids, same_snapshot, snapshot
from tests.support.oracle import bart_prompt_oracle as _prompt_oracle
from tests.support.prefix_oracle import (
    bart_decoder_by_hand,
    bart_decoder_with_cache,
    bart_encoder,
    bart_logits,
    site_kv,
)

ATTN = ("eager", "sdpa")
P = 3


def _table(model: nn.Module, n: int = P, seed: int = 7) -> torch.Tensor:
    return prefix_table(model, n, seed)


def _padded() -> tuple[torch.Tensor, torch.Tensor]:
    return batch("t5", [7, 3, 5], seed=4)  # right padding, ids 3..60, pads 0


def _prompt(n: int = P, seed: int = 5) -> PromptTable:
    # Several times the scale of the (scaled) token embeddings, far from any init.
    return PromptTable(3.0 * torch.randn(n, 32, generator=torch.Generator().manual_seed(seed)))


def _shift_right(labels: torch.Tensor) -> torch.Tensor:
    """BART's decoder inputs for ``labels``, written out."""
    rows = [[START] + [t if t != -100 else 0 for t in row[:-1]] for row in labels.tolist()]
    return torch.tensor(rows)


# -- sites ------------------------------------------------------------------------


@pytest.mark.workflow  # no prompthooks kernel runs here
@pytest.mark.parametrize("head", list(HEADS))
def test_sites(head: str) -> None:
    model = tiny_bart(head=head)
    before = snapshot(model)
    found = ph.locate(model)
    assert same_snapshot(before, snapshot(model))
    base = model if head == "base" else model.model
    assert found.locator == "bart"
    assert found.input_stack is base.encoder
    assert found.embedding is base.encoder.embed_tokens
    assert found.embedding.weight is model.get_input_embeddings().weight  # tied to ``shared``
    assert found.encoder_mask_readers == (base.decoder,)
    assert found.is_encoder_decoder and not found.cls_first and not found.shifted_labels
    assert found.max_positions == 64
    assert [t.module for t in found.position_tables] == [
        base.encoder.embed_positions,
        base.decoder.embed_positions,
    ]
    roles = [(s.role, s.layer) for s in found.sites]
    assert roles == [
        ("enc_self", 0),
        ("enc_self", 1),
        ("dec_self", 0),
        ("cross", 0),
        ("dec_self", 1),
        ("cross", 1),
    ]
    for site in found.sites:
        assert (site.num_kv_heads, site.head_dim) == (4, 8)
        assert site.layer == site.module.layer_idx  # the index the cache is updated with
        assert site.causal == (site.role == "dec_self")
        assert (site.mask_arg, site.cache_arg) == ("attention_mask", CACHE_ARG)
    summary = str(found)
    assert type(model).__name__ in summary and "encoder.layers.1.self_attn" in summary
    assert "decoder.layers.0.encoder_attn" in summary and "position tables" in summary


@pytest.mark.workflow  # no prompthooks kernel runs here
def test_decoder_only_bart_is_not_claimed() -> None:
    config = tiny_bart().config
    assert not BartLocator().matches(tf.BartForCausalLM(config))


# -- Prompt Tuning ------------------------------------------------------------------


@pytest.mark.kernel_paths  # also run on the Triton path (tests/conftest.py)
@pytest.mark.parametrize("attn", ATTN)
def test_prompt_tuning_matches_inputs_embeds_oracle(attn: str) -> None:
    model = tiny_bart(attn)
    ids, mask = _padded()
    dec = decoder_ids(3, 4)
    labels = decoder_ids(3, 4, seed=9)
    labels[1, 2:] = -100
    prompt = _prompt()
    with ph.attach(model, prompt), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, labels=labels)
        from_labels = model(input_ids=ids, attention_mask=mask, labels=labels)
    table = prompt.table().detach()
    with torch.no_grad():
        ref = _prompt_oracle(model, ids, mask, table, decoder_input_ids=dec, labels=labels)
        ref_labels = _prompt_oracle(model, ids, mask, table, labels=labels)
        plain = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
    assert out.logits.shape == (3, 4, 61)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)
    # decoder inputs made from the (untouched) labels, as without a prompt
    torch.testing.assert_close(from_labels.logits, ref_labels.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_labels.loss, ref_labels.loss, atol=1e-5, rtol=0)
    # encoder states come back without the virtual positions
    torch.testing.assert_close(
        out.encoder_last_hidden_state, ref.encoder_last_hidden_state[:, P:], atol=1e-5, rtol=0
    )
    assert (out.logits - plain).abs().max() > 1e-2  # the prompt is not a no-op


def test_prompt_tuning_sequence_classification() -> None:
    """The classification head pools the decoder state at the last ``</s>`` of
    the user's ids; the decoder reads the prompted encoder through the widened
    cross-attention mask."""
    model = tiny_bart("sdpa", head="cls")
    ids, mask = _padded()
    lengths = mask.sum(1)
    ids[torch.arange(3), lengths - 1] = EOS
    prompt = _prompt()
    with ph.attach(model, prompt), torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        encoded = _prompt_oracle(model.model.encoder, ids, mask, prompt.table().detach())
        wide = torch.cat([torch.ones(3, P, dtype=mask.dtype), mask], dim=1)
        ref = model(input_ids=ids, attention_mask=wide, encoder_outputs=encoded).logits
        plain = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert (got - plain).abs().max() > 1e-3


# -- Prefix Tuning ------------------------------------------------------------------


@pytest.mark.workflow  # no prompthooks kernel runs here
def test_oracle_is_bart() -> None:
    """The hand-written parts compute what BART computes: the encoder with an
    empty prefix equals BART's encoder; the hand-written decoder equals BART's
    decoder given a hand-filled cache (the reference for ``shift=True``)."""
    model = tiny_bart("eager")
    ids, mask = _padded()
    real = mask.bool()
    dec = decoder_ids(3, 4)
    empty = site_kv(torch.zeros(0, 2 * 2 * 32), 2, 4, 8)
    table = _table(model)
    kv = site_kv(table, 6, 4, 8)
    with torch.no_grad():
        ours = bart_encoder(model, ids, mask, empty, 0)
        theirs = model.get_encoder()(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)
        by_hand = bart_decoder_by_hand(model, theirs, mask, dec, kv[2::2], kv[3::2], P)
        cached = bart_decoder_with_cache(model, theirs, mask, dec, kv[2::2], kv[3::2])
        torch.testing.assert_close(by_hand, cached, atol=1e-5, rtol=0)
        # ... and without a prefix, BART's own forward
        none = bart_decoder_by_hand(model, theirs, mask, dec, empty, empty, 0)
        plain = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        torch.testing.assert_close(none, plain, atol=1e-5, rtol=0)


@pytest.mark.kernel_paths  # also run on the Triton path (tests/conftest.py)
@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("attn", ATTN)
def test_prefix_matches_hand_written_oracle(attn: str, shift: bool) -> None:
    """With a cache BART creates itself (the prefix is written into it) and
    without one (labels turn the cache off: the prefix is given by proxy)."""
    model = tiny_bart(attn)
    table = _table(model)
    ids, mask = _padded()
    dec = decoder_ids(3, 4)
    labels = decoder_ids(3, 4, seed=9)
    labels[2, 3] = -100
    with torch.no_grad():
        expected = bart_logits(model, ids, mask, dec, table, shift)
        expected_from_labels = bart_logits(model, ids, mask, _shift_right(labels), table, shift)
    with ph.attach(model, _prefix(model, table, shift)), torch.no_grad():
        got = model(
            input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=True
        ).logits
        with_labels = model(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(with_labels.logits, expected_from_labels, atol=1e-5, rtol=0)
    loss = nn.functional.cross_entropy(
        expected_from_labels.flatten(0, 1), labels.flatten(), ignore_index=-100
    )
    torch.testing.assert_close(with_labels.loss, loss, atol=1e-5, rtol=0)


def test_oracle_and_prefix_depend_on_every_site_kind() -> None:
    """Changing any one site's block of the table changes the oracle's logits,
    and prompthooks' logits follow (a site kind the hooks skipped would fail)."""
    model = tiny_bart()
    table = _table(model)
    ids, mask = batch("t5", [5, 4], seed=2)
    dec = decoder_ids(2, 4)
    located = ph.locate(model)
    block = 2 * 4 * 8
    with torch.no_grad():
        base = {shift: bart_logits(model, ids, mask, dec, table, shift) for shift in (True, False)}
        for role in ("enc_self", "dec_self", "cross"):
            for layer in (0, 1):
                s = next(
                    i for i, x in enumerate(located.sites) if (x.role, x.layer) == (role, layer)
                )
                changed = table.clone()
                changed[:, s * block : (s + 1) * block] += 1.0
                for shift in (True, False):
                    oracle = bart_logits(model, ids, mask, dec, changed, shift)
                    assert (oracle - base[shift]).abs().max() > 1e-3, (role, layer, shift)
                    if shift == (layer == 0):  # each site kind once per convention
                        with ph.attach(model, _prefix(model, changed, shift)):
                            got = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)
                        torch.testing.assert_close(got.logits, oracle, atol=1e-5, rtol=0)


@pytest.mark.workflow  # no prompthooks kernel runs here
def test_shift_positions_moves_both_stacks() -> None:
    """``shift_positions`` is not ignored by stacks that take no position ids."""
    model = tiny_bart()
    table = _table(model)
    ids, mask = _padded()
    dec = decoder_ids(3, 4)
    with torch.no_grad():
        shifted = bart_logits(model, ids, mask, dec, table, True)
        unshifted = bart_logits(model, ids, mask, dec, table, False)
        assert (shifted - unshifted).abs().max() > 1e-2


@pytest.mark.parametrize("shift", [True, False])
def test_decode_step_continues_the_models_own_cache(shift: bool) -> None:
    """A call that lets BART create its cache (prefix given by proxy, written
    into that cache) and a decode step continuing it give the full forward's
    logits: the decoder's positions do not jump when the cache starts to
    count the prefix."""
    model = tiny_bart()
    table = _table(model)
    ids, mask = _padded()
    dec = decoder_ids(3, 5)
    with ph.attach(model, _prefix(model, table, shift)), torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
        first = model(
            input_ids=ids, attention_mask=mask, decoder_input_ids=dec[:, :3], use_cache=True
        )
        step = model(
            encoder_outputs=(first.encoder_last_hidden_state,),
            attention_mask=mask,
            decoder_input_ids=dec[:, 3:],
            past_key_values=first.past_key_values,
            use_cache=True,
        ).logits
    torch.testing.assert_close(first.logits, full[:, :3], atol=1e-5, rtol=0)
    torch.testing.assert_close(step, full[:, 3:], atol=1e-5, rtol=0)


# -- both methods --------------------------------------------------------------------


def _attached(model: nn.Module, method: str, shift: bool = True) -> Any:
    return _prompt() if method == "prompt" else _prefix(model, _table(model), shift)


def _greedy(logits_of: Any, steps: int, batch_size: int) -> torch.Tensor:
    """Greedy decoding from a function of the decoder ids so far (no cache)."""
    out = torch.full((batch_size, 1), START)
    for _ in range(steps):
        out = torch.cat([out, logits_of(out)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


@pytest.mark.parametrize(
    ("method", "shift"), [("prompt", True), ("prefix", True), ("prefix", False)]
)
@pytest.mark.parametrize("attn", ATTN)
def test_greedy_generate_equals_oracle(attn: str, method: str, shift: bool) -> None:
    model = tiny_bart(attn)
    ids, mask = _padded()
    attached = _attached(model, method, shift)
    with torch.no_grad():
        if method == "prompt":
            table = attached.table().detach()

            def oracle(dec: torch.Tensor) -> torch.Tensor:
                logits: torch.Tensor = _prompt_oracle(
                    model, ids, mask, table, decoder_input_ids=dec
                ).logits
                return logits

        else:
            table = _table(model)

            def oracle(dec: torch.Tensor) -> torch.Tensor:
                return bart_logits(model, ids, mask, dec, table, shift)

        expected = _greedy(oracle, 6, 3)
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6)
    greedy: dict[str, Any] = {"max_new_tokens": 6, "do_sample": False}
    with ph.attach(model, attached), torch.no_grad():
        cached = model.generate(input_ids=ids, attention_mask=mask, **greedy)
        if method == "prompt":  # without a cache a prefix is the forward tested above
            uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **greedy)
            assert torch.equal(uncached, expected)
    assert torch.equal(cached, expected)
    assert not torch.equal(plain, expected)  # the prompt changes what is generated


def test_base_model_builds_decoder_inputs_from_the_users_ids() -> None:
    """``BartModel`` without decoder inputs shifts the user's ids (never the
    virtual ones) into the decoder, as it does without a prompt."""
    model = tiny_bart(head="base")
    ids, mask = _padded()
    prompt = _prompt()
    with ph.attach(model, prompt), torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    with torch.no_grad():
        dec = torch.cat([torch.full((3, 1), START), ids[:, :-1]], dim=1)
        ref = _prompt_oracle(model, ids, mask, prompt.table().detach(), decoder_input_ids=dec)
    torch.testing.assert_close(got, ref.last_hidden_state, atol=1e-5, rtol=0)


def test_mixed_batch_rows_equal_rows_alone() -> None:
    """Rows with prefixes of different lengths and position conventions, and a
    soft prompt, in one batch: each row's logits and greedy tokens (dynamic
    and static cache) are those of the row alone."""
    model = tiny_bart()
    located = ph.locate(model)
    torch.manual_seed(0)
    prompts = {
        "a": ph.PrefixTuning(2, hidden_size=16).build(located),
        "b": ph.PrefixTuning(5, projection=False, shift_positions=False).build(located),
        "c": ph.PromptTuning(3).build(located),
    }
    ids, mask = batch("t5", [6, 3, 5, 4], seed=3)
    rows = ["a", "b", "c", "b"]
    dec = decoder_ids(4, 4)
    greedy: dict[str, Any] = {"max_new_tokens": 5, "do_sample": False}
    with ph.attach(model, prompts) as att, torch.no_grad():
        with att.use(rows):
            together = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
            generated = model.generate(input_ids=ids, attention_mask=mask, **greedy)
            static = model.generate(
                input_ids=ids, attention_mask=mask, cache_implementation="static", **greedy
            )
        for r, name in enumerate(rows):
            alone_ids = ids[r : r + 1, mask[r].bool()]
            with att.use(name):
                alone = model(input_ids=alone_ids, decoder_input_ids=dec[r : r + 1]).logits
                alone_generated = model.generate(input_ids=alone_ids, **greedy)
            torch.testing.assert_close(together[r : r + 1], alone, atol=1e-5, rtol=0)
            assert torch.equal(generated[r], alone_generated[0])
    assert torch.equal(static, generated)
