"""Sequence arithmetic for virtual tokens, as pure tensor functions.

Row b gets ``counts[b]`` virtual tokens at its own position ``at[b]`` (right
before its first real token, or after ``[CLS]``). Every row is then padded to
the same ``width = max(counts)`` extra positions with ``width - counts[b]``
masked slots, in front (decoder-only models, like left padding) or at the end
(encoders, whose relative positions must not see a gap). One prompt for the
whole batch is the case where every count is ``width``: no slot is padded.
Everything is a gather plus a ``where``: no Python loop over rows, no host sync.
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


def _per_row_index(
    at: torch.Tensor, counts: torch.Tensor, length: int, width: int, pad_front: bool | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """For the lengthened rows: source index, virtual flag, virtual offset, pad
    flag (``None`` when ``pad_front`` is ``None``: every row inserts ``width``)."""
    j = torch.arange(length + width, device=at.device).unsqueeze(0)  # (1, L+W)
    count = counts.unsqueeze(1)  # (B, 1)
    if pad_front is None:  # no pad slots: the row's own lengthening is j
        offset = j - at.unsqueeze(1)
        is_virtual = (offset >= 0) & (offset < count)
        source = torch.where(offset < 0, j, j - count).clamp(0, max(length - 1, 0))
        return source, is_virtual, offset.clamp(0, max(width - 1, 0)), None
    k = j - (width - count) if pad_front else j  # index within the row's own lengthening
    is_pad = (k < 0) | (k >= length + count)
    offset = k - at.unsqueeze(1)
    is_virtual = (offset >= 0) & (offset < count) & ~is_pad
    source = torch.where(offset < 0, k, k - count).clamp(0, max(length - 1, 0))
    return source, is_virtual, offset.clamp(0, max(width - 1, 0)), is_pad


def positions_from_mask(attention_mask: torch.Tensor, first: int = 0) -> torch.Tensor:
    """Positions that count real tokens only, so left padding changes nothing.

    ``first`` is the position of a row's first token (RoBERTa starts at 2)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0) + first


def insert(
    x: torch.Tensor,
    at: torch.Tensor,
    counts: torch.Tensor,
    fill: torch.Tensor,
    pad: float | int | bool,
    pad_front: bool | None,
) -> torch.Tensor:
    """Insert ``fill[b, :counts[b]]`` (``fill`` is ``(B, W, *rest)``) into row b of
    ``x`` ``(B, L, *rest)`` at ``at[b]``, padding rows to ``L + W`` with ``pad``
    in front (``pad_front``) or behind; ``pad_front=None`` says that every
    count is ``W``, so there is nothing to pad (and less to compute)."""
    batch, length, width = x.shape[0], x.shape[1], fill.shape[1]
    source, is_virtual, offset, is_pad = _per_row_index(at, counts, length, width, pad_front)
    rest = x.shape[2:]
    view = (batch, length + width) + (1,) * len(rest)
    gathered = x.gather(1, source.view(view).expand((batch, length + width) + rest))
    filled = fill.to(x.dtype).gather(1, offset.view(view).expand((batch, length + width) + rest))
    out = torch.where(is_virtual.view(view), filled, gathered)
    return out if is_pad is None else out.masked_fill(is_pad.view(view), pad)


def strip(
    x: torch.Tensor,
    at: torch.Tensor,
    counts: torch.Tensor,
    width: int,
    pad_front: bool | None,
    dim: int,
) -> torch.Tensor:
    """Undo ``insert`` along ``dim``: keep each row's real positions."""
    length = x.shape[dim] - width
    k = torch.arange(length, device=at.device).unsqueeze(0)
    count = counts.unsqueeze(1)
    keep = torch.where(k < at.unsqueeze(1), k, k + count)
    if pad_front:
        keep = keep + (width - count)
    rows = torch.arange(x.shape[0], device=at.device).unsqueeze(1)
    return x.movedim(dim, 1)[rows, keep].movedim(1, dim)


def shift_positions(
    position_ids: torch.Tensor,
    at: torch.Tensor,
    counts: torch.Tensor,
    width: int,
    pad_front: bool | None,
) -> torch.Tensor:
    """Lengthen user position ids: real tokens after a row's prompt move up by
    its length, and the prompt takes the positions its first token freed."""
    batch, length = position_ids.shape
    if batch != at.shape[0]:
        position_ids = position_ids.expand(at.shape[0], length)
    k = torch.arange(length, device=at.device).unsqueeze(0)
    shifted = torch.where(k >= at.unsqueeze(1), position_ids + counts.unsqueeze(1), position_ids)
    first = position_ids.gather(1, at.clamp(max=length - 1).unsqueeze(1))
    first = torch.where(at.unsqueeze(1) >= length, first + 1, first)
    fill = first + torch.arange(width, device=at.device).unsqueeze(0)
    return insert(shifted, at, counts, fill, 0, pad_front)
