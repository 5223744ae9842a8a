"""GPT-NeoX and OPT: soft prompts and prefixes against independent references.

* Prompt Tuning: the same model fed ``inputs_embeds`` built by hand, left padded;
* Prefix: the model given a hand-filled ``DynamicCache`` and explicit positions
  (shifted by P or not), left padded;
* generation: the model's own ``generate(inputs_embeds=...)`` for soft prompts,
  a hand-written greedy loop over a hand-filled cache for prefixes.

``opt-proj`` is OPT-350m's layout: word embeddings narrower than the hidden
size (``project_in`` / ``project_out``) and layer norms after attention.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
from torch import nn

import prompthooks as ph
from prompthooks.methods import PromptTable
from tests.support.builders import CAUSAL_HEADS as HEADS
from tests.support.builders import MAX_POSITIONS, VOCAB, left_padded, prefix_of, tiny_causal
from tests.support.builders import prefix_table as _prefix_table
from tests.support.builders import random_table as random_table
from tests.support.models import CACHE_ARG, same_snapshot, snapshot
from tests.support.oracle import causal_prompted_inputs as prompted_inputs
from tests.support.prefix_oracle import filled_cache, positions, site_kv

FAMILIES = ("neox", "opt")
N = 4


def prefix_table(model: nn.Module, seed: int = 7) -> torch.Tensor:
    return _prefix_table(model, N, seed)


# -- independent references ---------------------------------------------------------


def prompt_oracle_outputs(
    model: nn.Module,
    family: str,
    ids: torch.Tensor,
    mask: torch.Tensor,
    table: torch.Tensor,
    **extra: Any,
) -> Any:
    """The model's output on the prompted ``inputs_embeds``, untouched."""
    kw, _ = prompted_inputs(model, family, ids, mask, table)
    return model(**kw, **extra)


def prefix_oracle(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    table: torch.Tensor,
    shift: bool,
    labels: torch.Tensor | None = None,
    explicit_positions: bool = True,
) -> Any:
    """The model continuing a hand-filled cache that holds the prefix."""
    site = ph.locate(model).sites[0]
    p, batch = table.shape[0], ids.shape[0]
    layers = table.shape[1] // (2 * site.num_kv_heads * site.head_dim)
    cache = filled_cache(site_kv(table, layers, site.num_kv_heads, site.head_dim), batch)
    kw: dict[str, Any] = {
        "input_ids": ids,
        "attention_mask": torch.cat([torch.ones(batch, p, dtype=mask.dtype), mask], dim=1),
        "past_key_values": cache,
        "use_cache": True,
        "labels": labels,
    }
    if explicit_positions:
        kw["position_ids"] = positions(mask, p if shift else 0)
    return model(**kw)


def prefix_greedy_oracle(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, table: torch.Tensor, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding written out: the prompt over a hand-filled cache, then one
    token per call; positions continue from the shifted ones (PEFT's layout)."""
    p = table.shape[0]
    out = prefix_oracle(model, ids, mask, table, shift=True)
    full_mask = torch.cat([torch.ones(ids.shape[0], p, dtype=mask.dtype), mask], dim=1)
    pos = positions(mask, p)[:, -1:]
    tokens, logits = [], []
    for step in range(steps):
        last = out.logits[:, -1]
        logits.append(last)
        tokens.append(last.argmax(-1, keepdim=True))
        if step + 1 == steps:
            break
        full_mask = torch.cat([full_mask, torch.ones_like(tokens[-1])], dim=1)
        pos = pos + 1
        out = model(
            input_ids=tokens[-1],
            attention_mask=full_mask,
            position_ids=pos,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    return torch.cat(tokens, dim=1), torch.stack(logits, dim=1)


def labels_of(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 3] = -100  # a masked target inside a row too
    return labels


# -- locating --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("family", "head"),
    [(f, h) for f in FAMILIES for h in HEADS[f]] + [("opt-proj", "lm")],
)
def test_sites(family: str, head: str) -> None:
    model = tiny_causal(family, head=head)
    before = snapshot(model)
    found = ph.locate(model)
    assert same_snapshot(before, snapshot(model))
    assert found.locator == ("gpt_neox" if family == "neox" else "opt")
    if family == "neox":
        stack = model if head == "base" else model.gpt_neox
        attentions = [layer.attention for layer in stack.layers]
    else:
        stack = {"decoder": model, "base": getattr(model, "decoder", None)}.get(head)
        stack = stack if stack is not None else model.model.decoder
        attentions = [layer.self_attn for layer in stack.layers]
    # The stack that really receives input_ids (OPTForCausalLM skips OPTModel).
    assert found.input_stack is stack
    assert found.embedding is model.get_input_embeddings()
    assert [s.module for s in found.sites] == attentions
    assert [s.role for s in found.sites] == ["self", "self"]
    assert [s.layer for s in found.sites] == [0, 1]
    assert all((s.num_kv_heads, s.head_dim) == (4, 8) for s in found.sites)
    assert found.max_positions == MAX_POSITIONS
    assert found.shifted_labels == (head == "lm")
    assert found.first_position == 0 and not found.cls_first and not found.is_encoder_decoder
    for site in found.sites:  # the kwargs the hooks rewrite exist under these names
        params = inspect.signature(site.module.forward).parameters
        assert site.cache_arg in params and site.mask_arg in params
    assert found.sites[0].cache_arg == ("layer_past" if family == "neox" else CACHE_ARG)
    # Shapes the cache really holds: (batch, kv heads, length, head_dim) per layer.
    ids, mask = left_padded([5, 3])
    with torch.no_grad():
        cache = stack(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
    for site in found.sites:
        assert tuple(cache.layers[site.layer].keys.shape) == (
            2,
            site.num_kv_heads,
            5,
            site.head_dim,
        )
    summary = str(found)
    assert type(model).__name__ in summary and "kv_heads=4 head_dim=8" in summary
    assert ("layers.1.attention" if family == "neox" else "layers.1.self_attn") in summary


# -- soft prompts ----------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_lm_loss_is_the_loss_of_the_returned_logits(family: str) -> None:
    """Rows without padding: the loss equals the shifted cross-entropy of the
    logits the user gets back, so ``num_items_in_batch`` counted from the
    user's labels is the right divisor."""
    model = tiny_causal(family)
    ids = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[1, 2:4] = -100
    with ph.attach(model, ph.PromptTuning(3)), torch.no_grad():
        out = model(input_ids=ids, labels=labels)
        items = (labels[:, 1:] != -100).sum()
        summed = model(input_ids=ids, labels=labels, num_items_in_batch=items).loss
    by_hand = nn.functional.cross_entropy(
        out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, by_hand, atol=1e-6, rtol=0)
    torch.testing.assert_close(summed, by_hand, atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_sequence_classifier_pools_the_last_real_token(family: str) -> None:
    """The classifier pools the last non-pad token it finds in the user's
    input_ids: the prompt's positions must be gone before the head reads the
    stack's output, or it pools a token P positions too early."""
    model = tiny_causal(family, head="cls")
    ids, mask = left_padded([7, 4, 6], seed=12)
    labels = torch.tensor([0, 1, 1])
    table = random_table(3, ph.locate(model).hidden_size, seed=13)
    with ph.attach(model, PromptTable(table)), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    with torch.no_grad():  # inputs_embeds: the head pools the last position, a real token here
        ref = prompt_oracle_outputs(model, family, ids, mask, table, labels=labels)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_question_answering_spans_are_user_positions(family: str) -> None:
    """Start/end logits come back at the user's length and the span loss reads
    them at the user's positions: the loss is the cross-entropy of the
    reference's logits with the virtual positions removed."""
    model = tiny_causal(family, head="qa")
    table = random_table(3, ph.locate(model).hidden_size, seed=13)
    span = {"start_positions": torch.tensor([5, 1]), "end_positions": torch.tensor([6, 3])}
    for lengths in ([7, 4], [7, 7]):
        ids, mask = left_padded(lengths, seed=12)
        with ph.attach(model, PromptTable(table)), torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, **span)
        with torch.no_grad():
            kw, keep = prompted_inputs(model, family, ids, mask, table)
            ref = model(**kw)
        real = mask.bool()  # pads are numbered by each model's own convention: not compared
        expected = {}
        for name in ("start_logits", "end_logits"):
            expected[name] = torch.stack([ref[name][b, keep[b]] for b in range(2)])
            assert out[name].shape == ids.shape
            torch.testing.assert_close(out[name][real], expected[name][real], atol=1e-5, rtol=0)
        if real.all():  # no padding: the whole loss is comparable
            ce = nn.functional.cross_entropy
            by_hand = (
                ce(expected["start_logits"], span["start_positions"])
                + ce(expected["end_logits"], span["end_positions"])
            ) / 2
            torch.testing.assert_close(out.loss, by_hand, atol=1e-5, rtol=0)


# -- prefixes --------------------------------------------------------------------------


@pytest.mark.kernel_paths  # also run on the Triton path (tests/conftest.py)
@pytest.mark.parametrize("shift", [True, False])
@pytest.mark.parametrize("family", [*FAMILIES, "opt-proj"])
def test_prefix_loss_and_opt_positions_match_hand_filled_cache(family: str, shift: bool) -> None:
    """The loss of a prefixed batch, and OPT numbering positions itself. Logits
    on both attention implementations, with and without ``use_cache``:
    tests/test_conformance.py (oracle)."""
    attn, use_cache = "sdpa", False
    model = tiny_causal(family, attn)
    table = prefix_table(model)
    ids, mask = left_padded([7, 3, 5], seed=4)
    labels = labels_of(ids, mask)
    with torch.no_grad():
        ref = prefix_oracle(model, ids, mask, table, shift, labels)
        unprompted = model(input_ids=ids, attention_mask=mask).logits
    with ph.attach(model, prefix_of(model, table, shift)), torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=use_cache)
    real = mask.bool()
    assert (ref.logits - unprompted)[real].abs().max() > 1e-2  # the prefix matters
    torch.testing.assert_close(got.logits[real], ref.logits[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, ref.loss, atol=1e-5, rtol=0)
    if family.startswith("opt") and shift:
        # OPT's own positions (cumsum of the mask, prefix columns included) are
        # the shifted ones: the shift reproduces OPT continuing a real past.
        with torch.no_grad():
            native = prefix_oracle(model, ids, mask, table, shift, explicit_positions=False)
        torch.testing.assert_close(native.logits[real], ref.logits[real], atol=1e-5, rtol=0)


def test_prefix_oracle_sees_every_site_and_the_shift() -> None:
    """The references are not blind: changing one site's block of the table,
    or the shift, changes their logits (GPT-NeoX's rotary keys, too)."""
    for family in FAMILIES:
        model = tiny_causal(family)
        table = prefix_table(model)
        ids, mask = left_padded([6, 4], seed=2)
        block = table.shape[1] // 2
        with torch.no_grad():
            base = prefix_oracle(model, ids, mask, table, True).logits
            unshifted = prefix_oracle(model, ids, mask, table, False).logits
            assert (base - unshifted).abs().max() > 1e-3, family
            for s in range(2):
                changed = table.clone()
                changed[:, s * block : (s + 1) * block] += 1.0
                other = prefix_oracle(model, ids, mask, changed, True).logits
                assert (other - base).abs().max() > 1e-3, (family, s)


# -- properties shared by both methods -------------------------------------------------


def method(model: nn.Module, kind: str, seed: int = 1) -> nn.Module:
    if kind == "prompt":
        return PromptTable(random_table(N, ph.locate(model).hidden_size, seed))
    return prefix_of(model, prefix_table(model, seed))


# -- generation ------------------------------------------------------------------------

STEPS = 5


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_generate_equals_inputs_embeds_generate(family: str, attn: str) -> None:
    model = tiny_causal(family, attn)
    ids, mask = left_padded([6, 3, 5], seed=8)
    table = random_table(N, ph.locate(model).hidden_size, seed=9)
    with torch.no_grad():
        kw, _ = prompted_inputs(model, family, ids, mask, table)
        kw.pop("position_ids", None)  # generate numbers positions from the mask itself
        ref = model.generate(
            **kw,
            max_new_tokens=STEPS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS)
    with ph.attach(model, PromptTable(table)), torch.no_grad():
        got = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=STEPS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert torch.equal(got.sequences[:, : ids.shape[1]], ids)
    assert torch.equal(got.sequences[:, ids.shape[1] :], ref.sequences)
    assert not torch.equal(plain[:, ids.shape[1] :], ref.sequences)  # the prompt matters
    torch.testing.assert_close(
        torch.stack(got.logits, 1), torch.stack(ref.logits, 1), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_generate_equals_hand_written_greedy_loop(family: str, attn: str) -> None:
    model = tiny_causal(family, attn)
    ids, mask = left_padded([6, 3, 5], seed=10)
    table = prefix_table(model, seed=11)
    with torch.no_grad():
        ref_tokens, ref_logits = prefix_greedy_oracle(model, ids, mask, table, STEPS)
        plain = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=STEPS)
    with ph.attach(model, prefix_of(model, table)), torch.no_grad():
        got = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=STEPS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    assert torch.equal(got.sequences[:, ids.shape[1] :], ref_tokens)
    assert not torch.equal(plain[:, ids.shape[1] :], ref_tokens)  # the prefix matters
    torch.testing.assert_close(torch.stack(got.logits, 1), ref_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_keeps_loss_and_gradients(family: str) -> None:
    """Checkpointed layers drop their cache argument (``layer_past`` on NeoX);
    the prefix still reaches every layer and the prompt's gradient is the same."""
    model = tiny_causal(family)
    model.train()
    for module in model.modules():  # no dropout: both runs compute the same thing
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    for name in ("dropout", "attention_dropout"):
        for module in model.modules():
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    ids, mask = left_padded([6, 4], seed=14)
    labels = labels_of(ids, mask)
    for kind in ("prompt", "prefix"):
        prompt = method(model, kind)
        results = []
        for checkpointing in (False, True):
            if checkpointing:
                model.gradient_checkpointing_enable({"use_reentrant": False})
            with ph.attach(model, prompt) as att:
                att.prompts.zero_grad()
                loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                (weight,) = list(att.parameters())
                assert weight.grad is not None and weight.grad.abs().sum() > 0
                results.append((loss.detach(), weight.grad.clone()))
            model.gradient_checkpointing_disable()
        (loss_a, grad_a), (loss_b, grad_b) = results
        torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=0)
        torch.testing.assert_close(grad_a, grad_b, atol=1e-6, rtol=1e-5)
