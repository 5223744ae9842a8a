"""How one call's prefixes sit in front of each row's keys, and the keys and
values each attention site gets for them.

Every row gets ``width`` key slots with its own prefix right-aligned in them
and the slots in front of it masked, so each row computes what it computes
alone (T5's relative positions included); a row whose prompt is not a prefix
(a mixed batch with soft prompts) has all its slots masked. One prefix for the
whole batch is the layout where every row reads the same prefix: nothing is
masked, and each site's keys and values stay one ``(H, P, D)`` tensor that
every row reads (a broadcast, not a copy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..kernels.torch_concat import accumulation_dtype
from ..locators.base import Located
from ..methods.prefix_tuning import Prefix
from .bank import PromptBank
from .layout import positions_from_mask

#: Per site, keys and values: ``(H, P, D)`` shared by all rows or ``(B, H, W, D)``.
KeyValues = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class PrefixRows:
    """The prefix layout of one call (see the module docstring)."""

    width: int
    keep: torch.Tensor | None  # (B, width) bool: the slots a row attends; None: all of them
    counts: torch.Tensor | int  # each row's prefix length: (B, 1), or one int for all
    offsets: torch.Tensor | int  # position shift of each row's real tokens: (B, 1) or int
    largest_offset: int  # the largest of ``offsets``, known without reading a tensor


def build_rows(bank: PromptBank, sites: int, batch: int) -> tuple[PrefixRows, KeyValues]:
    """One call's prefix layout and per-site keys/values (each prefix runs once)."""
    per_row = bank.per_row(batch)
    names = per_row if per_row is not None else (bank.active(),)
    named = {n: bank.prompts[n] for n in dict.fromkeys(names)}
    distinct = [n for n, p in named.items() if isinstance(p, Prefix)]
    prefixes = [p for p in named.values() if isinstance(p, Prefix)]
    per_prefix = [p.key_values() for p in prefixes]
    width = max(p.num_virtual_tokens for p in prefixes)
    largest = max(p.num_virtual_tokens if p.shift_positions else 0 for p in prefixes)
    if len(named) == 1:  # every row reads this prefix
        return PrefixRows(width, None, width, largest, largest), per_prefix[0]
    device = per_prefix[0][0][0].device
    none = len(distinct)  # index of the all-masked "no prefix" entry
    pick = torch.tensor(
        [distinct.index(n) if n in distinct else none for n in names], device=device
    )
    kv: KeyValues = []
    for site in range(sites):
        parts = []
        for part in (0, 1):
            # Picked in at least fp32, so rows that share a prefix add up its gradient there.
            blocks = [_right_aligned(_wide(kvs[site][part]), width) for kvs in per_prefix]
            blocks.append(torch.zeros_like(blocks[0]))
            parts.append(torch.stack(blocks)[pick])  # (B, H, W, D)
        kv.append((parts[0], parts[1]))
    lengths = torch.tensor([p.num_virtual_tokens for p in prefixes] + [0], device=device)[pick]
    shifts = torch.tensor([p.shift_positions for p in prefixes] + [False], device=device)[pick]
    keep = torch.arange(width, device=device).unsqueeze(0) >= (width - lengths).unsqueeze(1)
    counts = lengths.unsqueeze(1)
    offsets = counts * shifts.unsqueeze(1)
    return PrefixRows(width, keep, counts, offsets, largest), kv


def prefix_positions(
    rows: PrefixRows,
    given: torch.Tensor | None,
    mask: torch.Tensor | None,
    user_past: int,
    new: int,
    located: Located,
) -> torch.Tensor:
    """Explicit positions of a call's new real tokens: with ``shift_positions``
    they start at P, as if the prefix were P earlier tokens (PEFT's convention);
    otherwise at 0."""
    offsets, counts = rows.offsets, rows.counts
    if given is not None:
        return given + offsets
    first = located.first_position
    if mask is not None and mask.ndim == 2:
        if mask.shape[1] == user_past + new:  # the user's own mask (proxy mode)
            return positions_from_mask(mask, first)[:, -new:] + offsets
        # the mask now starts with the prefix's ones, which count as positions.
        # Left pads after them would land below ``first`` without the shift
        # (-1 breaks GPT-2's and GPT-J's position lookups); pads are masked,
        # so any valid position does.
        positions = positions_from_mask(mask, first)[:, -new:] - (counts - offsets)
        return positions.clamp(min=first)
    device = located.embedding.weight.device
    return torch.arange(new, device=device).unsqueeze(0) + (first + user_past) + offsets


def _wide(x: torch.Tensor) -> torch.Tensor:
    return x.to(accumulation_dtype(x.dtype))


def _right_aligned(x: torch.Tensor, width: int) -> torch.Tensor:
    """``(H, P, D)`` -> ``(H, width, D)`` with the prefix in the last P slots."""
    return nn.functional.pad(x, (0, 0, width - x.shape[1], 0))
