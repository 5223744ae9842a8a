"""RoBERTa and DistilBERT: [CLS]-first encoders, against independent references.

* Prompt Tuning: the same model fed ``inputs_embeds`` built by hand (prompt
  right after the first token) with explicit positions. RoBERTa numbers its
  positions from ``padding_idx + 1``; the oracle does too, written as a loop.
* Prefix, RoBERTa: the model given a hand-filled ``DynamicCache`` (its own
  past-key-values path), and PEFT's P-tuning v2 given the same prefix.
* Prefix, DistilBERT: its attention takes no cache, so the reference is a
  hand-written encoder forward (attention written out with ``einsum``; the
  model's own projections, norms and feed-forward weights).
* The sequence-classification heads read ``[CLS]``: their logits equal the
  oracle's, and differ from a layout that puts the prompt in front of it.
* XLM-RoBERTa and CamemBERT (RoBERTa's code under other class names) and
  ``RobertaForCausalLM`` get a shorter pass through the same oracles.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import pytest
import torch
import transformers as tf
from peft import PrefixTuningConfig, get_peft_model
from torch import nn

import prompthooks as ph
from tests.support.builders import ENCODER_FIRST as FIRST
from tests.support.builders import VOCAB, prefix_of, prefix_table
from tests.support.builders import encoder_batch as batch
from tests.support.builders import tiny_encoder as tiny
from tests.support.models import same_snapshot, snapshot
from tests.support.oracle import encoder_prompt_oracle as prompt_oracle
from tests.support.oracle import kept
from tests.support.prefix_oracle import (
    distilbert_prefix_oracle,
    roberta_prefix_oracle,
)

FAMILIES = ("roberta", "distilbert")
HEADS = ("base", "cls", "lm", "tok")
SIBLINGS = ("xlm_roberta", "camembert")  # RoBERTa's code under other class names
P = 3


def stack(model: nn.Module) -> Any:
    return getattr(model, "roberta", getattr(model, "distilbert", model))


def output_of(model: nn.Module, out: Any) -> torch.Tensor:
    """Per-position output: logits of a head, else the last hidden state."""
    result: torch.Tensor = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return result


# -- the soft-prompt oracle ------------------------------------------------------


# -- the prefix oracles -----------------------------------------------------------


def table_for(model: nn.Module, n: int = P, seed: int = 7) -> torch.Tensor:
    return prefix_table(model, n, seed)


# -- locating ----------------------------------------------------------------------


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize("family", FAMILIES)
def test_sites(family: str, head: str) -> None:
    model = tiny(family, head)
    before = snapshot(model)
    found = ph.locate(model)
    assert same_snapshot(before, snapshot(model))
    assert found.locator == family
    assert found.embedding is model.get_input_embeddings()
    assert found.input_stack is stack(model)
    assert found.cls_first and not found.is_encoder_decoder and not found.shifted_labels
    assert found.first_position == FIRST[family]
    assert found.max_positions == 64
    assert [s.layer for s in found.sites] == [0, 1]
    body = stack(model)
    for i, site in enumerate(found.sites):
        assert site.role == "self" and not site.causal
        assert (site.num_kv_heads, site.head_dim) == (4, 8)
        if family == "roberta":
            assert site.module is body.encoder.layer[i].attention.self
            assert site.prefix_in == "cache"
        else:
            attention = body.transformer.layer[i].attention
            assert site.module is attention and site.prefix_in == "projections"
            assert site.key_proj is attention.k_lin and site.value_proj is attention.v_lin
    summary = str(found)
    assert type(model).__name__ in summary and "kv_heads=4 head_dim=8" in summary


@pytest.mark.parametrize("family", FAMILIES)
def test_max_positions_is_the_models_own_limit(family: str) -> None:
    """The model embeds 64 tokens and fails at 65 (RoBERTa: 66 table rows, 2 of
    them before its first position); with the prompt, 64 - P real tokens are
    accepted and one more is refused with a clear message."""
    model = tiny(family)
    with torch.no_grad():
        model(input_ids=batch(family, [64])[0])
        with pytest.raises((IndexError, RuntimeError)):  # out of the position table
            model(input_ids=batch(family, [65])[0])
        with ph.attach(model, ph.PromptTuning(P)):
            model(input_ids=batch(family, [64 - P])[0])
            with pytest.raises(ValueError, match="embeds at most 64"):
                model(input_ids=batch(family, [65 - P])[0])


# -- Prompt Tuning -----------------------------------------------------------------


@pytest.mark.kernel_paths  # also run on the Triton path (tests/conftest.py)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("head", [h for h in HEADS if h != "lm"])  # lm: test_conformance.py
@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_tuning_matches_inputs_embeds_oracle(family: str, head: str, attn: str) -> None:
    model = tiny(family, head, attn)
    ids, mask = batch(family, [7, 3, 5], seed=3)
    labels: torch.Tensor | None = None
    if head in ("lm", "tok"):
        labels = torch.randint(0, 2 if head == "tok" else VOCAB, ids.shape).masked_fill(
            mask == 0, -100
        )
    elif head == "cls":
        labels = torch.tensor([0, 1, 1])
    with ph.attach(model, ph.PromptTuning(P)) as att:
        table = att.prompts["default"].table().detach().clone()
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask, labels=labels)
    with torch.no_grad():
        token_labels = labels if head in ("lm", "tok") else None
        ref, keep = prompt_oracle(model, family, ids, mask, table, token_labels)
        if head == "cls":
            ref_loss = nn.functional.cross_entropy(ref.logits, labels)
    real = mask.bool()
    if head == "cls":  # the classifier read [CLS]: the whole logits agree
        torch.testing.assert_close(got.logits, ref.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(got.loss, ref_loss, atol=1e-5, rtol=0)
        with torch.no_grad():  # and a prompt in front of [CLS] would have changed them
            before_cls = prompt_oracle(model, family, ids, mask, table, at=0)[0].logits
        assert (before_cls - ref.logits).abs().max() > 1e-3
        return
    expected = kept(output_of(model, ref), keep)
    assert output_of(model, got).shape == expected.shape
    torch.testing.assert_close(output_of(model, got)[real], expected[real], atol=1e-5, rtol=0)
    if labels is not None:
        torch.testing.assert_close(got.loss, ref.loss, atol=1e-5, rtol=0)
    if head == "base" and family == "roberta":  # RobertaModel's pooler reads [CLS]
        torch.testing.assert_close(got.pooler_output, ref.pooler_output, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_prompt_tuning_without_mask_and_from_embeddings(family: str) -> None:
    """Without a mask the model numbers positions itself (RoBERTa from the ids,
    skipping its pad id; DistilBERT from 0); from ``inputs_embeds`` RoBERTa
    counts from ``padding_idx + 1``. All agree with the mask-derived positions."""
    model = tiny(family)
    ids, mask = batch(family, [6, 6], seed=2)
    with ph.attach(model, ph.PromptTuning(P)), torch.no_grad():
        with_mask = model(input_ids=ids, attention_mask=mask).last_hidden_state
        without = model(input_ids=ids).last_hidden_state
        embeds = model.get_input_embeddings()(ids)
        from_embeds = model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        embeds_only = model(inputs_embeds=embeds).last_hidden_state
    torch.testing.assert_close(without, with_mask, atol=1e-6, rtol=0)
    torch.testing.assert_close(from_embeds, with_mask, atol=1e-6, rtol=0)
    torch.testing.assert_close(embeds_only, with_mask, atol=1e-6, rtol=0)


# -- Prefix ------------------------------------------------------------------------


@pytest.mark.kernel_paths  # also run on the Triton path (tests/conftest.py)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize(("head", "shift"), [("base", True), ("base", False), ("cls", True)])
@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_matches_oracle(family: str, head: str, shift: bool, attn: str) -> None:
    model = tiny(family, head, attn)
    table = table_for(model)
    ids, mask = batch(family, [7, 3, 5], seed=4)
    with ph.attach(model, prefix_of(model, table, shift)), torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        if family == "roberta":
            ref = roberta_prefix_oracle(model, ids, mask, table, shift)
            ref_hidden = ref.hidden_states[-1] if head == "cls" else ref.last_hidden_state
            ref_logits = ref.logits if head == "cls" else None
        else:
            ref_hidden, ref_logits = distilbert_prefix_oracle(model, ids, mask, table, shift)
    real = mask.bool()
    hidden = got.hidden_states[-1]
    assert (hidden - plain.hidden_states[-1])[real].abs().max() > 1e-3  # the prefix matters
    torch.testing.assert_close(hidden[real], ref_hidden[real], atol=1e-5, rtol=0)
    if head == "cls":  # the classifier read [CLS] of the prefixed encoder
        torch.testing.assert_close(got.logits, ref_logits, atol=1e-5, rtol=0)


def test_distilbert_oracle_depends_on_every_site_and_keys_and_values() -> None:
    """Changing one site's keys (or values) changes the oracle, and prompthooks
    follows: the prefix reaches every layer through both projections."""
    model = tiny("distilbert")
    table = table_for(model)
    ids, mask = batch("distilbert", [6, 4], seed=2)
    half = 4 * 8
    with torch.no_grad():
        base = distilbert_prefix_oracle(model, ids, mask, table, True)[0]
        for start in range(0, table.shape[1], half):  # site 0 keys, values, site 1 ...
            changed = table.clone()
            changed[:, start : start + half] += 1.0
            oracle = distilbert_prefix_oracle(model, ids, mask, changed, True)[0]
            assert (oracle - base)[mask.bool()].abs().max() > 1e-3, start
            with ph.attach(model, prefix_of(model, changed)):
                got = model(input_ids=ids, attention_mask=mask).last_hidden_state
            torch.testing.assert_close(got[mask.bool()], oracle[mask.bool()], atol=1e-5, rtol=0)


def _show_peft_a_past_key_values_parameter(backbone: nn.Module) -> None:
    """PEFT 0.21.2 runs a classifier's prefix only if the backbone's forward
    names ``past_key_values``, which transformers 5.24 renamed to ``cache``
    (keeping the old name as an alias). Name it again, so PEFT runs its own code
    unchanged; the alias carries the value."""
    if "past_key_values" in inspect.signature(backbone.forward).parameters:
        return
    bound = backbone.forward

    def forward(*args: Any, past_key_values: Any = None, **kwargs: Any) -> Any:
        return bound(*args, past_key_values=past_key_values, **kwargs)

    backbone.forward = forward  # type: ignore[method-assign]


@pytest.mark.parametrize("task", ["FEATURE_EXTRACTION", "SEQ_CLS", "TOKEN_CLS"])
def test_roberta_prefix_matches_peft(task: str) -> None:
    """PEFT's P-tuning v2 (prefix as past, RoBERTa numbers positions from the
    ids after the past) on padded rows, and prompthooks given the same table."""
    head = {"FEATURE_EXTRACTION": "base", "SEQ_CLS": "cls", "TOKEN_CLS": "tok"}[task]
    model = tiny("roberta", head)
    table = table_for(model)
    peft_model = get_peft_model(
        copy.deepcopy(model), PrefixTuningConfig(task_type=task, num_virtual_tokens=P)
    )
    if head != "base":
        _show_peft_a_past_key_values_parameter(peft_model.base_model.roberta)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(table)
    peft_model.eval()
    ids, mask = batch("roberta", [7, 3, 5], seed=4)
    with torch.no_grad():
        theirs = output_of(model, peft_model(input_ids=ids, attention_mask=mask))
        plain = output_of(model, model(input_ids=ids, attention_mask=mask))
        with ph.attach(model, prefix_of(model, table)):
            ours = output_of(model, model(input_ids=ids, attention_mask=mask))
    pick = (lambda x: x) if head == "cls" else (lambda x: x[mask.bool()])
    assert (pick(theirs) - pick(plain)).abs().max() > 1e-3
    torch.testing.assert_close(pick(ours), pick(theirs), atol=1e-5, rtol=0)


def test_distilbert_prefix_attentions_have_prefix_columns() -> None:
    """``output_attentions`` keeps the user's query rows and shows the prefix
    keys, as for models whose prefix arrives through a cache."""
    model = tiny("distilbert", attn="eager")
    ids, mask = batch("distilbert", [6, 4])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, output_attentions=True)  # recorders installed
        with ph.attach(model, ph.PrefixTuning(P)):
            out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert out.last_hidden_state.shape == (2, 6, 32)
    assert all(a.shape == (2, 4, 6, P + 6) for a in out.attentions)


def test_distilbert_refuses_a_past() -> None:
    """DistilBERT's attention reads no cache: a past cannot carry the prefix."""
    model = tiny("distilbert")
    ids, mask = batch("distilbert", [5])
    with ph.attach(model, ph.PrefixTuning(P)), pytest.raises(TypeError, match="no key/value"):
        model(input_ids=ids, attention_mask=mask, past_key_values=tf.DynamicCache())


# -- properties shared by both methods ---------------------------------------------


def _spec(method: str) -> Any:
    return ph.PromptTuning(P) if method == "prompt" else ph.PrefixTuning(P, projection=False)


@pytest.mark.parametrize("reentrant", [False, True])
def test_distilbert_prefix_gradient_checkpointing_same_loss_and_gradient(reentrant: bool) -> None:
    """Checkpointed blocks run the attention hooks again in backward (reentrant:
    first without autograd, so the prefix is rebuilt for the recomputation)."""
    family = "distilbert"
    model = tiny(family, "cls")
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    ids, mask = batch(family, [6, 4])
    labels = torch.tensor([1, 0])
    results = []
    with ph.attach(model, ph.PrefixTuning(P, projection=False)) as att:
        (param,) = list(att.parameters())
        for checkpointing in (False, True):
            if checkpointing:
                model.activation_checkpointing_enable({"use_reentrant": reentrant})
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            assert param.grad is not None
            results.append((loss.detach(), param.grad.clone()))
            param.grad = None
        model.activation_checkpointing_disable()
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(results[1][1], results[0][1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_roberta_causal_lm_forward(attn: str) -> None:
    """``RobertaForCausalLM`` (``is_decoder=True``): causal sites, a shifted loss
    whose targets stay the user's, prompt and prefix against the oracles. (Its
    ``generate`` is not covered: transformers passes 0-based position ids there,
    while its forward numbers from ``padding_idx + 1``, with or without a prompt.)"""
    torch.manual_seed(0)
    config = tiny("roberta").config
    config.is_decoder = True
    model = tf.RobertaForCausalLM(config).eval()
    located = ph.locate(model)
    assert located.shifted_labels and all(s.causal for s in located.sites)
    ids, mask = batch("roberta", [7, 3, 5], seed=3)
    labels = ids.masked_fill(mask == 0, -100)
    real = mask.bool()
    with ph.attach(model, ph.PromptTuning(P)) as att:
        table = att.prompts["default"].table().detach().clone()
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask, labels=labels)
    with torch.no_grad():
        ref, keep = prompt_oracle(model, "roberta", ids, mask, table, labels)
    torch.testing.assert_close(got.logits[real], kept(ref.logits, keep)[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(got.loss, ref.loss, atol=1e-5, rtol=0)
    prefix_table = table_for(model)
    with torch.no_grad():
        expected = roberta_prefix_oracle(model, ids, mask, prefix_table, True).logits
        with ph.attach(model, prefix_of(model, prefix_table)):
            cached = model(input_ids=ids, attention_mask=mask).logits  # the model makes a cache
            uncached = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(cached[real], expected[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(uncached[real], expected[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", SIBLINGS)
def test_roberta_siblings(family: str) -> None:
    """XLM-RoBERTa and CamemBERT are RoBERTa's code under their own classes: the
    RoBERTa locator takes them, numbering from ``padding_idx + 1``; the prompt's
    classifier logits and the prefix's hidden states equal the oracles'."""
    model = tiny(family, "cls")
    found = ph.locate(model)
    assert found.locator == "roberta" and found.input_stack is model.roberta
    assert (found.first_position, found.max_positions, found.cls_first) == (2, 64, True)
    ids, mask = batch(family, [7, 3, 5], seed=3)
    with ph.attach(model, ph.PromptTuning(P)) as att:
        table = att.prompts["default"].table().detach().clone()
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=mask).logits
    with torch.no_grad():
        expected = prompt_oracle(model, family, ids, mask, table)[0].logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    base = tiny(family, "base")
    prefix_table = table_for(base)
    with torch.no_grad():
        ref = roberta_prefix_oracle(base, ids, mask, prefix_table, True).last_hidden_state
        with ph.attach(base, prefix_of(base, prefix_table)):
            hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    torch.testing.assert_close(hidden[real], ref[real], atol=1e-5, rtol=0)
