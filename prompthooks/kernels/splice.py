"""Token splice: put prompt vectors into the embedding output at virtual ids.

This is the torch reference path, correct on any device. Virtual ids are
``>= vocab_size``; row ``id - vocab_size`` of ``table`` replaces the embedding
there. Neither direction reads a tensor's values on the host (no ``nonzero``,
no boolean indexing), so the reference never waits for the device.
"""

from __future__ import annotations

import torch


def _rows(input_ids: torch.Tensor, vocab_size: int, table_rows: int) -> torch.Tensor:
    """Each position's table row; any valid row where the id is a vocabulary id."""
    return (input_ids - vocab_size).clamp(0, max(table_rows - 1, 0))


def splice_forward(
    embeds: torch.Tensor, input_ids: torch.Tensor, table: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """``embeds`` with the table's rows at virtual positions, in ``embeds``' dtype."""
    is_virtual = (input_ids >= vocab_size).unsqueeze(-1)
    # Gather, then cast: under autograd the table's gradient then adds up in the
    # table's dtype (fp32 parameters), as the Triton backward does.
    vectors = table[_rows(input_ids, vocab_size, table.shape[0])].to(embeds.dtype)
    return torch.where(is_virtual, vectors, embeds)


def splice_backward(
    grad: torch.Tensor, input_ids: torch.Tensor, table_rows: int, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding gradient (zero at virtual positions) and the table gradient
    in fp32 (positions that use the same row add up)."""
    is_virtual = (input_ids >= vocab_size).unsqueeze(-1)
    grad_embeds = grad.masked_fill(is_virtual, 0)
    hidden = grad.shape[-1]
    from_virtual = grad.float().masked_fill(~is_virtual, 0).reshape(-1, hidden)
    grad_table = torch.zeros(table_rows, hidden, dtype=torch.float32, device=grad.device)
    grad_table.index_add_(0, _rows(input_ids, vocab_size, table_rows).reshape(-1), from_virtual)
    return grad_embeds, grad_table
