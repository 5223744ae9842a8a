"""Token splice: put prompt vectors into the embedding output at virtual ids.

This is the torch reference path, correct on any device. Virtual ids are
``>= vocab_size``; row ``id - vocab_size`` of ``table`` replaces the embedding
there. Backward accumulates into ``table`` (rows used several times add up).
"""

from __future__ import annotations

import torch


def splice_tokens(
    embeds: torch.Tensor, input_ids: torch.Tensor, table: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    is_virtual = input_ids >= vocab_size
    rows = table[input_ids[is_virtual] - vocab_size].to(embeds.dtype)
    return embeds.masked_scatter(is_virtual.unsqueeze(-1), rows)
