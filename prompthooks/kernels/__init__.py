"""The hot operations, behind one dispatch point each.

``splice_tokens`` and ``prefix_concat`` are PyTorch custom ops (``ops.py``), so
``torch.compile`` treats each as one opaque operator. When they run they take
the Triton kernels for CUDA tensors if Triton is installed, and the torch
reference everywhere else. Eager ``prefix_concat`` calls that take the
reference path skip the op dispatch (it costs 30-60 us a call, and a prefix
pays it twice per layer) and run the same reference under torch's own autograd.
``PROMPTHOOKS_KERNELS`` (``auto``, ``torch`` or
``triton``) or the ``backend`` argument force a path, for tests (Triton's
interpreter runs on CPU with ``TRITON_INTERPRET=1``) and benchmarks.
"""

from __future__ import annotations

import torch

from . import ops
from .choice import Backend, choose
from .torch_concat import concat_forward


def _checked(backend: Backend | None) -> str:
    if backend not in (None, "auto", "torch", "triton"):
        raise ValueError(f"backend must be auto, torch or triton, got {backend!r}")
    return backend or ""


def _eager_reference(tensor: torch.Tensor, backend: Backend | None) -> bool:
    _checked(backend)
    return not torch.compiler.is_compiling() and choose(tensor, backend) == "torch"


def splice_tokens(
    embeds: torch.Tensor,
    input_ids: torch.Tensor,
    table: torch.Tensor,
    vocab_size: int,
    backend: Backend | None = None,
) -> torch.Tensor:
    """Rows of ``embeds`` at virtual ids (``>= vocab_size``) replaced by rows of
    ``table`` (cast to ``embeds``' dtype). Backward adds each virtual position's
    gradient into its table row."""
    out: torch.Tensor = ops.splice_tokens(embeds, input_ids, table, vocab_size, _checked(backend))
    return out


def prefix_concat(
    prefix: torch.Tensor, states: torch.Tensor, backend: Backend | None = None
) -> torch.Tensor:
    """``[prefix ; states]`` along the sequence: ``prefix`` ``(H, P, D)`` shared or
    ``(B, H, P, D)`` per row, ``states`` ``(B, H, L, D)``. Backward reduces a shared
    prefix's gradient over the batch."""
    if _eager_reference(states, backend):
        return concat_forward(prefix, states)
    out: torch.Tensor = ops.prefix_concat(prefix, states, _checked(backend))
    return out


__all__ = ["Backend", "choose", "prefix_concat", "splice_tokens"]
