"""What an attention module is handed in place of (or around) its cache, so
that it sees ``[prefix ; keys]``: stand-ins for a missing cache, and wrappers
around a real one that already holds the prefix."""

from __future__ import annotations

from typing import Any

import torch

from ..kernels import prefix_concat
from ..kernels.torch_concat import per_row
from ..locators.base import AttentionSite, Role
from .arguments import cache_length
from .caches import layer_cache, make_room, remember
from .prefix_rows import PrefixRows


class PrefixedKV:
    """Stands in for a missing cache: every update returns ``[prefix ; new]``.

    It stores nothing, so a training step holds no extra state, and
    ``get_seq_length`` reports the prefix as a past (T5 reads it to place its
    relative positions).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        # (H, P, D) shared by every row, or (B, H, W, D) per row
        self.keys, self.values = keys, values
        self.used = False  # the module asked for its keys (checked after the stack)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.used = True
        return prefix_concat(self.keys, key_states), prefix_concat(self.values, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.keys.shape[-2])


class StoredPrefixedKV(PrefixedKV):
    """Stands in for a sliding-window cache the model made inside its forward,
    whose layer already holds the prefix: updates are stored in it, and
    ``[prefix ; new]`` is returned whole. The layer itself returns only its
    last ``window - 1`` stored keys in front of the new ones, fewer columns
    than the padded mask has once the prefix is that long; the keys it drops
    are the ones the window hides anyway.
    """

    def __init__(self, cache: Any, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__(keys, values)
        self.cache = cache

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.cache.update(key_states, value_states, *args, **kwargs)
        return super().update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.cache.get_seq_length(layer_idx))


class AdoptsDtypes:
    """A cache whose fixed-size layer was allocated for the prefix, in the dtype
    prompthooks chose, before the model's first keys arrived. On that update the
    layer takes the dtypes of the model's keys and values (an exact widening of
    the prefix where they are wider), as it would without a prefix: under
    autocast a rotary model's keys are fp32 while its values are bf16, and a
    static layer cannot copy keys of another dtype into its slots."""

    def __init__(self, cache: Any, role: Role) -> None:
        self.cache, self.role = cache, role

    def update(
        self, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = layer_cache(self.cache, self.role).layers[layer_idx]
        if layer.keys.dtype != keys.dtype:
            layer.keys = layer.keys.to(keys.dtype)
        if layer.values.dtype != values.dtype:
            layer.values = layer.values.to(values.dtype)
        result: tuple[torch.Tensor, torch.Tensor] = self.cache.update(
            keys, values, layer_idx, *args, **kwargs
        )
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cache, name)


class GrowsPast:
    """A real cache layer handed to a site with the prefix already in it: used
    once the module has stored its own keys after the prefix."""

    def __init__(self, cache: Any, layer: int) -> None:
        self.cache, self.layer = cache, layer
        self.before = cache_length(cache, layer)

    @property
    def used(self) -> bool:
        return cache_length(self.cache, self.layer) > self.before


def batched(x: torch.Tensor, batch: int, dtype: torch.dtype) -> torch.Tensor:
    """``(H, P, D)`` shared by all rows, or already ``(B, H, W, D)``, as ``(B, H, *, D)``
    in ``dtype`` (a shared prefix is cast row by row: its gradient adds up in fp32)."""
    return x.to(dtype) if x.ndim == 4 else per_row(x, batch, dtype)


def cached_dtype(activations: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype a model's cached keys and values have, given its activations' dtype.

    Under ``torch.autocast`` the activations stay fp32 but the key and value
    projections run in the autocast dtype, and so does the cache the model
    fills. A prefix written in fp32 would promote every later ``DynamicCache``
    update to fp32 (twice the memory of the base model's cache) and make a
    ``StaticCache`` fail (``index_copy_`` of bf16 keys into fp32 slots).
    """
    if activations == torch.float32 and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return activations


def write_prefix(
    cache: Any,
    site: AttentionSite,
    rows: PrefixRows,
    keys: torch.Tensor,
    values: torch.Tensor,
    batch: int,
    dtype: torch.dtype,
) -> bool:
    """Write one site's prefix into the empty layer of a real cache, and note the
    layout on the cache (decode steps read it). Returns whether a fixed-size
    layer was allocated for it, which must then adopt the model's dtypes on its
    first update (``AdoptsDtypes``)."""
    target = layer_cache(cache, site.role)
    if target is None:
        raise TypeError(f"{type(cache).__name__} has no cross-attention cache")
    if cache_length(target, site.layer) != 0:
        raise RuntimeError(
            f"prefix: layer {site.layer}'s cache is not empty at the start of a sequence"
        )
    # (Encoder-decoder caches are not wrapped: modules test their class. T5's and
    # BART's keys and values share one dtype anyway: no rotary embedding.)
    adopting = make_room(target, site.layer, rows.width) and target is cache
    k = batched(keys, batch, dtype).contiguous()
    v = batched(values, batch, dtype).contiguous()
    target.update(k, v, site.layer)
    remember(cache, "prefix", rows)
    return adopting
