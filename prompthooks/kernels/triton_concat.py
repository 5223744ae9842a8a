"""Prefix concat in Triton: ``[prefix ; states]`` written in one pass.

Each program writes one block of one output vector ``out[b, h, s]``: from the
prefix when ``s < P`` (the same prefix row for every ``b`` when it is shared,
so it is never expanded in memory), from ``states`` otherwise. The backward
needs no kernel (see ``ops.py``).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

BLOCK = 64


@triton.jit  # type: ignore[untyped-decorator]
def _concat_forward(
    prefix_ptr: Any,
    states_ptr: Any,
    out_ptr: Any,
    heads: Any,
    count: Any,
    length: Any,
    dim: Any,
    shared: tl.constexpr,
    BLOCK: tl.constexpr,
) -> None:
    # over B * H * (P + L); 64-bit, since vector * dim passes 2**31 for long caches
    vector = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < dim
    s = vector % (count + length)
    bh = vector // (count + length)
    if s < count:
        if shared:
            source = prefix_ptr + ((bh % heads) * count + s) * dim
        else:
            source = prefix_ptr + (bh * count + s) * dim
    else:
        source = states_ptr + (bh * length + (s - count)) * dim
    tl.store(out_ptr + vector * dim + cols, tl.load(source + cols, mask=inside), mask=inside)


def prefix_concat_triton(prefix: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """Same contract as the reference ``concat_forward``."""
    batch, heads, length, dim = states.shape
    count = prefix.shape[-2]
    states_c = states.contiguous()
    prefix_c = prefix.to(states.dtype).contiguous()
    out = torch.empty(batch, heads, count + length, dim, dtype=states.dtype, device=states.device)
    grid = (batch * heads * (count + length), triton.cdiv(dim, BLOCK))
    _concat_forward[grid](
        prefix_c, states_c, out, heads, count, length, dim, shared=prefix.ndim == 3, BLOCK=BLOCK
    )
    return out
