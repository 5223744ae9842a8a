"""Hypothesis properties: the frozen model is never changed by prompthooks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from models import ARCHS, batch, model_inputs, same_snapshot, snapshot, tiny

import prompthooks as ph

shapes = st.fixed_dictionaries(
    {
        "arch": st.sampled_from(ARCHS),
        "lengths": st.lists(st.integers(2, 12), min_size=1, max_size=4),
        "extra_pad": st.integers(0, 3),
        "prompt": st.integers(1, 8),
        "seed": st.integers(0, 3),
    }
)


def _inputs(case: dict) -> tuple[torch.nn.Module, dict]:
    model = tiny(case["arch"], seed=case["seed"])
    width = max(case["lengths"]) + case["extra_pad"]
    ids, mask = batch(case["arch"], case["lengths"], seed=case["seed"], pad_to=width)
    return model, model_inputs(case["arch"], ids, mask)


@settings(max_examples=25)
@given(case=shapes)
def test_detach_restores_logits_and_state_bit_for_bit(case: dict) -> None:
    model, kw = _inputs(case)
    before = snapshot(model)
    with torch.no_grad():
        logits_before = model(**kw).logits
    with ph.attach(model, ph.PromptTuning(case["prompt"])):
        with torch.no_grad():
            prompted = model(**kw).logits
        assert prompted.shape == logits_before.shape
    with torch.no_grad():
        logits_after = model(**kw).logits
    assert torch.equal(logits_before, logits_after)
    assert same_snapshot(before, snapshot(model))
    assert not hasattr(model, "prompthooks")


@settings(max_examples=15)
@given(case=shapes, steps=st.integers(1, 3))
def test_optimizer_over_model_parameters_trains_only_the_prompt(case: dict, steps: int) -> None:
    model, kw = _inputs(case)
    model.train()
    before = snapshot(model)
    labels = kw["decoder_input_ids"] if case["arch"] == "t5" else kw["input_ids"]
    with ph.attach(model, ph.PromptTuning(case["prompt"])) as att:
        prompt_before = att.prompts["default"].weight.detach().clone()
        # The user's own training code: an optimizer over *all* model parameters.
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
        assert any(p is att.prompts["default"].weight for p in model.parameters())
        for _ in range(steps):
            optimizer.zero_grad()
            model(**kw, labels=labels).loss.backward()
            optimizer.step()
        assert not torch.equal(prompt_before, att.prompts["default"].weight)
    assert same_snapshot(before, snapshot(model))


@settings(max_examples=10)
@given(arch=st.sampled_from(ARCHS), prompt=st.integers(1, 5))
def test_exception_inside_with_block_still_detaches(arch: str, prompt: int) -> None:
    model = tiny(arch)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="user code failed"):
        with ph.attach(model, ph.PromptTuning(prompt)):
            raise RuntimeError("user code failed")
    assert same_snapshot(before, snapshot(model))
    ph.attach(model, ph.PromptTuning(prompt)).detach()  # attachable again afterwards


def test_detach_is_idempotent_and_restores_trainable_flags() -> None:
    model = tiny("gpt2")
    model.lm_head.weight.requires_grad_(False)  # a user's own frozen part
    model.transformer.h[0].mlp.c_fc.weight.requires_grad_(False)
    before = snapshot(model)
    att = ph.attach(model, ph.PromptTuning(2))
    assert all(not p.requires_grad for n, p in model.named_parameters() if "prompthooks" not in n)
    att.detach()
    att.detach()
    assert same_snapshot(before, snapshot(model))
