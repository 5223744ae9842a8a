"""Calls are independent, and an attached model can be copied and pickled.

* Threads: hypothesis draws batch sizes, lengths, padding, ``att.use(...)``
  selections (one prompt, or one per row, of Prompt Tuning, P-tuning and Prefix
  Tuning) and forward vs greedy ``generate``; 4 threads x 25 calls on one attached
  GPT-2, LLaMA or T5 each equal the same call made alone, bit for bit (oracle: the
  serial run). An ``att.use`` in one thread selects nothing in another, and two
  asyncio tasks interleaving inside their own ``att.use`` blocks each get their own
  prompt.
* Copies: for every method on GPT-2, LLaMA, T5 and BERT, ``copy.deepcopy`` of an
  attached model is an independent attached model (training the original leaves
  the copy unchanged; detaching either leaves the other prompted; the detached
  copy equals a deep copy taken before attaching), and ``pickle`` /
  ``torch.save`` round trips give the same outputs and can be detached (oracle:
  the bare model's outputs and state).
"""

from __future__ import annotations

import asyncio
import copy
import io
import pickle
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import prompthooks as ph
from tests.support.models import batch, model_inputs, same_snapshot, snapshot, tiny

NAMES = ("prompt", "ptuning", "prefix")


def _prompts() -> dict[str, Any]:
    return {
        "prompt": ph.PromptTuning(3),
        "ptuning": ph.PTuning(2, encoder="mlp"),
        "prefix": ph.PrefixTuning(2),
    }


@contextmanager
def _one_intra_op_thread() -> Iterator[None]:
    """Kernels split their work by the intra-op thread count; one thread per
    call keeps every reduction in one order, so equal means bit-equal."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _call_plan(arch: str) -> st.SearchStrategy[dict[str, Any]]:
    rows = st.integers(1, 3)
    return rows.flatmap(
        lambda b: st.fixed_dictionaries(
            {
                "lengths": st.lists(st.integers(1, 6), min_size=b, max_size=b),
                "use": st.one_of(
                    st.sampled_from(NAMES),
                    st.lists(st.sampled_from(NAMES), min_size=b, max_size=b),
                ),
                "generate": st.booleans(),
                "seed": st.integers(0, 2**16),
            }
        )
    )


def _run(model: nn.Module, att: ph.Attachment, arch: str, call: dict[str, Any]) -> torch.Tensor:
    ids, mask = batch(arch, call["lengths"], seed=call["seed"])
    use = call["use"] if isinstance(call["use"], str) else list(call["use"])
    with att.use(use), torch.no_grad():
        if call["generate"]:
            out: torch.Tensor = model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False
            )
            return out
        return model(**model_inputs(arch, ids, mask)).logits


THREADS, CALLS = 4, 25


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
@settings(
    max_examples=2, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_threads_calling_one_model_each_get_their_own_call(
    arch: str, data: st.DataObject, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The kernels' own path: Triton's CPU interpreter, which stands in for the GPU
    # kernels in the Triton test pass, swaps global state while it interprets and is
    # not thread-safe (compiled kernels on a GPU are). What is tested here is the
    # library's per-call state, which is the same on both paths.
    monkeypatch.setenv("PROMPTHOOKS_KERNELS", "auto")
    model = tiny(arch).eval()
    for config in (model.generation_config,):
        config.pad_token_id = 0
    att = ph.attach(model, _prompts())
    plans = data.draw(
        st.lists(_call_plan(arch), min_size=THREADS * CALLS, max_size=THREADS * CALLS)
    )
    with _one_intra_op_thread():
        serial = [_run(model, att, arch, call) for call in plans]
        results: list[torch.Tensor | None] = [None] * len(plans)
        errors: list[BaseException] = []
        start = threading.Barrier(THREADS)

        def worker(first: int) -> None:
            try:
                start.wait()
                for i in range(first, len(plans), THREADS):  # calls interleave across threads
                    results[i] = _run(model, att, arch, plans[i])
            except BaseException as error:  # reported below, with the call
                errors.append(error)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    att.detach()
    assert not errors, errors[0]
    for i, (alone, threaded) in enumerate(zip(serial, results, strict=True)):
        assert threaded is not None
        assert threaded.shape == alone.shape, plans[i]
        assert torch.equal(threaded, alone), plans[i]


def test_a_selection_in_one_thread_does_not_reach_another() -> None:
    model = tiny("gpt2").eval()
    att = ph.attach(model, _prompts())
    ids, mask = batch("gpt2", [4, 2])
    with torch.no_grad(), att.use("prefix"):
        expected = model(input_ids=ids, attention_mask=mask).logits
    inside, leave = threading.Event(), threading.Event()

    def other() -> None:
        with att.use("prompt"):
            inside.set()
            leave.wait(timeout=30)

    thread = threading.Thread(target=other)
    thread.start()
    inside.wait(timeout=30)
    try:
        with torch.no_grad(), att.use("prefix"):
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, expected)
        with pytest.raises(RuntimeError, match="att.use"):  # nothing selected in this thread
            model(input_ids=ids, attention_mask=mask)
    finally:
        leave.set()
        thread.join()
    att.detach()


def test_asyncio_tasks_keep_their_own_selection() -> None:
    """Two tasks of one event loop, each inside its own ``att.use`` across awaits:
    each call uses its own task's prompt (oracle: the same call made alone)."""
    model = tiny("gpt2").eval()
    att = ph.attach(model, _prompts())
    ids, mask = batch("gpt2", [4, 2])

    def call() -> torch.Tensor:
        with torch.no_grad():
            logits: torch.Tensor = model(input_ids=ids, attention_mask=mask).logits
        return logits

    alone = {}
    for name in ("prompt", "prefix"):
        with att.use(name):
            alone[name] = call()

    async def task(name: str, results: dict[str, list[torch.Tensor]]) -> None:
        with att.use(name):
            for _ in range(3):
                await asyncio.sleep(0)  # the other task runs here, inside its own block
                results[name].append(call())

    async def both() -> dict[str, list[torch.Tensor]]:
        results: dict[str, list[torch.Tensor]] = {"prompt": [], "prefix": []}
        await asyncio.gather(task("prompt", results), task("prefix", results))
        return results

    results = asyncio.run(both())
    att.detach()
    assert not torch.equal(alone["prompt"], alone["prefix"])
    for name, outputs in results.items():
        assert len(outputs) == 3
        assert all(torch.equal(out, alone[name]) for out in outputs)


# -- copies and pickles ----------------------------------------------------------

SPECS: dict[str, Callable[[], Any]] = {
    "prompt": lambda: ph.PromptTuning(3),
    "p_tuning": lambda: ph.PTuning(3),
    "prefix": lambda: ph.PrefixTuning(2),
    "ptv2": lambda: ph.PrefixTuning(2, projection=False),
}


def _outputs(model: nn.Module, arch: str) -> torch.Tensor:
    ids, mask = batch(arch, [5, 3], seed=4)
    with torch.no_grad():
        logits: torch.Tensor = model(**model_inputs(arch, ids, mask)).logits
    return logits


def _train_a_step(att: ph.Attachment) -> None:
    with torch.no_grad():
        for p in att.parameters():
            p.add_(0.5)


@pytest.mark.parametrize("method", list(SPECS))
@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5", "bert"])
def test_a_deep_copy_is_an_independent_attached_model(arch: str, method: str) -> None:
    model = tiny(arch).eval()
    bare = _outputs(model, arch)
    before = copy.deepcopy(model)
    att = ph.attach(model, SPECS[method]())
    _train_a_step(att)  # away from any init that might leave outputs unchanged
    prompted = _outputs(model, arch)
    assert not torch.equal(prompted, bare)

    twin = copy.deepcopy(model)
    twin_att = ph.attachment(twin)
    assert torch.equal(_outputs(twin, arch), prompted)
    with pytest.raises(ValueError, match="already attached"):
        ph.attach(twin, ph.PromptTuning(2))

    _train_a_step(att)  # training the original leaves the copy as it was
    assert not torch.equal(_outputs(model, arch), prompted)
    assert torch.equal(_outputs(twin, arch), prompted)

    att.detach()  # detaching the original leaves the copy prompted
    assert torch.equal(_outputs(model, arch), bare)
    assert torch.equal(_outputs(twin, arch), prompted)

    twin_att.detach()  # ... and the detached copy is the model before attaching
    assert same_snapshot(snapshot(twin), snapshot(before))
    assert torch.equal(_outputs(twin, arch), bare)


@pytest.mark.parametrize("method", list(SPECS))
@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5", "bert"])
@pytest.mark.parametrize("via", ["pickle", "torch.save"])
def test_an_attached_model_round_trips_through_pickle(arch: str, method: str, via: str) -> None:
    model = tiny(arch).eval()
    bare = snapshot(model)
    bare_out = _outputs(model, arch)
    att = ph.attach(model, SPECS[method]())
    _train_a_step(att)
    prompted = _outputs(model, arch)
    if via == "pickle":
        loaded = pickle.loads(pickle.dumps(model))
    else:
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
    assert torch.equal(_outputs(loaded, arch), prompted)
    ph.attachment(loaded).detach()
    assert same_snapshot(snapshot(loaded), bare)
    assert torch.equal(_outputs(loaded, arch), bare_out)
    assert torch.equal(_outputs(model, arch), prompted)  # the original is still attached
    att.detach()


def test_a_copys_selection_is_its_own() -> None:
    model = tiny("llama").eval()
    att = ph.attach(model, _prompts())
    twin = copy.deepcopy(model)
    with att.use("prompt"), pytest.raises(RuntimeError, match="att.use"):
        _outputs(twin, "llama")  # the original's selection does not select for the copy
    with ph.attachment(twin).use("prompt"):
        copied = _outputs(twin, "llama")
    with att.use("prompt"):
        assert torch.equal(_outputs(model, "llama"), copied)
    att.detach()


@pytest.mark.parametrize("reentrant", [False, True])
def test_an_unpickled_copy_trains_with_gradient_checkpointing(reentrant: bool) -> None:
    """Checkpointed layers run again in ``backward``, after the call: a copy must
    find its own call's plan there (oracle: the original without checkpointing)."""
    model = tiny("llama").train()
    ids, mask = batch("llama", [6, 3, 5], seed=2)
    kw = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    att = ph.attach(model, ph.PrefixTuning(2, hidden_size=16))
    loss = model(**kw).loss
    loss.backward()
    expected = [p.grad.clone() for p in att.parameters() if p.grad is not None]
    att.prompts.zero_grad()
    twin = pickle.loads(pickle.dumps(model))
    twin.gradient_checkpointing_enable({"use_reentrant": reentrant})
    twin_loss = twin(**kw).loss
    twin_loss.backward()
    got = [p.grad for p in ph.attachment(twin).parameters() if p.grad is not None]
    torch.testing.assert_close(twin_loss, loss, atol=1e-6, rtol=0)
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected, strict=True):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    att.detach()
