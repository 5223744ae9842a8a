"""Token splice in Triton: one pass over the embedding output.

Each program copies one block of one token's vector: the prompt-table row (cast
to the embedding dtype beforehand, a P x hidden copy) when
the token's id is virtual (``>= vocab_size``), the embedding otherwise. No index
of virtual positions is ever built. Backward writes the embedding gradient
(zero at virtual positions) and adds each virtual position's gradient into its
table row with atomics, in fp32, so rows used several times add up.

Imported only when Triton is installed; chosen by ``kernels.splice_tokens``
for CUDA tensors (or when forced). Tested on CPU with ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

BLOCK = 128


@triton.jit  # type: ignore[untyped-decorator]
def _splice_forward(
    embeds_ptr: Any,
    ids_ptr: Any,
    table_ptr: Any,
    out_ptr: Any,
    hidden: Any,
    vocab: Any,
    BLOCK: tl.constexpr,
) -> None:
    # 64-bit offsets: token * hidden passes 2**31 in large batches.
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < hidden
    tid = tl.load(ids_ptr + token).to(tl.int64)
    if tid >= vocab:
        values = tl.load(table_ptr + (tid - vocab) * hidden + cols, mask=inside)
    else:
        values = tl.load(embeds_ptr + token * hidden + cols, mask=inside)
    tl.store(out_ptr + token * hidden + cols, values, mask=inside)


@triton.jit  # type: ignore[untyped-decorator]
def _splice_backward(
    grad_out_ptr: Any,
    ids_ptr: Any,
    grad_embeds_ptr: Any,
    grad_table_ptr: Any,
    hidden: Any,
    vocab: Any,
    BLOCK: tl.constexpr,
) -> None:
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = cols < hidden
    tid = tl.load(ids_ptr + token).to(tl.int64)
    grad = tl.load(grad_out_ptr + token * hidden + cols, mask=inside)
    if tid >= vocab:
        row = grad_table_ptr + (tid - vocab) * hidden + cols
        tl.atomic_add(row, grad.to(tl.float32), mask=inside)
        grad = tl.zeros_like(grad)
    tl.store(grad_embeds_ptr + token * hidden + cols, grad, mask=inside)


def _grid(tokens: int, hidden: int) -> tuple[int, int]:
    return (tokens, triton.cdiv(hidden, BLOCK))


def _check_ids(ids: torch.Tensor, vocab_size: int, rows: int) -> None:
    """Ids past the table would be read out of bounds by the kernels, where the
    reference path raises. Asserted on the device: no host sync in the hot path."""
    torch._assert_async(
        (ids < vocab_size + rows).all(),
        f"prompthooks: an input id is >= {vocab_size + rows} (vocabulary {vocab_size} + "
        f"{rows} virtual ids): neither a real token nor a prompt's virtual id",
    )


def splice_tokens_triton(
    embeds: torch.Tensor, input_ids: torch.Tensor, table: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """Same contract as the reference ``splice_forward``."""
    hidden = embeds.shape[-1]
    flat_ids = input_ids.reshape(-1).contiguous()
    _check_ids(flat_ids, vocab_size, table.shape[0])
    flat = embeds.reshape(-1, hidden).contiguous()
    out = torch.empty_like(flat)
    # Cast the (small) table with torch, so rounding matches the reference path.
    table_c = table.to(embeds.dtype).contiguous()
    _splice_forward[_grid(flat.shape[0], hidden)](
        flat, flat_ids, table_c, out, hidden, vocab_size, BLOCK=BLOCK
    )
    return out.view(embeds.shape)


def splice_backward_triton(
    grad: torch.Tensor, input_ids: torch.Tensor, table_rows: int, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as the reference ``splice_backward``."""
    hidden = grad.shape[-1]
    flat_ids = input_ids.reshape(-1).contiguous()
    flat = grad.reshape(-1, hidden).contiguous()
    grad_embeds = torch.empty_like(flat)
    grad_table = torch.zeros(table_rows, hidden, dtype=torch.float32, device=flat.device)
    _splice_backward[_grid(flat.shape[0], hidden)](
        flat, flat_ids, grad_embeds, grad_table, hidden, vocab_size, BLOCK=BLOCK
    )
    return grad_embeds.view(grad.shape), grad_table
