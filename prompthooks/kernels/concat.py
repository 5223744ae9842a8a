"""Prefix concat: a layer's prefix keys (or values) in front of its real ones.

This is the torch reference path, correct on any device. ``prefix`` is
``(H, P, D)`` shared by every row or ``(B, H, P, D)`` per row (mixed
batches); ``states`` is ``(B, H, L, D)``; the result is ``(B, H, P + L, D)``
in ``states``' dtype. The backward (``ops.py``) needs no kernel: slices of the
output gradient, summed over the batch for a shared prefix.
"""

from __future__ import annotations

import torch


def concat_forward(prefix: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    prefix = prefix.to(states.dtype)
    if prefix.ndim == 3:
        prefix = prefix.unsqueeze(0).expand(states.shape[0], -1, -1, -1)
    return torch.cat([prefix, states], dim=-2)
