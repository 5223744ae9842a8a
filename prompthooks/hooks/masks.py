"""Attention-mask arithmetic for prompts: the columns a prefix adds in front of
the keys, and the 2-D padding mask behind the masks ``generate`` prepares for
static caches. One module, so every hook lengthens masks the same way."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .prefix_rows import PrefixRows


def padding_mask(mask: Any, length: int, cache: Any) -> torch.Tensor | None:
    """The 2-D padding mask ``(B, length)`` behind the attention mask a stack was
    given (``None`` and 2-D masks come back as they are).

    ``generate`` prepares the masks of a static cache itself, as wide as the
    cache and in the user's view (key j is the user's token j): one 4-D mask,
    or a dict of them, one per layer type (Qwen2, Qwen3, Gemma 3), which the
    model then uses as they are. Their padding is read back from the
    full-attention mask, whose last query row sees every real key up to itself;
    the hooks hand the model the lengthened 2-D mask instead, and it builds
    each layer type's mask from that and the cache (sliding windows included),
    as it does for a dynamic cache. A sliding-window mask hides the padding of
    the keys outside its window, so without a full-attention mask (Mistral:
    every layer slides) the call is refused. ``None`` comes back for no
    padding (a full-attention mask left out for sdpa's causal shortcut).
    """
    given: torch.Tensor | None
    if isinstance(mask, dict):
        if "full_attention" not in mask:
            raise NotImplementedError(
                "generate prepared one attention mask per layer type "
                f"({', '.join(map(str, mask))}) and none for full attention, so prompthooks "
                "cannot read the padding back to lengthen it. Use the default dynamic cache "
                "(drop cache_implementation='static')"
            )
        given = mask["full_attention"]  # None: no padding (left to sdpa's is_causal)
    else:
        given = mask
        if given is not None and given.ndim == 4 and any(getattr(cache, "is_sliding", ())):
            raise NotImplementedError(
                f"{type(cache).__name__} has sliding-window layers and generate prepared one "
                "sliding-window attention mask for all of them (as for Mistral), which hides "
                "the padding outside its window, so prompthooks cannot lengthen it. Use the "
                "default dynamic cache (drop cache_implementation='static')"
            )
    if given is None or given.ndim == 2:
        return given
    if given.ndim != 4:
        raise ValueError(
            f"prompthooks needs a 2-D (batch, length) attention_mask, got shape "
            f"{tuple(given.shape)}; pass the padding mask and let the model build the rest"
        )
    allowed = given if given.dtype == torch.bool else given == 0
    valid = allowed[:, 0, -1, :]  # (B, keys): the last query sees every real key
    if allowed.shape[-2] > 1:  # one query (a decode step) is its own padding: nothing to check
        _check_causal_padding(allowed, valid)
    return valid[:, :length].long()


_CUSTOM_4D = (
    "the 4-D attention_mask is not a causal mask over padding (packed sequences, trees, "
    "per-head masks?); prompthooks reads a 4-D mask only as the kind generate prepares "
    "for a static cache, and would keep only its padding. Pass the 2-D padding mask"
)


def _check_causal_padding(allowed: torch.Tensor, valid: torch.Tensor) -> None:
    """Refuse a 4-D mask that its padding does not describe: each query row must
    see exactly the real keys up to its last visible one (as the masks ``generate``
    prepares do), or reading back its padding would drop the rest silently."""
    keys = torch.arange(allowed.shape[-1], device=allowed.device)
    last = torch.where(allowed, keys, -1).amax(dim=-1, keepdim=True)  # (B, H, Q, 1)
    expected = valid[:, None, None, :] & (keys <= last)
    same = (allowed == expected).all()
    if torch.compiler.is_compiling():  # no host sync inside a graph
        torch._assert_async(same, _CUSTOM_4D)
    elif not bool(same):
        raise ValueError(_CUSTOM_4D)


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


def prepend_attend(mask: torch.Tensor, rows: PrefixRows) -> torch.Tensor:
    """A 2-D padding mask with the prefix's leading columns: ones, or each row's
    ``keep`` pattern (the slots its own prefix fills)."""
    if rows.keep is None:
        front = mask.new_ones(mask.shape[0], rows.width)
    else:
        front = rows.keep.to(mask.dtype)
    return torch.cat([front, mask], dim=1)


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
