"""The attached prompts, their virtual-id ranges and which one is selected."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..methods.base import SoftPrompt


class PromptBank:
    """Each token prompt owns ids ``[start, start + P)`` above the vocabulary;
    prefixes own no ids (they enter through attention, not the input)."""

    def __init__(self, prompts: dict[str, SoftPrompt], vocab_size: int) -> None:
        self.prompts = prompts  # the attachment replaces entries on export()
        self.vocab_size = vocab_size
        # Set by the attachment: prefix slots a cache holds in front (0 if none), so
        # the token hooks can tell the user's mask length on decode steps.
        self.prefix_width: Callable[[object], int] = lambda cache: 0
        self.starts: dict[str, int] = {}
        offset = vocab_size
        for name, prompt in prompts.items():
            if prompt.kind == "tokens":
                self.starts[name] = offset
                offset += prompt.num_virtual_tokens
        # One name for the whole batch, or one name per row (a mixed batch).
        self.selected: str | tuple[str, ...] | None = (
            next(iter(prompts)) if len(prompts) == 1 else None
        )
        # Whether inputs hold virtual ids already (``att.use(template=...)``); None: look.
        self.template: bool | None = None

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

    def selection(self) -> str | tuple[str, ...]:
        if self.selected is None:
            raise RuntimeError(
                f"several prompts are attached ({', '.join(self.prompts)}) and none is selected: "
                "wrap the call in `with att.use('name'):`"
            )
        return self.selected

    def active(self) -> str:
        """The one prompt of the batch; for a mixed batch, its first row's (all
        rows of a mixed batch are token prompts)."""
        selection = self.selection()
        return selection if isinstance(selection, str) else selection[0]

    def selects(self, kind: str) -> bool:
        """Some row of the batch uses a prompt of this kind (``tokens`` or ``prefix``)."""
        selection = self.selection()
        names = (selection,) if isinstance(selection, str) else selection
        return any(self.prompts[n].kind == kind for n in names)

    def per_row(self, batch: int) -> tuple[str, ...] | None:
        """The prompt of each of ``batch`` rows for a mixed batch, else ``None``.

        ``generate`` repeats each row for beams and ``num_return_sequences``
        (``repeat_interleave``), so a list of n names serves any multiple of n rows.
        """
        selection = self.selection()
        if isinstance(selection, str):
            return None
        if batch % len(selection):
            raise ValueError(
                f"att.use() got {len(selection)} prompt names but the batch has {batch} rows; "
                "give one name per row"
            )
        repeat = batch // len(selection)
        return tuple(name for name in selection for _ in range(repeat))

    def table(self) -> torch.Tensor:
        """All prompts' vectors, stacked in id order: row ``id - vocab_size``."""
        tables = [self.prompts[name].table() for name in self.starts]
        return tables[0] if len(tables) == 1 else torch.cat(tables)
