"""Token splice: put prompt vectors into the embedding output at virtual ids.

This is the torch reference path, correct on any device. Virtual ids are
``>= vocab_size``; row ``id - vocab_size`` of ``table`` replaces the embedding
there. Only the virtual positions are gathered: boolean indexing waits for
the device, which costs nothing on the CPU this path serves (CUDA takes the
Triton kernels), and copies a fraction of what a dense gather would.
"""

from __future__ import annotations

import torch


def splice_forward(
    embeds: torch.Tensor, input_ids: torch.Tensor, table: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """``embeds`` with the table's rows at virtual positions, in ``embeds``' dtype."""
    is_virtual = input_ids >= vocab_size
    out = embeds.clone()
    # Gather, then cast: under autograd the table's gradient then adds up in the
    # table's dtype (fp32 parameters), as the other backward paths do.
    out[is_virtual] = table[input_ids[is_virtual] - vocab_size].to(embeds.dtype)
    return out


def splice_backward(
    grad: torch.Tensor, input_ids: torch.Tensor, table_rows: int, vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding gradient (zero at virtual positions) and the table gradient
    in fp32 (positions that use the same row add up).
    """
    is_virtual = input_ids >= vocab_size
    grad_embeds = grad.masked_fill(is_virtual.unsqueeze(-1), 0)
    grad_table = torch.zeros(table_rows, grad.shape[-1], dtype=torch.float32, device=grad.device)
    grad_table.index_add_(0, input_ids[is_virtual] - vocab_size, grad[is_virtual].float())
    return grad_embeds, grad_table
