"""Prompt Tuning (Lester et al. 2021): a learned table of virtual-token
embeddings, trained directly.

Three initialisations:
  * ``"random"``: normal noise with the standard deviation of the model's own
    embedding table, so the prompt starts at the scale the model expects;
  * ``"text"``: the embeddings of a tokenised text, repeated or cut to length
    (the paper's best performer for small models);
  * ``"vocab"``: embeddings of randomly drawn vocabulary tokens.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from ..locators.base import Located
from .activations import text_ids
from .base import SoftPrompt, check_num_virtual_tokens, check_text_init, config_int

Init = Literal["random", "text", "vocab"]


class PromptTable(SoftPrompt):
    """A soft prompt that is exactly one ``(P, hidden)`` parameter."""

    method = "prompt_tuning"

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        if table.ndim != 2:
            raise ValueError(f"a prompt table is 2-D (P, hidden), got shape {tuple(table.shape)}")
        self.weight = nn.Parameter(table.detach().clone().float())

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    def table(self) -> torch.Tensor:
        return self.weight

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> PromptTable:
        n, hidden = config_int(config, "num_virtual_tokens"), config_int(config, "hidden_size")
        return cls(torch.zeros(n, hidden))


class PromptTuning:
    """Spec for Prompt Tuning; sized from the model when attached."""

    def __init__(
        self,
        num_virtual_tokens: int = 20,
        init: Init = "random",
        init_text: str | None = None,
        tokenizer: Any = None,
    ) -> None:
        self.num_virtual_tokens = check_num_virtual_tokens(num_virtual_tokens)
        if init not in ("random", "text", "vocab"):
            raise ValueError(f"init must be 'random', 'text' or 'vocab', got {init!r}")
        check_text_init(init, init_text, tokenizer, "PromptTuning")
        self.init = init
        self.init_text = init_text
        self.tokenizer = tokenizer

    def __repr__(self) -> str:
        return f"PromptTuning(num_virtual_tokens={self.num_virtual_tokens}, init={self.init!r})"

    def build(self, located: Located) -> PromptTable:
        embedding = located.embedding
        weight = embedding.weight.detach()
        n = self.num_virtual_tokens
        if self.init == "random":
            table = torch.randn(n, weight.shape[1], device=weight.device) * _output_std(embedding)
        elif self.init == "vocab":
            table = looked_up(embedding, torch.randint(0, weight.shape[0], (n,)))
        else:
            assert self.init_text is not None
            ids = text_ids(self.tokenizer, self.init_text, located.vocab_size, n)
            table = looked_up(embedding, torch.tensor(ids))
        return PromptTable(table)


def looked_up(embedding: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """What the model's embedding module gives for ``ids``: a subclass may scale
    its rows (Gemma multiplies by sqrt(hidden size)), so the rows alone would
    start the prompt at the wrong magnitude."""
    with torch.no_grad():
        out: torch.Tensor = embedding(ids.to(embedding.weight.device))
    return out.detach()


def _output_std(embedding: nn.Embedding) -> torch.Tensor:
    """Spread of the embedding's outputs, the scale of a random prompt."""
    weight = embedding.weight.detach()
    if type(embedding) is nn.Embedding:  # outputs are the rows
        return weight.float().std()
    sample = torch.randint(0, weight.shape[0], (min(4096, weight.shape[0]),))
    return looked_up(embedding, sample).float().std()
