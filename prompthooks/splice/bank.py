"""The attached prompts, their virtual-id ranges and which one is selected."""

from __future__ import annotations

import torch

from ..methods.base import SoftPrompt


class PromptBank:
    """Each token prompt owns ids ``[start, start + P)`` above the vocabulary;
    prefixes own no ids (they enter through attention, not the input)."""

    def __init__(self, prompts: dict[str, SoftPrompt], vocab_size: int) -> None:
        self.prompts = prompts  # the attachment replaces entries on export()
        self.vocab_size = vocab_size
        self.starts: dict[str, int] = {}
        offset = vocab_size
        for name, prompt in prompts.items():
            if prompt.kind == "tokens":
                self.starts[name] = offset
                offset += prompt.num_virtual_tokens
        self.selected: str | None = next(iter(prompts)) if len(prompts) == 1 else None

    def virtual_ids(self, name: str) -> list[int]:
        if name not in self.prompts:
            raise KeyError(f"no prompt named {name!r} is attached; attached: {list(self.prompts)}")
        if name not in self.starts:
            raise ValueError(
                f"prompt {name!r} is a prefix: it enters through the attention modules and has "
                "no virtual ids to place in the input"
            )
        start = self.starts[name]
        return list(range(start, start + self.prompts[name].num_virtual_tokens))

    def virtual_ids_tensor(self, name: str, device: torch.device) -> torch.Tensor:
        start = self.starts[name]
        return torch.arange(start, start + self.prompts[name].num_virtual_tokens, device=device)

    def active(self) -> str:
        if self.selected is None:
            raise RuntimeError(
                f"several prompts are attached ({', '.join(self.prompts)}) and none is selected: "
                "wrap the call in `with att.use('name'):`"
            )
        return self.selected

    def table(self) -> torch.Tensor:
        """All prompts' vectors, stacked in id order: row ``id - vocab_size``."""
        tables = [self.prompts[name].table() for name in self.starts]
        return tables[0] if len(tables) == 1 else torch.cat(tables)
