"""Prefix hooks for attention that takes no key/value cache (DistilBERT):
the prefix goes in through the module's key and value projections instead."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..kernels import prefix_concat
from ..locators.base import AttentionSite
from .arguments import Kwargs, bind_kwargs
from .checks import not_applied
from .masks import pad_mask

if TYPE_CHECKING:
    from .prefix import PrefixHooks


class ProjectionSites:
    """The hooks of one attachment's ``prefix_in="projections"`` sites. Their
    per-call state (``PrefixCall.armed``) lives in the running stack's frame."""

    def __init__(self, hooks: PrefixHooks) -> None:
        self.hooks = hooks

    def install(self, index: int, site: AttentionSite) -> None:
        """Hooks for a site with ``prefix_in="projections"`` (DistilBERT).

        The module's ``hidden_states`` get W leading zero rows; the forward
        hooks on its key and value projections replace those rows' outputs
        with the prefix, so the attention sees ``[prefix ; keys]``. The W query
        rows they add attend to every key (no row is fully masked, so no NaN
        reaches a gradient) and are dropped from the module's output.
        """
        key_proj, value_proj = site.key_proj, site.value_proj
        if key_proj is None or value_proj is None:
            raise TypeError(
                f"attention site at layer {site.layer} has prefix_in='projections' but no "
                "key_proj / value_proj module"
            )
        handles = self.hooks.handles
        pre = functools.partial(self.site_pre, index)
        handles.append(site.module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(key_proj.register_forward_hook(functools.partial(self.projected, index, 0)))
        handles.append(
            value_proj.register_forward_hook(functools.partial(self.projected, index, 1))
        )
        # before transformers' own output recorders (``output_attentions``)
        post = functools.partial(self.site_post, index)
        handles.append(site.module.register_forward_hook(post, prepend=True))

    def site_pre(self, index: int, module: nn.Module, args: tuple[Any, ...], kwargs: Kwargs) -> Any:
        site = self.hooks.sites[index]
        call = self.hooks.running(self.hooks.sites[index].role)
        if call is None:
            return None
        call.armed.pop(index, None)
        rows = call.rows
        if rows is None:
            return None
        if site.role not in call.proxy:
            raise TypeError(
                f"{type(module).__name__} takes no key/value cache, so a prefix cannot "
                "be given as a past: call the model without past_key_values"
            )
        if len(args) > 1:
            kw, args = bind_kwargs(module, args, kwargs), ()
        else:
            kw = dict(kwargs)
        hidden = args[0] if args else kw["hidden_states"]
        width = rows.width
        zeros = hidden.new_zeros(hidden.shape[0], width, hidden.shape[-1])
        extended = torch.cat([zeros, hidden], dim=1)
        if args:
            args = (extended,)
        else:
            kw["hidden_states"] = extended
        kv = self.hooks.attention.proxy_kv(call, index, hidden.shape[0])
        call.armed[index] = {"kv": kv, "width": width, "projected": 0}
        mask_name = site.mask_arg
        assert mask_name is not None  # checked at attach
        mask = kw.get(mask_name)
        seen = call.padded.get(site.role)
        if seen is not None and seen[0] is mask:  # every layer gets the same mask
            kw[mask_name] = seen[1]
            return args, kw
        padded = pad_mask(mask, rows, hidden.shape[1], site.causal, hidden.dtype, hidden.device)
        if padded is not None and padded.shape[-2] != 1:  # one mask row per query
            attend = True if padded.dtype == torch.bool else 0.0
            front = padded.new_full((*padded.shape[:-2], width, padded.shape[-1]), attend)
            padded = torch.cat([front, padded], dim=-2)
        call.padded[site.role] = (mask, padded)
        kw[mask_name] = padded
        return args, kw

    def projected(
        self, index: int, part: int, module: nn.Module, args: tuple[Any, ...], output: torch.Tensor
    ) -> Any:
        """A key (``part`` 0) or value (1) projection's output: the prefix in its leading rows."""
        call = self.hooks.running(self.hooks.sites[index].role)
        armed = call.armed.get(index) if call is not None else None
        if armed is None:
            return None
        site = self.hooks.sites[index]
        width = armed["width"]
        armed["projected"] += 1
        b, length = output.shape[0], output.shape[1] - width
        real = output[:, width:].view(b, length, site.num_kv_heads, site.head_dim)
        joined = prefix_concat(armed["kv"][part], real.transpose(1, 2))
        return joined.transpose(1, 2).reshape(b, width + length, -1)

    def site_post(self, index: int, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        call = self.hooks.running(self.hooks.sites[index].role)
        armed = call.armed.pop(index, None) if call is not None else None
        if armed is None:
            return None
        width, projected = armed["width"], armed["projected"]
        if projected != 2:
            raise not_applied(
                self.hooks.located,
                module,
                f"the prefix reached {projected} of its key and value projections",
                f"{type(module).__name__} to run its key and value projections once each per call",
            )
        if isinstance(output, tuple):  # (attention output, weights or None)
            weights = output[1] if len(output) > 1 else None
            if isinstance(weights, torch.Tensor):  # (B, H, queries, keys): drop queries
                weights = weights[:, :, width:]
            return (output[0][:, width:], weights, *output[2:])
        return output[:, width:]
