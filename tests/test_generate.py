"""Padding never changes a row, and generate works with a prompt attached:
soft prompts (Prompt Tuning) and prefixes (Prefix Tuning) alike.

* A padded row equals the row alone in greedy ``generate`` (the forward, cache ==
  no cache and static == dynamic for every family: tests/test_conformance.py).
* A prompt changes generation and detaching restores it; sampling and beam search
  run with expanded rows (``num_return_sequences``).
* A prefix's hand-written decoding loop continues the cache a call returns.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import prompthooks as ph
from tests.support.models import DECODER_ONLY, batch, tiny, unpad

METHODS = ("prompt", "prefix")


def spec(method: str, n: int) -> ph.PromptTuning | ph.PrefixTuning:
    torch.manual_seed(n)
    return ph.PromptTuning(n) if method == "prompt" else ph.PrefixTuning(n, projection=False)


GEN_ARCHS = ("gpt2", "llama", "t5")


def _generate(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, **kw: object):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, **kw)


def _new_tokens(arch: str, out: torch.Tensor, prompt_len: int) -> torch.Tensor:
    return out[:, prompt_len:] if arch in DECODER_ONLY else out


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", GEN_ARCHS)
def test_greedy_generate_padded_row_equals_row_alone(arch: str, method: str) -> None:
    model = tiny(arch)
    ids, mask = batch(arch, [6, 3, 5], seed=7)
    with ph.attach(model, spec(method, 4)):
        together = _new_tokens(arch, _generate(model, ids, mask, do_sample=False), ids.shape[1])
        for row in range(3):
            alone_ids = unpad(arch, ids, mask, row)
            alone = _generate(model, alone_ids, torch.ones_like(alone_ids), do_sample=False)
            assert torch.equal(together[row], _new_tokens(arch, alone, alone_ids.shape[1])[0])


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", GEN_ARCHS)
def test_prompt_changes_generation_and_detach_restores_it(arch: str, method: str) -> None:
    """The prompt takes part in every decode step (a no-op hook would fail this)."""
    model = tiny(arch)
    ids, mask = batch(arch, [6, 4], seed=9)

    def scores() -> torch.Tensor:
        out = _generate(
            model, ids, mask, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
        return torch.stack(out.scores)

    base = scores()
    with ph.attach(model, spec(method, 6)):
        prompted = scores()
    assert base.shape == prompted.shape
    assert (base - prompted).abs().amax(dim=(1, 2)).min() > 1e-4  # every step differs
    assert torch.equal(base, scores())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", GEN_ARCHS)
def test_sampling_and_beam_search_run_with_expanded_rows(arch: str, method: str) -> None:
    model = tiny(arch)
    ids, mask = batch(arch, [6, 3], seed=10)
    with ph.attach(model, spec(method, 3)):
        torch.manual_seed(0)
        sampled = _generate(model, ids, mask, do_sample=True, top_k=10, num_return_sequences=2)
        beams = _generate(model, ids, mask, num_beams=4, num_return_sequences=2)
    expected_len = ids.shape[1] + 6 if arch in DECODER_ONLY else 7
    assert sampled.shape == (4, expected_len)
    assert beams.shape == (4, expected_len)
    if arch in DECODER_ONLY:  # the user's tokens come back unchanged
        assert torch.equal(beams[::2, : ids.shape[1]], ids)


@pytest.mark.parametrize("arch", DECODER_ONLY)
def test_prefix_manual_decoding_continues_the_returned_cache(arch: str) -> None:
    """A user's own loop: a forward with ``use_cache=True``, then one token at a
    time with the returned cache, equals one forward over the whole sequence."""
    model = tiny(arch)
    ids, mask = batch(arch, [8, 5], seed=12)
    with ph.attach(model, spec("prefix", 3)), torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        out = model(input_ids=ids[:, :5], attention_mask=mask[:, :5], use_cache=True)
        steps = [out.logits]
        cache = out.past_key_values
        for t in range(5, 8):
            out = model(
                input_ids=ids[:, t : t + 1],
                attention_mask=mask[:, : t + 1],
                past_key_values=cache,
                use_cache=True,
            )
            steps.append(out.logits)
            cache = out.past_key_values
    stepped = torch.cat(steps, dim=1)
    real = mask.bool()
    torch.testing.assert_close(stepped[real], full[real], atol=1e-5, rtol=0)


def test_prefix_use_cache_false_returns_no_cache() -> None:
    model = tiny("llama")
    ids, mask = batch("llama", [5, 5], seed=13)
    with ph.attach(model, spec("prefix", 3)), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    assert out.past_key_values is None


STATIC_SPECS = {
    "prompt": lambda: ph.PromptTuning(3),
    "ptuning": lambda: ph.PTuning(2),
    "prefix": lambda: ph.PrefixTuning(3),
    "mixed": lambda: {"a": ph.PromptTuning(3), "b": ph.PrefixTuning(2), "c": ph.PTuning(4)},
}


@pytest.mark.parametrize("cache", ["static", "dynamic"])
@pytest.mark.parametrize("lengths", [[5, 5], [5, 3], [5]], ids=["unpadded", "padded", "one"])
@pytest.mark.parametrize("method", list(STATIC_SPECS))
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", DECODER_ONLY)
def test_generate_equals_each_row_alone_with_either_cache(
    arch: str, attn: str, method: str, lengths: list[int], cache: str
) -> None:
    """``generate`` with the cache it creates, static or dynamic: for every
    method, padded or not, batch 1 included. An unpadded batch brings no mask
    (``generate`` drops an all-ones one): the static cache still needs P more
    slots (it raised ``index_copy_(): index out of bounds`` under sdpa), and a
    mixed batch's pad slots must stay masked on every decode step (they were
    unmasked after the first: rows drifted from the row alone). Each row equals
    the same row generated alone with the ordinary dynamic cache."""
    model = tiny(arch, attn)
    ids, mask = batch(arch, lengths, seed=6)
    att = ph.attach(model, STATIC_SPECS[method]())
    names = ["a", "b", "c"][: len(lengths)] if method == "mixed" else ["default"] * len(lengths)
    with torch.no_grad():
        with att.use(names):
            both = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=4,
                do_sample=False,
                cache_implementation="static" if cache == "static" else None,
            )
        for row, name in enumerate(names):
            with att.use(name):
                alone = model.generate(
                    input_ids=unpad(arch, ids, mask, row), max_new_tokens=4, do_sample=False
                )
            assert torch.equal(both[row, -4:], alone[0, -4:]), (row, name)
    att.detach()


@pytest.mark.parametrize("method", list(STATIC_SPECS))
@pytest.mark.parametrize("arch", DECODER_ONLY)
def test_a_static_cache_reused_across_generate_calls(arch: str, method: str) -> None:
    """A ``StaticCache`` the user makes once and hands to several ``generate``
    calls (reset in between, as transformers asks): the prompt's slots fit in
    it each time, and every call equals the same call with its own cache."""
    model = tiny(arch, "sdpa")
    att = ph.attach(model, STATIC_SPECS[method]())
    cache = tf.StaticCache(config=model.config, max_cache_len=32)
    for seed, lengths in ((6, [5, 3]), (7, [4, 4])):
        ids, mask = batch(arch, lengths, seed=seed)
        names = ["a", "b"] if method == "mixed" else ["default", "default"]
        with torch.no_grad(), att.use(names):
            cache.reset()
            reused = model.generate(
                input_ids=ids,
                attention_mask=mask,
                past_key_values=cache,
                max_new_tokens=4,
                do_sample=False,
            )
            own = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False
            )
        assert torch.equal(reused, own), lengths
    att.detach()
