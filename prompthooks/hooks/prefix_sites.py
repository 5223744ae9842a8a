"""The prefix hooks on attention sites and position tables: in proxy mode
(see ``prefix.py``) each attention module's cache argument becomes
``[prefix ; keys]`` and its mask gets the prefix's columns; position tables
of stacks that number positions themselves get the call's positions."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..locators.base import PositionTable, Role
from ..locators.conventions import read_cache
from .arguments import Kwargs, bind_kwargs
from .caches import layer_cache
from .masks import pad_mask
from .prefix_caches import (
    AdoptsDtypes,
    GrowsPast,
    PrefixedKV,
    StoredPrefixedKV,
    cached_dtype,
    write_prefix,
)

if TYPE_CHECKING:
    from .prefix import PrefixCall, PrefixHooks


class PrefixSites:
    """The attention-site and position-table hooks of one attachment's prefixes.
    Each call's state is the running stack call's frame (``PrefixHooks.running``)."""

    def __init__(self, hooks: PrefixHooks) -> None:
        self.hooks = hooks

    def renumber(
        self,
        roles: frozenset[Role],
        table: PositionTable,
        module: nn.Module,
        args: tuple[Any, ...],
        output: torch.Tensor,
    ) -> Any:
        """A position table's forward hook: its output gets the positions of this
        call's new tokens, ``start, start + 1, ...`` (see ``_stack_pre``)."""
        call = self.hooks.running(table.role)
        start = call.starts.get(roles) if call is not None else None
        if start is None:
            return None
        length = output.shape[-2]
        return table.lookup(torch.arange(length, device=output.device).unsqueeze(0) + start)

    def attention_pre(
        self, index: int, module: nn.Module, args: tuple[Any, ...], kwargs: Kwargs
    ) -> Any:
        """An attention site's pre-hook: in proxy mode its cache argument becomes
        ``[prefix ; keys]`` and its mask gets the prefix's columns."""
        frames = self.hooks.frames
        if not frames.busy and not frames.kept:  # nothing to do here: every layer,
            return None  # every decode step (the cache holds the prefix already)
        site = self.hooks.sites[index]
        call = self.hooks.running(site.role)
        rows = call.rows if call is not None else None
        if call is None or rows is None:
            return None
        adopting = index in call.adopting  # the prefill call of a fixed-size cache
        if adopting:
            call.adopting.discard(index)
            assert site.cache_arg is not None  # checked at attach
            cache = AdoptsDtypes(read_cache(kwargs, site.cache_arg), site.role)
            kwargs = {**kwargs, site.cache_arg: cache}
        proxy = site.role in call.proxy
        if not proxy and not (site.role == "cross" and call.cross_count):
            # Decode steps end here: the call's arguments stay as they came.
            return (args, kwargs) if adopting else None
        if len(args) > 1:
            kw, args = bind_kwargs(module, args, kwargs), ()
            hidden = kw["hidden_states"]
        else:
            kw = dict(kwargs)
            hidden = args[0] if args else kw["hidden_states"]
        batch = hidden.shape[0]
        if proxy:
            keys, values = self.proxy_kv(call, index, batch)
            name = site.cache_arg
            assert name is not None  # checked at attach
            cache = read_cache(kw, name)
            if cache is None:
                kw[name] = call.handed[index] = PrefixedKV(keys, values)
            else:  # a cache the model made inside its forward: keep the prefix in it
                dtype = cached_dtype(hidden.dtype, hidden.device)
                if write_prefix(cache, site, rows, keys, values, batch, dtype):
                    call.adopting.add(index)
                kw[name] = cache
                if index in call.adopting:
                    call.adopting.discard(index)
                    kw[name] = AdoptsDtypes(cache, site.role)
                call.handed[index] = GrowsPast(layer_cache(cache, site.role), site.layer)
                if site.window is not None:
                    kw[name] = call.handed[index] = StoredPrefixedKV(cache, keys, values)
        mask_name = site.mask_arg
        assert mask_name is not None  # checked at attach
        mask = kw.get(mask_name)
        # Layers of one role share a mask; sliding-window layers share theirs.
        window = site.window
        if window is None:
            seen = call.padded.get(site.role)
        else:
            seen = call.windowed.get((site.role, window))
        if seen is not None and seen[0] is mask:
            kw[mask_name] = seen[1]
        else:
            causal = site.causal and site.role != "cross"
            padded = pad_mask(
                mask, rows, hidden.shape[1], causal, hidden.dtype, hidden.device, window
            )
            if window is None:
                call.padded[site.role] = (mask, padded)
            else:
                call.windowed[(site.role, window)] = (mask, padded)
            kw[mask_name] = padded
        return args, kw

    def proxy_kv(
        self, call: PrefixCall, index: int, batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Site ``index``'s prefix keys and values for a proxy-mode module call."""
        keys, values = call.kv[index]
        if keys.requires_grad and not torch.is_grad_enabled():
            call.reentrant.add(index)  # a reentrant checkpoint's no-grad forward
        elif index in call.reentrant:
            # Its recomputation inside backward backpropagates each layer on
            # its own: give the layer its own graph to the prefix parameters
            # instead of sharing (and freeing) the one built for the call.
            keys, values = self.hooks.build(batch)[1][index]
        return keys, values
