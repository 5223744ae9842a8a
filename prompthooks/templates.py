"""Build P-tuning template inputs: pseudo tokens anywhere around the user's text.

The P-tuning paper places pseudo tokens in groups around the input and a
target slot, e.g. its ``(3, 3, 3)`` layout for a masked LM::

    [CLS] P P P [MASK] P P P x P P P [SEP]

and for a causal LM the same without a mask token, the answer being the next
token after the last position. A pattern lists the pieces in order:

* an ``int`` n: the next n pseudo tokens (the prompt's ``att.virtual_ids()``,
  used in order; the pattern must use all of them);
* ``"{x}"`` (or any ``"{name}"``): the row's text for that field;
* ``"{mask}"``: the tokenizer's mask token, which is also the target slot;
* ``"{target}"``: no token; the target slot is the last position so far (a
  causal LM predicts the answer there);
* any other string: literal text, or a special token such as ``"[CLS]"``.

``fill_template`` returns padded ``input_ids`` and ``attention_mask`` (the
tokenizer's padding side) and the target position of each row. Because the
virtual ids are already in place, prompthooks inserts nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

Piece = str | int
_FIELD = re.compile(r"^\{(\w+)\}$")


@dataclass(frozen=True)
class TemplateBatch:
    """Model inputs built from a template, and where each row's target is."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    target: torch.Tensor  # (B,) position whose output predicts the answer

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def _special_id(tokenizer: Any, token: str) -> int | None:
    if token in getattr(tokenizer, "all_special_tokens", ()):
        return int(tokenizer.convert_tokens_to_ids(token))
    return None


def _encode(tokenizer: Any, text: str) -> list[int]:
    special = _special_id(tokenizer, text)
    if special is not None:
        return [special]
    encoded = tokenizer(text, add_special_tokens=False)
    ids = encoded["input_ids"] if hasattr(encoded, "keys") else encoded
    return [int(i) for i in ids]


def _row(
    pattern: Sequence[Piece], fields: Mapping[str, str], tokenizer: Any, virtual: Sequence[int]
) -> tuple[list[int], int]:
    ids: list[int] = []
    target: int | None = None
    used = 0
    for piece in pattern:
        if isinstance(piece, int):
            if piece < 0 or used + piece > len(virtual):
                raise ValueError(
                    f"the pattern asks for more pseudo tokens than the prompt has ({len(virtual)})"
                )
            ids += list(virtual[used : used + piece])
            used += piece
            continue
        match = _FIELD.match(piece)
        name = match.group(1) if match else None
        if name == "mask":
            mask_id = getattr(tokenizer, "mask_token_id", None)
            if mask_id is None:
                raise ValueError('"{mask}" needs a tokenizer with a mask token')
            target = len(ids)
            ids.append(int(mask_id))
        elif name == "target":
            if not ids:
                raise ValueError('"{target}" needs at least one token before it')
            target = len(ids) - 1
        elif name is not None:
            if name not in fields:
                raise KeyError(f"the pattern has {piece!r} but the row has no field {name!r}")
            ids += _encode(tokenizer, fields[name])
        else:
            ids += _encode(tokenizer, piece)
    if used != len(virtual):
        raise ValueError(
            f"the pattern places {used} pseudo tokens but the prompt has {len(virtual)}; "
            "every virtual id must appear once"
        )
    if target is None:
        raise ValueError('the pattern needs a target slot: "{mask}" or "{target}"')
    return ids, target


def fill_template(
    pattern: Sequence[Piece],
    rows: Sequence[str] | Sequence[Mapping[str, str]],
    tokenizer: Any,
    virtual_ids: Sequence[int],
) -> TemplateBatch:
    """Build a padded batch from ``pattern`` for each row (a text for ``"{x}"``,
    or a mapping of field names to texts). See the module docstring."""
    built = [
        _row(pattern, {"x": row} if isinstance(row, str) else row, tokenizer, virtual_ids)
        for row in rows
    ]
    if not built:
        raise ValueError("fill_template needs at least one row")
    width = max(len(ids) for ids, _ in built)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    left = getattr(tokenizer, "padding_side", "right") == "left"
    input_ids = torch.full((len(built), width), int(pad), dtype=torch.long)
    attention_mask = torch.zeros((len(built), width), dtype=torch.long)
    target = torch.zeros(len(built), dtype=torch.long)
    for b, (ids, slot) in enumerate(built):
        start = width - len(ids) if left else 0
        input_ids[b, start : start + len(ids)] = torch.tensor(ids)
        attention_mask[b, start : start + len(ids)] = 1
        target[b] = start + slot
    return TemplateBatch(input_ids, attention_mask, target)
