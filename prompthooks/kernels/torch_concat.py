"""Prefix concat: a layer's prefix keys (or values) in front of its real ones.

This is the torch reference path, correct on any device. ``prefix`` is
``(H, P, D)`` shared by every row or ``(B, H, P, D)`` per row (mixed
batches); ``states`` is ``(B, H, L, D)``; the result is ``(B, H, P + L, D)``
in ``states``' dtype. The backward (``ops.py``) needs no kernel: slices of the
output gradient, summed over the batch for a shared prefix.

Mixed precision: the prefix (fp32 parameters, usually) is cast to the states'
dtype row by row, so a shared prefix's gradient is summed over the rows in at
least fp32 and cast back once, as the token splice's table gradient is. Summing
bf16 or fp16 row gradients in their own dtype would round the sum (bf16) or
overflow where the fp32 sum does not (fp16 with a scaled loss).
"""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype in which gradients of a tensor of ``dtype`` used by several rows
    add up: at least fp32."""
    return torch.promote_types(dtype, torch.float32)


def per_row(prefix: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """A shared ``(H, P, D)`` prefix as ``(B, H, P, D)`` in ``dtype``, cast after
    expanding: under autograd its gradient adds up over the rows in at least fp32.
    Without a cast (same dtype) it is a view, no copy."""
    wide = prefix.to(accumulation_dtype(prefix.dtype))
    return wide.unsqueeze(0).expand(batch, *prefix.shape).to(dtype)


def concat_forward(prefix: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    if prefix.ndim == 3:
        prefix = per_row(prefix, states.shape[0], states.dtype)
    else:
        prefix = prefix.to(states.dtype)
    return torch.cat([prefix, states], dim=-2)
