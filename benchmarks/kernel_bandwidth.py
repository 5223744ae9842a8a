"""The two kernels against the torch reference path and the physical floor.

What is measured, for LLaMA-7B-like shapes (hidden 4096; 32 layers of 32 KV
heads of size 128; a 20-token prompt or prefix; fp16 on CUDA, fp32 on CPU):

* ``splice``: the embedding output ``(B, L, 4096)`` with the first 20
  positions of every row taken from the prompt table (``splice_tokens``);
  ``splice bwd``: its backward (embedding gradient, and the table gradient
  accumulated with atomics).
* ``concat x64``: ``[prefix ; states]`` for the keys and the values of 32
  layers (64 ``prefix_concat`` calls), states ``(B, 32, L, 128)``, prefix
  ``(32, 20, 128)`` shared by the batch.

Each row reports the time of the Triton kernel and of the torch reference,
and the bandwidth each achieves: bytes that must move (every input read once,
every output written once) over time. The floor is a device-to-device copy
of the same number of bytes (``dst.copy_(src)``, half of them read and half
written), the fastest any kernel can move them. Times are medians of
``--repeats`` runs after warm-up, with CUDA events on the GPU.

On a machine without CUDA the Triton kernels cannot run natively: the script
times the reference path against the copy floor on shapes that fit in memory,
and runs each kernel once under Triton's CPU interpreter on a small shape,
checking its output and gradients against the reference (``check`` column).

    python benchmarks/kernel_bandwidth.py   # CUDA if present, else CPU
    python benchmarks/kernel_bandwidth.py --batches 1 8 64 --lengths 128 1024 4096   # GPU grid
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # must be set before triton is imported (lazily, by the kernel modules)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from prompthooks.kernels import prefix_concat, splice_tokens  # noqa: E402
from prompthooks.kernels.choice import TRITON_INSTALLED  # noqa: E402

HIDDEN = 4096
LAYERS = 32
KV_HEADS = 32
HEAD_DIM = 128
P = 20
VOCAB = 32000


@dataclass
class Row:
    operation: str
    batch: int
    length: int
    megabytes: float
    times: dict[str, float]  # seconds: "triton", "torch", "copy"


def timed(function: Callable[[], object], repeats: int) -> float:
    """Median seconds of one call, after two warm-up calls."""
    for _ in range(2):
        function()
    samples = []
    for _ in range(repeats):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1000)
        else:
            begin = time.perf_counter()
            function()
            samples.append(time.perf_counter() - begin)
    return statistics.median(samples)


def splice_inputs(
    batch: int, length: int, dtype: torch.dtype, device: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    embeds = torch.randn(batch, length, HIDDEN, dtype=dtype, device=device, generator=g)
    table = torch.randn(P, HIDDEN, device=device, generator=g)  # fp32 parameters
    ids = torch.randint(0, VOCAB, (batch, length), device=device, generator=g)
    ids[:, :P] = torch.arange(VOCAB, VOCAB + P, device=device)
    return embeds, ids, table


def concat_inputs(
    batch: int, length: int, dtype: torch.dtype, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(1)
    states = torch.randn(batch, KV_HEADS, length, HEAD_DIM, dtype=dtype, device=device, generator=g)
    prefix = torch.randn(KV_HEADS, P, HEAD_DIM, dtype=dtype, device=device, generator=g)
    return prefix, states


def copy_of(megabytes_moved: float, dtype: torch.dtype, device: str) -> Callable[[], object]:
    """A device copy that reads and writes ``megabytes_moved`` in total."""
    element_bytes = torch.finfo(dtype).bits // 8
    elements = int(megabytes_moved * 1e6 / 2 / element_bytes)
    src = torch.empty(elements, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def measure_splice(
    batch: int, length: int, dtype: torch.dtype, device: str, repeats: int, backends: list[str]
) -> list[Row]:
    """The splice forward and backward (each reads B x L x H and writes as much)."""
    embeds, ids, table = splice_inputs(batch, length, dtype, device)
    size = torch.finfo(dtype).bits // 8
    moved = (2 * batch * length * HIDDEN * size + batch * length * 8) / 1e6
    floor = timed(copy_of(moved, dtype, device), repeats)
    forward = {
        b: timed(lambda b=b: splice_tokens(embeds, ids, table, VOCAB, b), repeats) for b in backends
    }
    embeds.requires_grad_(True)
    table.requires_grad_(True)
    grad = torch.randn_like(embeds)
    backward = {}
    for backend in backends:
        out = splice_tokens(embeds, ids, table, VOCAB, backend)  # type: ignore[arg-type]
        backward[backend] = timed(
            lambda out=out: torch.autograd.grad(out, (embeds, table), grad, retain_graph=True),
            repeats,
        )
    return [
        Row("splice", batch, length, moved, {**forward, "copy": floor}),
        Row("splice bwd", batch, length, moved, {**backward, "copy": floor}),
    ]


def measure_concat(
    batch: int, length: int, dtype: torch.dtype, device: str, repeats: int, backends: list[str]
) -> Row:
    """Keys and values of every layer: 2 x LAYERS concats of one layer's shapes."""
    prefix, states = concat_inputs(batch, length, dtype, device)
    size = torch.finfo(dtype).bits // 8
    one = (batch * KV_HEADS * (2 * length + P) * HEAD_DIM * size + prefix.numel() * size) / 1e6
    calls = 2 * LAYERS

    def all_layers(backend: str) -> Callable[[], object]:
        return lambda: [prefix_concat(prefix, states, backend) for _ in range(calls)]  # type: ignore[arg-type]

    times = {b: timed(all_layers(b), repeats) for b in backends}
    times["copy"] = timed(copy_of(one, dtype, device), repeats) * calls
    return Row(f"concat x{calls}", batch, length, one * calls, times)


def interpreter_check() -> str:
    """Run both kernels once under Triton's CPU interpreter against the reference."""
    if not TRITON_INSTALLED:
        return "triton not installed"
    g = torch.Generator().manual_seed(2)
    hidden = 300  # not a multiple of the block size
    worst = 0.0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        embeds = torch.randn(3, 9, hidden, generator=g).to(dtype)
        table = torch.randn(5, hidden, generator=g)
        ids = torch.randint(0, 50, (3, 9), generator=g)
        ids[0, 2:7] = torch.arange(50, 55)
        ids[1, 0:2] = 50  # a row used twice
        outs = []
        for backend in ("torch", "triton"):
            e = embeds.clone().requires_grad_(True)
            t = table.clone().requires_grad_(True)
            out = splice_tokens(e, ids, t, 50, backend)
            out.backward(torch.ones_like(out))
            outs.append((out, e.grad, t.grad))
        prefix = torch.randn(4, 3, 70, generator=g, requires_grad=True)
        states = torch.randn(3, 4, 6, 70, generator=g).to(dtype)
        for backend in ("torch", "triton"):
            outs.append((prefix_concat(prefix, states, backend),))
        pairs = list(zip(outs[0], outs[1], strict=True)) + [(outs[2][0], outs[3][0])]
        worst = max(worst, *((a.float() - b.float()).abs().max().item() for a, b in pairs))
    return f"interpreter max |triton - torch| = {worst:.1e} (fp32/fp16/bf16)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64] if CUDA else [1, 8])
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[128, 1024, 4096] if CUDA else [128, 512]
    )
    parser.add_argument("--repeats", type=int, default=20 if CUDA else 5)
    args = parser.parse_args()
    device = "cuda" if CUDA else "cpu"
    dtype = torch.float16 if CUDA else torch.float32
    backends = ["triton", "torch"] if CUDA and TRITON_INSTALLED else ["torch"]
    where = torch.cuda.get_device_name() if CUDA else f"CPU, {torch.get_num_threads()} threads"
    print(f"# {where}; {dtype}; torch {torch.__version__}; medians of {args.repeats}")
    if not CUDA:
        print("# " + interpreter_check())
    columns = [f"{b} ms" for b in backends] + ["copy ms"] + [f"{b} GB/s" for b in backends]
    columns += ["copy GB/s"] + [f"{b} / copy" for b in backends]
    print("| operation | batch | length | MB moved | " + " | ".join(columns) + " |")
    print("|---|---:|---:|---:|" + "---:|" * len(columns))
    for batch in args.batches:
        for length in args.lengths:
            splice_rows = measure_splice(batch, length, dtype, device, args.repeats, backends)
            concat_row = measure_concat(batch, length, dtype, device, args.repeats, backends)
            for row in [*splice_rows, concat_row]:
                names = [*backends, "copy"]
                ms = [f"{row.times[n] * 1e3:.3f}" for n in names]
                rates = [f"{row.megabytes / 1e3 / row.times[n]:.1f}" for n in names]
                ratios = [f"{row.times[b] / row.times['copy']:.2f}x" for b in backends]
                cells = [row.operation, str(batch), str(length), f"{row.megabytes:.1f}"]
                print("| " + " | ".join(cells + ms + rates + ratios) + " |")


if __name__ == "__main__":
    main()
