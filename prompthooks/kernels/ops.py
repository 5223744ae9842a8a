"""The two hot operations as PyTorch custom ops (``torch.ops.prompthooks.*``).

Registering them with ``torch.library`` makes each one opaque to
``torch.compile``: the compiler sees an operator with a known output shape (the
fake implementations below) and a known backward, and never looks inside, so a
model with prompts attached compiles without graph breaks and the Triton kernels
run inside compiled graphs. Each op picks its path when it runs, on real
tensors: ``backend`` is ``"auto"``, ``"torch"`` or ``"triton"``, and ``""``
defers to ``PROMPTHOOKS_KERNELS`` (see ``__init__.py``).
"""

from __future__ import annotations

from typing import Any

import torch

from . import torch_concat, torch_splice
from .choice import choose


def _triton(tensor: torch.Tensor, backend: str) -> bool:
    return choose(tensor, backend or None) == "triton"  # type: ignore[arg-type]


# -- token splice ------------------------------------------------------------------


@torch.library.custom_op("prompthooks::splice_tokens", mutates_args=())
def splice_tokens(
    embeds: torch.Tensor,
    input_ids: torch.Tensor,
    table: torch.Tensor,
    vocab_size: int,
    backend: str,
) -> torch.Tensor:
    """Rows of ``embeds`` at virtual ids (``>= vocab_size``) replaced by rows of ``table``."""
    if _triton(embeds, backend):
        from . import triton_splice

        return triton_splice.splice_tokens_triton(embeds, input_ids, table, vocab_size)
    return torch_splice.splice_forward(embeds, input_ids, table, vocab_size)


@splice_tokens.register_fake
def _splice_tokens_fake(
    embeds: torch.Tensor,
    input_ids: torch.Tensor,
    table: torch.Tensor,
    vocab_size: int,
    backend: str,
) -> torch.Tensor:
    return torch.empty_like(embeds)


@torch.library.custom_op("prompthooks::splice_tokens_backward", mutates_args=())
def splice_tokens_backward(
    grad: torch.Tensor, input_ids: torch.Tensor, table_rows: int, vocab_size: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding gradient and the table gradient (fp32) of ``splice_tokens``."""
    if _triton(grad, backend):
        from . import triton_splice

        return triton_splice.splice_backward_triton(grad, input_ids, table_rows, vocab_size)
    return torch_splice.splice_backward(grad, input_ids, table_rows, vocab_size)


@splice_tokens_backward.register_fake
def _splice_tokens_backward_fake(
    grad: torch.Tensor, input_ids: torch.Tensor, table_rows: int, vocab_size: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(grad), grad.new_empty(table_rows, grad.shape[-1], dtype=torch.float32)


def _splice_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    _, input_ids, table, vocab_size, backend = inputs
    ctx.save_for_backward(input_ids)
    ctx.table_rows, ctx.table_dtype = table.shape[0], table.dtype
    ctx.vocab_size, ctx.backend = vocab_size, backend


def _splice_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    (input_ids,) = ctx.saved_tensors
    grad_embeds, grad_table = splice_tokens_backward(
        grad, input_ids, ctx.table_rows, ctx.vocab_size, ctx.backend
    )
    return grad_embeds, None, grad_table.to(ctx.table_dtype), None, None


splice_tokens.register_autograd(_splice_backward, setup_context=_splice_setup)


# -- prefix concat -----------------------------------------------------------------


@torch.library.custom_op("prompthooks::prefix_concat", mutates_args=())
def prefix_concat(prefix: torch.Tensor, states: torch.Tensor, backend: str) -> torch.Tensor:
    """``[prefix ; states]`` along the sequence (shapes in ``torch_concat.py``)."""
    if _triton(states, backend):
        from . import triton_concat

        return triton_concat.prefix_concat_triton(prefix, states)
    return torch_concat.concat_forward(prefix, states)


@prefix_concat.register_fake
def _prefix_concat_fake(prefix: torch.Tensor, states: torch.Tensor, backend: str) -> torch.Tensor:
    batch, heads, length, dim = states.shape
    return states.new_empty(batch, heads, prefix.shape[-2] + length, dim)


def _concat_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    prefix = inputs[0]
    ctx.count, ctx.shared, ctx.prefix_dtype = prefix.shape[-2], prefix.ndim == 3, prefix.dtype


def _concat_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    # The states' gradient is a slice of the output's; a shared prefix's is a sum over
    # rows, taken in at least fp32 (bf16/fp16 row gradients, fp32 parameters).
    grad_prefix = grad[:, :, : ctx.count]
    if ctx.shared:
        wide = torch.promote_types(torch_concat.accumulation_dtype(ctx.prefix_dtype), grad.dtype)
        grad_prefix = grad_prefix.sum(0, dtype=wide)
    return grad_prefix.to(ctx.prefix_dtype), grad[:, :, ctx.count :], None


prefix_concat.register_autograd(_concat_backward, setup_context=_concat_setup)
