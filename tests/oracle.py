"""The independent reference: the same model fed ``inputs_embeds`` built by hand.

Written with plain Python loops over rows so that it shares no code with the
library's vectorised layout functions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


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
