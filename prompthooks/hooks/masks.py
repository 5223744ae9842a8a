"""Attention-mask arithmetic for prompts: the columns a prefix adds in front of
the keys, and the 2-D padding behind (and the 4-D mask rebuilt around) the masks
``generate`` makes for static caches. One module, so every hook lengthens masks
the same way."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .prefix_rows import PrefixRows


def padding_from_4d(mask: torch.Tensor, length: int) -> torch.Tensor:
    """The 2-D padding mask behind a 4-D mask that ``generate`` built for a static
    cache: the last query row sees every real key up to itself."""
    row = mask[:, 0, -1, :length]
    valid = row if row.dtype == torch.bool else row == 0
    return valid.long()


def causal_4d(valid: torch.Tensor, like: torch.Tensor, width: int, past: int) -> torch.Tensor:
    """A 4-D mask in ``like``'s format: query i (at cache position ``past + i``)
    sees key j when ``j <= past + i`` and ``valid[b, j]``; ``width`` keys."""
    queries = like.shape[-2] if past else valid.shape[1]
    keys = torch.arange(width, device=valid.device)
    rows = torch.arange(queries, device=valid.device).unsqueeze(1) + past
    padded = torch.zeros(valid.shape[0], width, dtype=torch.bool, device=valid.device)
    padded[:, : valid.shape[1]] = valid[:, :width].bool()
    allowed = (keys.unsqueeze(0) <= rows)[None, None] & padded[:, None, None, :]
    if like.dtype == torch.bool:
        return allowed
    blocked = torch.finfo(like.dtype).min
    return torch.zeros(allowed.shape, dtype=like.dtype, device=like.device).masked_fill(
        ~allowed, blocked
    )


def prefix_columns(mask: torch.Tensor, rows: PrefixRows) -> torch.Tensor:
    """The prefix's key columns for a 4-D mask ``(B or 1, heads, queries, keys)``."""
    shape = (*mask.shape[:-1], rows.width)
    attend = True if mask.dtype == torch.bool else 0.0
    if rows.keep is None:
        return mask.new_full(shape, attend)
    keep = rows.keep[:, None, None, :].expand(rows.keep.shape[0], *shape[1:])
    if mask.dtype == torch.bool:
        return keep
    blocked = torch.finfo(mask.dtype).min
    return torch.zeros(keep.shape, dtype=mask.dtype, device=mask.device).masked_fill(~keep, blocked)


def pad_mask(
    mask: torch.Tensor | None,
    rows: PrefixRows,
    query_length: int,
    causal: bool,
    dtype: torch.dtype,
    device: torch.device,
    window: int | None = None,
) -> torch.Tensor | None:
    """Give a 4-D attention mask the prefix's leading key columns.

    With a sliding ``window`` (proxy mode: no past, so query i sits at cache
    index ``width + i``), prefix slot s is seen only while ``width + i - s <
    window``, as the model's own mask would have it with the prefix cached.
    """
    width = rows.width
    if window is not None:
        queries = torch.arange(query_length, device=device).unsqueeze(1) + width
        seen = queries - torch.arange(width, device=device) < window  # (Q, W)
        # Real keys keep the model's own window (it built the mask, or left it
        # out because the real keys alone fit in the window).
        real = torch.ones(query_length, query_length, dtype=torch.bool, device=device)
        windowed = pad_mask(mask, rows, query_length, causal, dtype, device)
        if windowed is None:
            size = (1, 1, query_length, width + query_length)
            windowed = torch.zeros(size, dtype=dtype, device=device)
        allowed = torch.cat([seen, real], dim=1)[None, None]
        if windowed.dtype == torch.bool:
            return windowed & allowed
        return windowed.masked_fill(~allowed, torch.finfo(windowed.dtype).min)
    if mask is None:
        if not causal and rows.keep is None:
            return None  # no mask means "attend everything", prefix included
        # The triangle must be aligned to the bottom right: query i sees the
        # prefix and real keys 0..i. Additive float works for eager and sdpa.
        keys = torch.arange(width + query_length, device=device)
        queries = torch.arange(query_length, device=device).unsqueeze(1) + width
        allowed = (keys.unsqueeze(0) <= queries) if causal else keys.unsqueeze(0) >= 0
        allowed = allowed[None, None]
        if rows.keep is not None:
            real = torch.ones(rows.keep.shape[0], query_length, dtype=torch.bool, device=device)
            allowed = allowed & torch.cat([rows.keep, real], dim=1)[:, None, None, :]
        blocked = torch.finfo(dtype).min
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, blocked)
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(
            f"prefix tuning needs a 4-D attention mask inside attention modules, got {shape}; "
            "use attn_implementation='sdpa' or 'eager'"
        )
    if rows.keep is not None and mask.shape[0] != rows.keep.shape[0]:
        mask = mask.expand(rows.keep.shape[0], *mask.shape[1:])
    return torch.cat([prefix_columns(mask, rows), mask], dim=-1)


def prepend_attend(
    mask: torch.Tensor, rows: PrefixRows, capacity: int | None = None, past: int | None = None
) -> torch.Tensor:
    """The prefix's leading key columns: a 2-D padding mask gets ones (or each
    row's ``keep`` pattern), a ready-made 4-D mask gets True or 0.0 columns.

    ``generate`` with a static cache builds 4-D masks as wide as the cache, with
    the user's padding in the user's view (key j is the user's token j).
    Shifted right by the prefix width, the padding lands on the right keys; the
    columns pushed past the cache's capacity are dropped. The mask's causal
    part may have been built in either view, so for a causal stack (``past`` =
    cached keys, prefix included) it is imposed again in the cache's view:
    query i sees keys ``0..past+i``, never an unwritten slot.
    """
    if mask.ndim == 2:
        if rows.keep is None:
            front = mask.new_ones(mask.shape[0], rows.width)
        else:
            front = rows.keep.to(mask.dtype)
        return torch.cat([front, mask], dim=1)
    if rows.keep is not None and mask.shape[0] != rows.keep.shape[0]:
        mask = mask.expand(rows.keep.shape[0], *mask.shape[1:])
    out = torch.cat([prefix_columns(mask, rows), mask], dim=-1)
    if capacity is not None and out.shape[-1] > capacity:
        out = out[..., :capacity]
    if past is not None:
        keys = torch.arange(out.shape[-1], device=out.device)
        queries = torch.arange(out.shape[-2], device=out.device).unsqueeze(1) + past
        allowed = keys.unsqueeze(0) <= queries
        blocked = False if out.dtype == torch.bool else torch.finfo(out.dtype).min
        out = out.masked_fill(~allowed, blocked)
    return out


# -- nn.MultiheadAttention: key_padding_mask and attn_mask conventions ----------


def key_padding_columns(mask: torch.Tensor, rows: PrefixRows, batched: bool) -> torch.Tensor:
    """A ``key_padding_mask`` (True or -inf: ignore) with the prefix's columns in front."""
    mask2 = mask if batched else mask.unsqueeze(0)
    front = _key_padding_front(mask2, rows, mask2.shape[0])
    out = torch.cat([front, mask2], dim=-1)
    return out if batched else out.squeeze(0)


def attn_mask_columns(mask: torch.Tensor, rows: PrefixRows) -> torch.Tensor:
    """An ``attn_mask`` ``(L, S)`` or ``(B * heads, L, S)`` with the prefix's
    columns in front. Per-row slot masks go in ``key_padding_mask`` instead, so
    these columns all attend."""
    shape = (*mask.shape[:-1], rows.width)
    attend = False if mask.dtype == torch.bool else 0.0
    return torch.cat([mask.new_full(shape, attend), mask], dim=-1)


def _key_padding_front(mask: torch.Tensor, rows: PrefixRows, batch: int) -> torch.Tensor:
    """``(B, width)`` leading key-padding columns in ``mask``'s convention."""
    if rows.keep is None:
        attend = False if mask.dtype == torch.bool else 0.0
        return mask.new_full((mask.shape[0], rows.width), attend)
    ignore = ~rows.keep
    if ignore.shape[0] != batch:
        raise ValueError(f"prefix: {ignore.shape[0]} rows in the prefix layout, {batch} here")
    if mask.dtype == torch.bool:
        return ignore
    return torch.zeros(ignore.shape, dtype=mask.dtype, device=mask.device).masked_fill(
        ignore, float("-inf")
    )


def refuse_per_layer_masks(mask: object) -> None:
    """transformers hands some models one prepared mask per layer type (a dict:
    a static cache on Qwen2, Qwen3, Gemma 3), which the hooks cannot lengthen
    yet; refused with the way out rather than failing on a dict."""
    if isinstance(mask, dict):
        raise NotImplementedError(
            f"the model was given one attention mask per layer type ({', '.join(map(str, mask))}), "
            "as transformers does for a static cache on some models (Qwen2, Qwen3, Gemma 3); "
            "prompthooks cannot lengthen those yet. Use the default dynamic cache (drop "
            "cache_implementation='static')"
        )
