"""The Triton kernels against the torch reference, under Triton's CPU interpreter.

* The token splice and the prefix concat (shared and per-row prefixes), on shapes
  hypothesis draws (hidden sizes around the block size, rows without virtual
  tokens), in fp32, fp16 and bf16: forward must copy exactly the same numbers;
  backward must give the same embedding (or key) gradient and the same table
  gradient (rows used several times add up; fp32 accumulation, so compared with a
  tolerance).
* The dispatch picks Triton only for CUDA tensors unless ``PROMPTHOOKS_KERNELS`` or
  ``backend`` forces it; prompted models forced onto the Triton path give the
  reference path's logits and gradients; an id past the table is refused on both
  paths.

The interpreter is switched on by ``tests/conftest.py`` (``TRITON_INTERPRET=1``);
CI also runs the whole suite a second time forced onto the Triton path.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prompthooks as ph
from prompthooks.kernels import choose, splice_tokens
from tests.support.models import batch, tiny

VOCAB = 50

shapes = st.fixed_dictionaries(
    {
        "batch": st.integers(1, 3),
        "length": st.integers(1, 7),
        "hidden": st.sampled_from([1, 5, 127, 128, 130, 300]),  # around the block size
        "table_rows": st.integers(1, 12),
        "virtual_share": st.sampled_from([0.0, 0.3, 1.0]),  # rows with none, some, all
        "dtype": st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
        "seed": st.integers(0, 100),
    }
)


@settings(max_examples=30)
@given(case=shapes)
def test_triton_splice_equals_reference_forward_and_backward(case: dict) -> None:
    g = torch.Generator().manual_seed(case["seed"])
    b, n, h, rows = case["batch"], case["length"], case["hidden"], case["table_rows"]
    embeds = torch.randn(b, n, h, generator=g).to(case["dtype"])
    table = torch.randn(rows, h, generator=g)  # fp32 parameters, cast at the splice
    ids = torch.randint(0, VOCAB, (b, n), generator=g)
    virtual = torch.rand(b, n, generator=g) < case["virtual_share"]
    ids = torch.where(virtual, VOCAB + torch.randint(0, rows, (b, n), generator=g), ids)
    grad = torch.randn(b, n, h, generator=g).to(case["dtype"])

    results = []
    for backend in ("torch", "triton"):
        e = embeds.clone().requires_grad_(True)
        t = table.clone().requires_grad_(True)
        out = splice_tokens(e, ids, t, VOCAB, backend=backend)
        out.backward(grad)
        results.append((out.detach(), e.grad, t.grad))
    (out_ref, ge_ref, gt_ref), (out_tri, ge_tri, gt_tri) = results
    assert out_tri.dtype == case["dtype"]
    assert torch.equal(out_tri, out_ref)
    assert torch.equal(ge_tri, ge_ref)
    torch.testing.assert_close(gt_tri, gt_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_id_past_the_table_is_refused_on_both_paths(backend: str) -> None:
    """The reference path raises on an id past the prompt table; the kernel,
    which would read out of bounds there, asserts it on the device."""
    embeds, table = torch.randn(2, 4, 8), torch.randn(3, 8)
    ids = torch.tensor([[1, 2, VOCAB, VOCAB + 2], [1, VOCAB + 1, VOCAB + 3, 2]])  # 3 rows: 0..2
    with pytest.raises((IndexError, RuntimeError)) as info:
        splice_tokens(embeds, ids, table, VOCAB, backend=backend)
    if backend == "triton":
        assert f"id is >= {VOCAB + 3}" in str(info.value)
    ids[1, 2] = VOCAB + 2  # in range: both paths agree
    torch.testing.assert_close(
        splice_tokens(embeds, ids, table, VOCAB, backend=backend),
        splice_tokens(embeds, ids, table, VOCAB, backend="torch"),
    )


def test_dispatch_picks_triton_only_for_cuda_unless_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.zeros(1)
    monkeypatch.delenv("PROMPTHOOKS_KERNELS", raising=False)
    assert choose(cpu) == "torch"
    assert choose(cpu, "triton") == "triton"
    monkeypatch.setenv("PROMPTHOOKS_KERNELS", "triton")
    assert choose(cpu) == "triton"
    monkeypatch.setenv("PROMPTHOOKS_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="PROMPTHOOKS_KERNELS"):
        choose(cpu)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5", "bert"])
def test_hooks_run_the_triton_splice_end_to_end(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Forced to the Triton path, a prompted model gives the reference path's
    logits and prompt gradient: the kernel is wired into the real hooks."""
    model = tiny(arch)
    ids, mask = batch(arch, [6, 3], seed=1)
    kw = {"input_ids": ids, "attention_mask": mask}
    if arch == "t5":
        kw["decoder_input_ids"] = ids[:, :3]
    from prompthooks.kernels import triton_splice

    calls: list[int] = []
    real = triton_splice.splice_tokens_triton

    def counted(*args: object) -> torch.Tensor:
        calls.append(1)
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(triton_splice, "splice_tokens_triton", counted)
    results = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("PROMPTHOOKS_KERNELS", backend)
        torch.manual_seed(0)
        with ph.attach(model, ph.PromptTuning(4)) as att:
            logits = model(**kw).logits
            logits.square().mean().backward()
            results.append((logits.detach(), att.prompts["default"].weight.grad.clone()))
        assert len(calls) == (1 if backend == "triton" else 0)  # one forward, one splice
    (ref_logits, ref_grad), (tri_logits, tri_grad) = results
    assert torch.equal(tri_logits, ref_logits)
    torch.testing.assert_close(tri_grad, ref_grad, atol=1e-6, rtol=1e-5)


concat_shapes = st.fixed_dictionaries(
    {
        "batch": st.integers(1, 3),
        "heads": st.integers(1, 3),
        "count": st.integers(1, 9),
        "length": st.integers(1, 6),
        "dim": st.sampled_from([1, 7, 64, 65, 100]),  # around the block size
        "shared": st.booleans(),
        "dtype": st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
        "seed": st.integers(0, 100),
    }
)


@settings(max_examples=30)
@given(case=concat_shapes)
def test_triton_prefix_concat_equals_reference_forward_and_backward(case: dict) -> None:
    from prompthooks.kernels import prefix_concat

    g = torch.Generator().manual_seed(case["seed"])
    b, h, p, n, d = case["batch"], case["heads"], case["count"], case["length"], case["dim"]
    prefix_shape = (h, p, d) if case["shared"] else (b, h, p, d)
    prefix = torch.randn(*prefix_shape, generator=g)  # fp32 parameters
    # keys as attention modules make them: a transposed view, not contiguous
    states = torch.randn(b, n, h, d, generator=g).to(case["dtype"]).transpose(1, 2)
    grad = torch.randn(b, h, p + n, d, generator=g).to(case["dtype"])
    results = []
    for backend in ("torch", "triton"):
        pre = prefix.clone().requires_grad_(True)
        sta = states.detach().clone().requires_grad_(True)
        out = prefix_concat(pre, sta, backend=backend)
        out.backward(grad)
        results.append((out.detach(), pre.grad, sta.grad))
    (out_ref, gp_ref, gs_ref), (out_tri, gp_tri, gs_tri) = results
    assert out_tri.shape == (b, h, p + n, d) and out_tri.dtype == case["dtype"]
    assert torch.equal(out_tri, out_ref)
    assert torch.equal(gs_tri, gs_ref)
    tolerance = 1e-6 if case["dtype"] == torch.float32 else 2e-2
    torch.testing.assert_close(gp_tri, gp_ref, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5", "bert"])
def test_prefix_hooks_run_the_triton_concat_end_to_end(
    arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Proxy mode (no cache) forced to the Triton concat gives the reference
    path's logits and prefix gradients, on every attention role."""
    from prompthooks.kernels import triton_concat

    model = tiny(arch)
    ids, mask = batch(arch, [6, 3], seed=1)
    kw: dict = {"input_ids": ids, "attention_mask": mask}
    if arch == "t5":
        kw["decoder_input_ids"] = ids[:, :3]
    if arch != "bert":
        kw["use_cache"] = False
    calls: list[int] = []
    real = triton_concat.prefix_concat_triton

    def counted(*args: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(triton_concat, "prefix_concat_triton", counted)
    torch.manual_seed(0)
    prefix = ph.PrefixTuning(3, hidden_size=16).build(ph.locate(model))
    results = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("PROMPTHOOKS_KERNELS", backend)
        with ph.attach(model, prefix) as att:
            att.prompts.zero_grad()
            logits = model(**kw).logits
            logits.square().mean().backward()
            results.append((logits.detach(), [p.grad.clone() for p in att.parameters()]))
    sites = len(ph.locate(model).sites)
    assert len(calls) == 2 * sites  # keys and values of every site, once
    (ref_logits, ref_grads), (tri_logits, tri_grads) = results
    torch.testing.assert_close(tri_logits, ref_logits, atol=1e-6, rtol=0)
    for a, b in zip(tri_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
