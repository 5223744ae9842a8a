"""The independent reference: the same model fed ``inputs_embeds`` built by hand.

Written with plain Python loops over rows so that it shares no code with the
library's vectorised layout functions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tests.support.builders import ENCODER_FIRST


def first_real(mask_row: torch.Tensor) -> int:
    return int(mask_row.tolist().index(1)) if 1 in mask_row.tolist() else 0


def oracle_logits(
    model: nn.Module,
    arch: str,
    ids: torch.Tensor,
    mask: torch.Tensor,
    table: torch.Tensor,
    labels: torch.Tensor | None = None,
    **extra: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (virtual positions removed by hand) and loss of the prompted model."""
    embed = model.get_input_embeddings()
    p = table.shape[0]
    rows_e, rows_m, rows_pos, rows_lab, keep = [], [], [], [], []
    for b in range(ids.shape[0]):
        at = first_real(mask[b]) + (1 if arch == "bert" else 0)
        e = embed(ids[b])
        rows_e.append(torch.cat([e[:at], table.to(e.dtype), e[at:]]))
        m = torch.cat([mask[b, :at], torch.ones(p, dtype=mask.dtype), mask[b, at:]])
        rows_m.append(m)
        pos, count = [], 0
        for v in m.tolist():
            pos.append(max(count - 1, 0) if v == 0 else count)
            count += int(v == 1)
        rows_pos.append(torch.tensor([max(x, 0) for x in pos]))
        if labels is not None:
            row = labels[b].clone()
            if arch in ("gpt2", "llama"):
                # A row's first real token has no real predecessor (alone and
                # unpadded it is no target), so it is no target with a prompt.
                row[at] = -100
            rows_lab.append(torch.cat([row[:at], torch.full((p,), -100), row[at:]]))
        keep.append(list(range(at)) + list(range(at + p, ids.shape[1] + p)))
    kw: dict[str, Any] = {
        "inputs_embeds": torch.stack(rows_e),
        "attention_mask": torch.stack(rows_m),
        **extra,
    }
    if arch != "t5":
        kw["position_ids"] = torch.stack(rows_pos)
    if labels is not None:
        kw["labels"] = torch.stack(rows_lab) if arch != "t5" else labels
    out = model(**kw)
    logits = out.logits
    if arch != "t5":
        logits = torch.stack([logits[b, keep[b]] for b in range(ids.shape[0])])
    return logits, out.loss if labels is not None else None


# -- per-family prompt oracles (moved from the family files) -------------------------


def causal_prompted_inputs(
    model: nn.Module,
    family: str,
    ids: torch.Tensor,
    mask: torch.Tensor,
    table: torch.Tensor,
    labels: torch.Tensor | None = None,
) -> tuple[dict[str, Any], list[list[int]]]:
    """The prompted batch as ``inputs_embeds``, built row by row: the prompt right
    before each row's first real token. Also returns, per row, the positions
    that hold the user's tokens."""
    embed = model.get_input_embeddings()
    p = table.shape[0]
    rows_e, rows_m, rows_pos, rows_lab, keep = [], [], [], [], []
    for b in range(ids.shape[0]):
        at = first_real(mask[b])
        e = embed(ids[b])
        rows_e.append(torch.cat([e[:at], table, e[at:]]))
        rows_m.append(torch.cat([mask[b, :at], torch.ones(p, dtype=mask.dtype), mask[b, at:]]))
        rows_pos.append(torch.tensor([0] * at + list(range(p + ids.shape[1] - at))))
        if labels is not None:
            row = labels[b].clone()
            # A row's first real token has no real predecessor (alone and
            # unpadded it is no target), so it is no target with a prompt.
            row[at] = -100
            rows_lab.append(torch.cat([row[:at], torch.full((p,), -100), row[at:]]))
        keep.append(list(range(at)) + list(range(at + p, ids.shape[1] + p)))
    kw: dict[str, Any] = {
        "inputs_embeds": torch.stack(rows_e),
        "attention_mask": torch.stack(rows_m),
    }
    if family == "neox":  # NeoX numbers tokens 0, 1, ... regardless of padding unless told
        kw["position_ids"] = torch.stack(rows_pos)
    # OPT derives its positions from the mask itself: its own convention is the reference.
    if labels is not None:
        kw["labels"] = torch.stack(rows_lab)
    return kw, keep


def causal_prompt_oracle(
    model: nn.Module,
    family: str,
    ids: torch.Tensor,
    mask: torch.Tensor,
    table: torch.Tensor,
    labels: torch.Tensor | None = None,
) -> Any:
    """The model's output on the prompted ``inputs_embeds``, the virtual
    positions removed from the logits by hand."""
    kw, keep = causal_prompted_inputs(model, family, ids, mask, table, labels)
    out = model(**kw)
    out.logits = torch.stack([out.logits[b, keep[b]] for b in range(ids.shape[0])])
    return out


def encoder_prompt_oracle(
    model: nn.Module,
    family: str,
    ids: torch.Tensor,
    mask: torch.Tensor,
    table: torch.Tensor,
    labels: torch.Tensor | None = None,
    at: int = 1,
) -> tuple[Any, list[list[int]]]:
    """The model on hand-built ``inputs_embeds``: the prompt at column ``at`` of
    each row (1: right after [CLS]), positions counted over the real tokens from
    the family's first position. Returns the output and, per row, the columns
    of the user's own tokens."""
    embed = model.get_input_embeddings()
    p = table.shape[0]
    rows_e, rows_m, rows_pos, rows_lab, keep = [], [], [], [], []
    for b in range(ids.shape[0]):
        e = embed(ids[b])
        rows_e.append(torch.cat([e[:at], table, e[at:]]))
        m = torch.cat([mask[b, :at], torch.ones(p, dtype=mask.dtype), mask[b, at:]])
        rows_m.append(m)
        pos, count = [], 0
        for v in m.tolist():
            pos.append(ENCODER_FIRST[family] + count)  # pads reuse the next number: they are masked
            count += int(v == 1)
        rows_pos.append(torch.tensor(pos))
        if labels is not None:
            rows_lab.append(torch.cat([labels[b, :at], torch.full((p,), -100), labels[b, at:]]))
        keep.append(list(range(at)) + list(range(at + p, ids.shape[1] + p)))
    kw: dict[str, Any] = {
        "inputs_embeds": torch.stack(rows_e),
        "attention_mask": torch.stack(rows_m),
        "position_ids": torch.stack(rows_pos),
    }
    if labels is not None:
        kw["labels"] = torch.stack(rows_lab)
    return model(**kw), keep


def kept(x: torch.Tensor, keep: list[list[int]]) -> torch.Tensor:
    return torch.stack([x[b, cols] for b, cols in enumerate(keep)])


def bart_prompt_oracle(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, table: torch.Tensor, **extra: Any
) -> Any:
    """The model fed inputs_embeds with the prompt in front of each row's tokens."""
    embed = model.get_input_embeddings()
    rows, masks = [], []
    for b in range(ids.shape[0]):
        rows.append(torch.cat([table, embed(ids[b])]))
        masks.append(torch.cat([torch.ones(table.shape[0], dtype=mask.dtype), mask[b]]))
    return model(inputs_embeds=torch.stack(rows), attention_mask=torch.stack(masks), **extra)
