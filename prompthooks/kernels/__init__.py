"""The hot operations, behind one dispatch point each.

``splice_tokens`` and ``prefix_concat`` run the Triton kernels for CUDA tensors when Triton is
installed, and the torch reference everywhere else. ``PROMPTHOOKS_KERNELS``
(``auto``, ``torch`` or ``triton``) or the ``backend`` argument force a path,
for tests (Triton's interpreter runs on CPU with ``TRITON_INTERPRET=1``) and
benchmarks.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch

from .concat import prefix_concat as prefix_concat_torch
from .splice import splice_tokens as splice_tokens_torch

Backend = Literal["auto", "torch", "triton"]
_TRITON = importlib.util.find_spec("triton") is not None


def choose(tensor: torch.Tensor, backend: Backend | None = None) -> Literal["torch", "triton"]:
    """The path a call on ``tensor`` takes."""
    wanted = backend or os.environ.get("PROMPTHOOKS_KERNELS", "auto")
    if wanted not in ("auto", "torch", "triton"):
        raise ValueError(f"PROMPTHOOKS_KERNELS must be auto, torch or triton, got {wanted!r}")
    if wanted == "triton":
        if not _TRITON:
            raise RuntimeError("the Triton path was requested but triton is not installed")
        return "triton"
    if wanted == "auto" and _TRITON and tensor.is_cuda:
        return "triton"
    return "torch"


def splice_tokens(
    embeds: torch.Tensor,
    input_ids: torch.Tensor,
    table: torch.Tensor,
    vocab_size: int,
    backend: Backend | None = None,
) -> torch.Tensor:
    """Rows of ``embeds`` at virtual ids (``>= vocab_size``) replaced by rows of ``table``."""
    if choose(embeds, backend) == "triton":
        from .triton_splice import splice_tokens_triton

        return splice_tokens_triton(embeds, input_ids, table, vocab_size)
    return splice_tokens_torch(embeds, input_ids, table, vocab_size)


def prefix_concat(
    prefix: torch.Tensor, states: torch.Tensor, backend: Backend | None = None
) -> torch.Tensor:
    """``[prefix ; states]`` along the sequence (see ``concat.py`` for the shapes)."""
    if choose(states, backend) == "triton":
        from .triton_concat import prefix_concat_triton

        return prefix_concat_triton(prefix, states)
    return prefix_concat_torch(prefix, states)


__all__ = ["choose", "prefix_concat", "prefix_concat_torch", "splice_tokens", "splice_tokens_torch"]
