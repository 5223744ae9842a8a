"""Take a call's virtual positions out of the per-position outputs it returns,
so the user sees their own sequence length (``Insertion`` says where they are)."""

from __future__ import annotations

from typing import Any

import torch

from .insertion import Insertion
from .layout import strip


def strip_outputs(output: Any, ins: Insertion, encoder_decoder: bool) -> Any:
    """``output`` (a ``ModelOutput``, a tuple or a tensor) without the virtual
    positions. Of an encoder-decoder model's outputs, only the encoder's hold
    them (and the cross-attention weights, along their keys)."""
    if isinstance(output, dict):  # transformers' ModelOutput
        for key in list(output.keys()):
            value = output[key]
            stripped = _strip_field(key, value, ins, encoder_decoder)
            if stripped is not None and stripped is not value:
                output[key] = stripped
        return output
    if encoder_decoder:
        # Without field names the decoder's outputs cannot be told from the
        # encoder's; the decoder's are the user's length already.
        return None
    if isinstance(output, tuple):
        return tuple(_strip_any(v, ins) for v in output)
    return _strip_any(output, ins)


def _strip_field(key: str, value: Any, ins: Insertion, encoder_decoder: bool) -> Any:
    if encoder_decoder and not key.startswith("encoder_") and key != "cross_attentions":
        return None
    if key.endswith("attentions") and isinstance(value, tuple):
        if key == "cross_attentions":  # (B, H, L_dec, L_enc): keys only
            return tuple(_strip_dim(a, ins, 3) for a in value)
        return tuple(_strip_dim(_strip_dim(a, ins, 2), ins, 3) for a in value)
    return _strip_any(value, ins)


def _strip_dim(x: Any, ins: Insertion, dim: int) -> Any:
    if not (isinstance(x, torch.Tensor) and x.ndim > dim and x.shape[dim] == ins.length):
        return x
    rows = ins.rows
    if ins.at_front:  # a view: no copy of vocabulary-sized logits (see benchmarks/overhead.py)
        return x.narrow(dim, rows.width, ins.length - rows.width)
    return strip(x, ins.at, rows.counts, rows.width, rows.pad_side, dim)


def _strip_any(value: Any, ins: Insertion) -> Any:
    """Strip per-position tensors ``(B, L+P, ...)``; recurse into tuples of them."""
    if isinstance(value, tuple):
        return tuple(_strip_any(v, ins) for v in value)
    if isinstance(value, torch.Tensor) and value.ndim >= 3:
        return _strip_dim(value, ins, 1)
    return value
