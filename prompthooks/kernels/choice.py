"""Which path a kernel call takes: Triton for CUDA tensors, the torch reference elsewhere."""

from __future__ import annotations

import importlib.util
import os
from typing import Literal

import torch

Backend = Literal["auto", "torch", "triton"]
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def choose(tensor: torch.Tensor, backend: Backend | None = None) -> Literal["torch", "triton"]:
    """The path a call on ``tensor`` takes; ``backend`` (else ``PROMPTHOOKS_KERNELS``)
    forces one."""
    wanted = backend or os.environ.get("PROMPTHOOKS_KERNELS", "auto")
    if wanted not in ("auto", "torch", "triton"):
        raise ValueError(f"PROMPTHOOKS_KERNELS must be auto, torch or triton, got {wanted!r}")
    if wanted == "triton":
        if not TRITON_INSTALLED:
            raise RuntimeError(
                "the Triton kernels were requested but triton is not installed: "
                "pip install 'prompthooks[triton]'"
            )
        return "triton"
    if wanted == "auto" and TRITON_INSTALLED and tensor.is_cuda:
        return "triton"
    return "torch"
