"""Hypothesis properties: the frozen model is never changed by prompthooks,
whatever the method (Prompt Tuning, Prefix Tuning with its MLP, P-tuning v2).

Drawn: architecture, batch size, lengths, padding, prompt length, method, position
shift, fp32 or bf16. Checked: base weights are bit-identical after optimizer
steps over ``model.parameters()``; ``export()`` keeps the outputs; an exception
inside ``with ph.attach(...)`` still detaches. (Detach and padded rows, for every
family: tests/test_conformance.py.)
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prompthooks as ph
from tests.support.models import ARCHS, batch, model_inputs, same_snapshot, snapshot, tiny

shapes = st.fixed_dictionaries(
    {
        "arch": st.sampled_from(ARCHS),
        "lengths": st.lists(st.integers(2, 12), min_size=1, max_size=4),
        "extra_pad": st.integers(0, 3),
        "prompt": st.integers(1, 8),
        "seed": st.integers(0, 3),
        "method": st.sampled_from(["prompt", "prefix", "ptv2"]),
        "shift": st.booleans(),
    }
)


def _spec(case: dict) -> ph.PromptTuning | ph.PrefixTuning:
    if case["method"] == "prompt":
        return ph.PromptTuning(case["prompt"])
    return ph.PrefixTuning(
        case["prompt"],
        projection=case["method"] == "prefix",
        hidden_size=16,
        shift_positions=case["shift"],
    )


def _inputs(case: dict) -> tuple[torch.nn.Module, dict]:
    model = tiny(case["arch"], seed=case["seed"])
    width = max(case["lengths"]) + case["extra_pad"]
    ids, mask = batch(case["arch"], case["lengths"], seed=case["seed"], pad_to=width)
    return model, model_inputs(case["arch"], ids, mask)


@settings(max_examples=15)
@given(case=shapes, steps=st.integers(1, 3))
def test_optimizer_over_model_parameters_trains_only_the_prompt(case: dict, steps: int) -> None:
    model, kw = _inputs(case)
    model.train()
    before = snapshot(model)
    labels = kw["decoder_input_ids"] if case["arch"] == "t5" else kw["input_ids"]
    with ph.attach(model, _spec(case)) as att:
        prompt_before = [p.detach().clone() for p in att.parameters()]
        # The user's own training code: an optimizer over *all* model parameters.
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
        in_model = {id(p) for p in model.parameters()}
        assert all(id(p) in in_model for p in att.parameters())
        for _ in range(steps):
            optimizer.zero_grad()
            model(**kw, labels=labels).loss.backward()
            optimizer.step()
        after = list(att.parameters())
        assert all(not torch.equal(a, b) for a, b in zip(prompt_before, after, strict=True))
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


prefix_cases = st.fixed_dictionaries(
    {
        "arch": st.sampled_from(ARCHS),
        "lengths": st.lists(st.integers(2, 10), min_size=2, max_size=4),
        "extra_pad": st.integers(0, 3),
        "prompt": st.integers(1, 6),
        "seed": st.integers(0, 3),
        "method": st.sampled_from(["prefix", "ptv2"]),
        "shift": st.booleans(),
        "dtype": st.sampled_from([torch.float32, torch.bfloat16]),
    }
)


@settings(max_examples=20)
@given(case=prefix_cases)
def test_prefix_export_preserves_outputs_and_detach_restores(case: dict) -> None:
    model, kw = _inputs(case)
    model.to(case["dtype"])
    before = snapshot(model)
    with torch.no_grad():
        logits_before = model(**kw).logits
    torch.manual_seed(case["seed"])
    with ph.attach(model, _spec(case)) as att:
        with torch.no_grad():
            trained_form = model(**kw).logits
        att.export()
        with torch.no_grad():
            exported = model(**kw).logits
    assert torch.equal(exported, trained_form)
    assert same_snapshot(before, snapshot(model))
    with torch.no_grad():
        assert torch.equal(model(**kw).logits, logits_before)
