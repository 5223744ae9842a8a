"""Mixed batches: rows of one batch use different prompts of different lengths.

The reference for every row is the same row run alone with its own prompt
selected (``att.use(name)``), unpadded. Hypothesis draws the architecture, the
row-to-prompt assignment, prompt lengths, padding and methods mixed in one batch
(Prompt Tuning, P-tuning, prefixes); every row must equal its reference in greedy
``generate``, and the rows that beams and ``num_return_sequences`` add follow
their row. The forward, for every family: tests/test_conformance.py (mixed).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prompthooks as ph
from tests.support.models import ARCHS, DECODER_ONLY, batch, tiny, unpad

NAMES = ("a", "b", "c")


SPECS: dict[str, Any] = {
    "prompt": lambda n: ph.PromptTuning(n),
    "ptuning": lambda n: ph.PTuning(n, "mlp", hidden_size=16),
    "prefix": lambda n: ph.PrefixTuning(n, hidden_size=16),
    "ptv2": lambda n: ph.PrefixTuning(n, projection=False, shift_positions=False),
}
FAMILIES = {
    "tokens": ["prompt", "ptuning"],
    "prefix": ["prefix", "ptv2"],
    "both": ["ptuning", "ptv2"],  # soft prompts and prefixes in one batch
}


def _prompts(model: torch.nn.Module, lengths: list[int], kinds: list[str]) -> dict[str, Any]:
    located = ph.locate(model)
    torch.manual_seed(sum(lengths))
    return {
        name: SPECS[kind](n).build(located)
        for name, n, kind in zip(NAMES, lengths, kinds, strict=True)
    }


def _kinds(case: dict) -> list[str]:
    return [FAMILIES[case["family"]][i] for i in case["picks"]]


cases = st.fixed_dictionaries(
    {
        "arch": st.sampled_from(ARCHS),
        "lengths": st.lists(st.integers(2, 9), min_size=2, max_size=5),
        "extra_pad": st.integers(0, 2),
        "prompt_lengths": st.lists(st.integers(1, 6), min_size=3, max_size=3),
        "family": st.sampled_from(sorted(FAMILIES)),
        "picks": st.lists(st.integers(0, 1), min_size=3, max_size=3),
        "seed": st.integers(0, 5),
        "data": st.data(),
    }
)


@settings(max_examples=10)
@given(case=cases)
def test_mixed_batch_greedy_generate_equals_rows_alone(case: dict) -> None:
    arch = case["arch"] if case["arch"] != "bert" else "gpt2"
    model = tiny(arch, seed=case["seed"])
    ids, mask = batch(arch, case["lengths"], seed=case["seed"])
    rows = case["data"].draw(
        st.lists(
            st.sampled_from(NAMES), min_size=len(case["lengths"]), max_size=len(case["lengths"])
        )
    )
    prompts = _prompts(model, case["prompt_lengths"], _kinds(case))
    greedy: dict[str, Any] = {"max_new_tokens": 4, "do_sample": False}
    with ph.attach(model, prompts) as att:
        with att.use(rows):
            together = model.generate(input_ids=ids, attention_mask=mask, **greedy)
        for r, name in enumerate(rows):
            alone_ids = unpad(arch, ids, mask, r)
            with att.use(name):
                alone = model.generate(
                    input_ids=alone_ids, attention_mask=torch.ones_like(alone_ids), **greedy
                )
            if arch in DECODER_ONLY:
                assert torch.equal(together[r, ids.shape[1] :], alone[0, alone_ids.shape[1] :])
            else:
                assert torch.equal(together[r], alone[0])


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_mixed_rows_follow_beam_expansion(arch: str, family: str) -> None:
    """A list of n names serves n * beams rows: generate repeats each row."""
    model = tiny(arch)
    ids, mask = batch(arch, [6, 4], seed=2)
    first, second = FAMILIES[family]
    prompts = _prompts(model, [2, 5, 3], [first, second, first])
    beams: dict[str, Any] = {"max_new_tokens": 4, "num_beams": 3, "num_return_sequences": 2}
    with ph.attach(model, prompts) as att:
        with att.use(["a", "b"]):
            together = model.generate(input_ids=ids, attention_mask=mask, **beams)
            uncached = model.generate(input_ids=ids, attention_mask=mask, use_cache=False, **beams)
        assert torch.equal(together, uncached)
        for r, name in enumerate(["a", "b"]):
            alone_ids = unpad(arch, ids, mask, r)
            with att.use(name):
                alone = model.generate(
                    input_ids=alone_ids, attention_mask=torch.ones_like(alone_ids), **beams
                )
            got = together[2 * r : 2 * r + 2]
            if arch in DECODER_ONLY:
                assert torch.equal(got[:, ids.shape[1] :], alone[:, alone_ids.shape[1] :])
            else:
                assert torch.equal(got, alone)


def test_mixed_batch_errors_name_the_fix() -> None:
    model = tiny("gpt2")
    prompts = {"a": ph.PromptTuning(2), "p": ph.PrefixTuning(2)}
    with ph.attach(model, prompts) as att:
        with pytest.raises(KeyError, match="no prompt named 'z'"):
            with att.use(["a", "z"]):
                pass
        ids, mask = batch("gpt2", [4, 4, 4])
        with att.use(["a", "a", "a", "a"]):  # all the same: an ordinary batch of "a"
            model(input_ids=ids[:1], attention_mask=mask[:1])
    with ph.attach(model, {"a": ph.PromptTuning(2), "b": ph.PromptTuning(3)}) as att:
        with att.use(["a", "b"]), pytest.raises(ValueError, match="one name per row"):
            model(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
def test_mixed_static_cache_equals_dynamic(arch: str, family: str) -> None:
    model = tiny(arch)
    ids, mask = batch(arch, [6, 3, 5], seed=3)
    first, second = FAMILIES[family]
    prompts = _prompts(model, [2, 5, 3], [first, second, first])
    kw: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "max_new_tokens": 5}
    with ph.attach(model, prompts) as att, att.use(["a", "b", "c"]):
        for beams in (1, 2):
            dynamic = model.generate(**kw, num_beams=beams)
            static = model.generate(**kw, num_beams=beams, cache_implementation="static")
            assert torch.equal(static, dynamic)
