"""Prefixes in front of the key and value *inputs* of ``nn.MultiheadAttention``.

``torch.nn.MultiheadAttention`` takes no cache: it projects its ``key`` and
``value`` inputs itself. A prefix for it lives in the module's input space:
P vectors go in front of ``key`` and P in front of ``value``, and the module's
own projections turn them into P keys and P values. When the key and value
projections are invertible (square and full rank, the usual case) every prefix
of keys and values has such an input-space form, so nothing is lost against a
prefix of keys and values, and the prefix's shape is ``(1, P, width)`` per
site (``AttentionSite(num_kv_heads=1, head_dim=width)``).

One model call goes through:

1. ``model_pre`` (a pre-hook on the user-facing model) opens the call's frame
   (``calls``), and ``model_post`` closes it.
2. ``site_pre`` on every attention module: on the first site of the call the
   prefixes run once (for the batch size the site sees); each site gets its
   key and value inputs lengthened by the prefix, and its ``key_padding_mask``
   and ``attn_mask`` gain P leading columns that attend. ``is_causal`` is
   dropped: it promises a square causal mask, which the lengthened mask is not.

PyTorch's fused fast paths stay out of the way per module, never process-wide
(other models in the process keep them): while attached, every
``nn.TransformerEncoder`` holding a site has ``use_nested_tensor`` off (with it
on, eval-mode calls without autograd pack a padded batch into a nested tensor
and drop the padding mask before the layers run, and a prefix of P unpadded
keys cannot be put in front of that); a ``TransformerEncoderLayer`` skips its
fused kernel by itself when a submodule has hooks, and an attention module
whose key input is not its query input takes the regular path.

Mixed batches (``att.use([...])``) give every row ``width`` slots with its own
prefix right-aligned in them and the slots in front of it masked, as the cache
sites do.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..kernels import prefix_concat
from ..locators.base import Located
from .arguments import Kwargs
from .bank import PromptBank
from .calls import Frames
from .masks import attn_mask_columns, key_padding_columns
from .prefix_rows import KeyValues, PrefixRows, build_rows

_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")


@dataclass
class InputPrefixCall:
    """One model call's prefix layout and keys/values, built by its first site."""

    rows: PrefixRows | None = None
    kv: KeyValues | None = None


class InputPrefixHooks:
    """The hook functions of one attachment's prefixes on ``inputs`` sites;
    each call's state lives in its frame (``calls``)."""

    def __init__(self, located: Located, bank: PromptBank) -> None:
        self.located = located
        self.bank = bank
        self.sites = located.sites
        self.frames: Frames[InputPrefixCall] = Frames()
        self._handles: list[RemovableHandle] = []
        # Encoders whose nested-tensor path is off while attached, with their own setting.
        self._nested: list[tuple[nn.TransformerEncoder, bool]] = []

    def install(self) -> None:
        model = self.located.model
        # One handle at a time: a registration that fails leaves the earlier
        # ones in ``_handles``, so ``remove`` undoes a partial install.
        self._handles.append(model.register_forward_pre_hook(self.model_pre, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self.model_post, always_call=True))
        for index in range(len(self.sites)):
            module = self.sites[index].module
            hook = functools.partial(self.site_pre, index)
            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        sites = {id(site.module) for site in self.sites}
        for encoder in model.modules():
            if isinstance(encoder, nn.TransformerEncoder) and any(
                id(m) in sites for m in encoder.modules()
            ):
                self._nested.append((encoder, encoder.use_nested_tensor))
                encoder.use_nested_tensor = False

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for encoder, setting in reversed(self._nested):
            encoder.use_nested_tensor = setting
        self._nested = []

    # -- the model ---------------------------------------------------------------

    def model_pre(self, module: nn.Module, args: tuple[Any, ...], kwargs: Kwargs) -> None:
        self.frames.open("model", InputPrefixCall())

    def model_post(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.frames.close("model")

    # -- attention -----------------------------------------------------------------

    def site_pre(self, index: int, module: nn.Module, args: tuple[Any, ...], kwargs: Kwargs) -> Any:
        frame = self.frames.current()
        # An attention module called on its own: its state lives for this call only.
        call = frame.state if frame is not None else InputPrefixCall()
        if not self.bank.selects("prefix"):
            return None
        kw = dict(zip(_MHA_ARGS, args, strict=False))
        kw.update(kwargs)
        query, key, value = kw["query"], kw["key"], kw["value"]
        if query.is_nested or key.is_nested:
            raise RuntimeError(
                "prefix: nn.MultiheadAttention got a nested tensor; build it from a "
                "padded batch and a key_padding_mask instead"
            )
        batched = query.ndim == 3
        batch_first = bool(getattr(module, "batch_first", False))
        batch = (query.shape[0] if batch_first else query.shape[1]) if batched else 1
        if call.kv is None:
            call.rows, call.kv = build_rows(self.bank, len(self.sites), batch)
        rows = call.rows
        assert rows is not None
        keys, values = call.kv[index]
        kw["key"] = _prepend(keys, key, batch_first, batched)
        kw["value"] = _prepend(values, value, batch_first, batched)
        pad, attn = kw.get("key_padding_mask"), kw.get("attn_mask")
        length = _length(key, batch_first, batched)
        if rows.keep is not None and pad is None:  # rows must not see their unused slots
            pad = torch.zeros(batch, length, dtype=torch.bool, device=key.device)
        if pad is not None:
            kw["key_padding_mask"] = key_padding_columns(pad, rows, batched)
        if attn is None and kw.get("is_causal"):
            # The caller promised a causal mask and let the module skip it; the
            # prefix makes the mask non-square, so it is written out.
            queries = _length(query, batch_first, batched)
            attn = torch.ones(queries, length, dtype=torch.bool, device=key.device).triu(1)
        if attn is not None:
            kw["attn_mask"] = attn_mask_columns(attn, rows)
        kw["is_causal"] = False
        return (), kw


def _length(x: torch.Tensor, batch_first: bool, batched: bool) -> int:
    """Sequence length of a key or value input."""
    if not batched:
        return int(x.shape[0])
    return int(x.shape[1] if batch_first else x.shape[0])


def _prepend(
    prefix: torch.Tensor, x: torch.Tensor, batch_first: bool, batched: bool
) -> torch.Tensor:
    """``[prefix ; x]`` along the sequence, in ``x``'s layout and dtype.

    ``prefix`` is ``(1, P, E)`` shared or ``(B, 1, W, E)`` per row; the concat
    kernel works on ``(B, heads, length, E)``, so ``x`` goes in as one head.
    """
    rows = x.unsqueeze(0) if not batched else (x if batch_first else x.transpose(0, 1))
    out = prefix_concat(prefix, rows.unsqueeze(1)).squeeze(1)
    if not batched:
        return out.squeeze(0)
    return out if batch_first else out.transpose(0, 1)
