"""Sequence arithmetic for virtual tokens, as pure tensor functions.

Each row gets ``count`` virtual tokens inserted at its own position ``at[b]``
(right before its first real token, or after ``[CLS]``). Everything is a
gather plus a ``where``: no Python loop over rows, no host sync.
"""

from __future__ import annotations

import torch


def insertion_points(
    attention_mask: torch.Tensor | None,
    batch: int,
    cls_first: bool,
    device: torch.device,
) -> torch.Tensor:
    """Index of each row's first real token (plus one when ``[CLS]`` stays first)."""
    if attention_mask is None:
        at = torch.zeros(batch, dtype=torch.long, device=device)
    else:
        at = attention_mask.ne(0).int().argmax(dim=1)
    return at + 1 if cls_first else at


def _new_index(
    at: torch.Tensor, length: int, count: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the lengthened sequence: source index, virtual flag, virtual offset."""
    j = torch.arange(length + count, device=at.device).unsqueeze(0)  # (1, L+P)
    start = at.unsqueeze(1)  # (B, 1)
    offset = j - start
    is_virtual = (offset >= 0) & (offset < count)
    source = torch.where(offset < 0, j, j - count).clamp(0, max(length - 1, 0))
    return source, is_virtual, offset.clamp(0, count - 1)


def insert(x: torch.Tensor, at: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """Insert ``fill`` (``(P,)`` or ``(P, *rest)``) into ``x`` ``(B, L, *rest)`` at ``at[b]``.

    A floating ``fill`` (a prompt table, fp32 parameters) is cast to ``x``'s dtype
    row by row, from at least fp32: its gradient adds up over the rows in fp32, as
    the token splice's does, not in bf16/fp16.
    """
    count = fill.shape[0]
    batch, length = x.shape[0], x.shape[1]
    source, is_virtual, offset = _new_index(at, length, count)
    rest = x.shape[2:]
    view = (batch, length + count) + (1,) * len(rest)
    index = (batch, length + count) + rest
    gathered = x.gather(1, source.view(view).expand(index))
    if fill.is_floating_point():
        fill = fill.to(torch.promote_types(fill.dtype, torch.float32))
    rows = fill.unsqueeze(0).expand(batch, *fill.shape).to(x.dtype)  # (B, P, *rest)
    filled = rows.gather(1, offset.view(view).expand(index))  # (B, L+P, *rest)
    return torch.where(is_virtual.view(view), filled, gathered)


def shift_positions(position_ids: torch.Tensor, at: torch.Tensor, count: int) -> torch.Tensor:
    """Lengthen user position ids: real tokens after the prompt move up by ``count``
    and the virtual tokens take the positions the first of them freed."""
    batch, length = position_ids.shape
    if batch != at.shape[0]:
        position_ids = position_ids.expand(at.shape[0], length)
    j = torch.arange(length, device=at.device).unsqueeze(0)
    shifted = torch.where(j >= at.unsqueeze(1), position_ids + count, position_ids)
    first = position_ids.gather(1, at.clamp(max=length - 1).unsqueeze(1))
    first = torch.where(at.unsqueeze(1) >= length, first + 1, first)
    fill_rows = first + torch.arange(count, device=at.device).unsqueeze(0)  # (B, P)
    source, is_virtual, offset = _new_index(at, length, count)
    return torch.where(is_virtual, fill_rows.gather(1, offset), shifted.gather(1, source))


def positions_from_mask(attention_mask: torch.Tensor, first: int = 0) -> torch.Tensor:
    """Positions that count real tokens only, so left padding changes nothing.

    ``first`` is the position of a row's first token (RoBERTa starts at 2)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0) + first


def strip(x: torch.Tensor, at: torch.Tensor, count: int, dim: int = 1) -> torch.Tensor:
    """Remove the ``count`` virtual positions starting at ``at[b]`` along ``dim``.

    Advanced indexing copies whole trailing rows at a time, which is faster than
    a ``gather`` with an expanded index (the index would be as large as ``x``).
    """
    length = x.shape[dim] - count
    k = torch.arange(length, device=at.device).unsqueeze(0)
    keep = torch.where(k < at.unsqueeze(1), k, k + count)  # (B, L)
    rows = torch.arange(x.shape[0], device=at.device).unsqueeze(1)
    moved = x.movedim(dim, 1)  # (B, L+P, ...) view
    return moved[rows, keep].movedim(1, dim)


# -- mixed batches: each row inserts its own number of virtual tokens ------------------
#
# Row b gets ``counts[b]`` virtual tokens at ``at[b]``; every row is then padded to
# the same ``width = max(counts)`` extra positions with ``width - counts[b]``
# masked slots, in front (decoder-only models, like left padding) or at the end
# (encoders, whose relative positions must not see a gap).


def _per_row_index(
    at: torch.Tensor, counts: torch.Tensor, length: int, width: int, pad_front: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the lengthened rows: source index, virtual flag, virtual offset, pad flag."""
    j = torch.arange(length + width, device=at.device).unsqueeze(0)  # (1, L+W)
    count = counts.unsqueeze(1)  # (B, 1)
    k = j - (width - count) if pad_front else j  # index within the row's own lengthening
    is_pad = (k < 0) | (k >= length + count)
    offset = k - at.unsqueeze(1)
    is_virtual = (offset >= 0) & (offset < count) & ~is_pad
    source = torch.where(offset < 0, k, k - count).clamp(0, max(length - 1, 0))
    return source, is_virtual, offset.clamp(0, max(width - 1, 0)), is_pad


def insert_per_row(
    x: torch.Tensor,
    at: torch.Tensor,
    counts: torch.Tensor,
    fill: torch.Tensor,
    pad: float | int | bool,
    pad_front: bool,
) -> torch.Tensor:
    """Insert ``fill[b, :counts[b]]`` (``fill`` is ``(B, W, *rest)``) into row b of
    ``x`` ``(B, L, *rest)`` at ``at[b]``, padding rows to ``L + W`` with ``pad``."""
    batch, length, width = x.shape[0], x.shape[1], fill.shape[1]
    source, is_virtual, offset, is_pad = _per_row_index(at, counts, length, width, pad_front)
    rest = x.shape[2:]
    view = (batch, length + width) + (1,) * len(rest)
    gathered = x.gather(1, source.view(view).expand((batch, length + width) + rest))
    filled = fill.to(x.dtype).gather(1, offset.view(view).expand((batch, length + width) + rest))
    out = torch.where(is_virtual.view(view), filled, gathered)
    return out.masked_fill(is_pad.view(view), pad)


def strip_per_row(
    x: torch.Tensor, at: torch.Tensor, counts: torch.Tensor, width: int, pad_front: bool, dim: int
) -> torch.Tensor:
    """Undo ``insert_per_row`` along ``dim``: keep each row's real positions."""
    length = x.shape[dim] - width
    k = torch.arange(length, device=at.device).unsqueeze(0)
    count = counts.unsqueeze(1)
    keep = torch.where(k < at.unsqueeze(1), k, k + count)
    if pad_front:
        keep = keep + (width - count)
    rows = torch.arange(x.shape[0], device=at.device).unsqueeze(1)
    return x.movedim(dim, 1)[rows, keep].movedim(1, dim)


def shift_positions_per_row(
    position_ids: torch.Tensor, at: torch.Tensor, counts: torch.Tensor, width: int, pad_front: bool
) -> torch.Tensor:
    """``shift_positions`` for a mixed batch: real tokens after a row's prompt move
    up by its length, the prompt counts on from the first real token's position."""
    batch, length = position_ids.shape
    if batch != at.shape[0]:
        position_ids = position_ids.expand(at.shape[0], length)
    k = torch.arange(length, device=at.device).unsqueeze(0)
    shifted = torch.where(k >= at.unsqueeze(1), position_ids + counts.unsqueeze(1), position_ids)
    first = position_ids.gather(1, at.clamp(max=length - 1).unsqueeze(1))
    first = torch.where(at.unsqueeze(1) >= length, first + 1, first)
    fill = first + torch.arange(width, device=at.device).unsqueeze(0)
    return insert_per_row(shifted, at, counts, fill, 0, pad_front)
