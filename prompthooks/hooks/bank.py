"""The attached prompts, their virtual-id ranges and which one is selected.

``att.use(...)`` selections are per context: a ``ContextVar`` (private to the
thread or asyncio task that entered the ``with`` block) holds them, so one
thread's selection never reaches another thread's calls. ``torch.compile``
cannot read a ``ContextVar``; compiled calls read a thread-local copy of the
same selection instead, which ``att.use`` keeps in step (and which dynamo
guards on, so a new selection recompiles rather than reusing the old prompt).
"""

from __future__ import annotations

import bisect
import itertools
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch

from ..methods.base import SoftPrompt

#: ``(selected, template)`` chosen by ``att.use``, per bank, in this context.
Choice = tuple["str | tuple[str, ...] | None", "bool | None"]
_CHOSEN: ContextVar[Mapping[PromptBank, Choice] | None] = ContextVar(
    "prompthooks_use", default=None
)
_CHOSEN_COMPILED = threading.local()  # attribute ``bank.key`` -> Choice
_KEYS = itertools.count()


class PromptBank:
    """Each token prompt owns ids ``[start, start + P)`` above the vocabulary;
    prefixes own no ids (they enter through attention, not the input)."""

    def __init__(self, prompts: dict[str, SoftPrompt], vocab_size: int) -> None:
        self.prompts = prompts  # the attachment replaces entries on export()
        self.vocab_size = vocab_size
        self.key = f"bank{next(_KEYS)}"  # names this bank's thread-local selection
        self.starts: dict[str, int] = {}
        offset = vocab_size
        for name, prompt in prompts.items():
            if prompt.kind == "tokens":
                self.starts[name] = offset
                offset += prompt.num_virtual_tokens
        # The token prompts and their first ids, ascending (for bisection).
        self._by_start = (list(self.starts), list(self.starts.values()))
        # Without ``att.use``: the only prompt, or none (the call must choose).
        self.default: str | None = next(iter(prompts)) if len(prompts) == 1 else None

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A copy is a bank of its own: the original's ``att.use`` does not select for it.
        self.__dict__.update(state)
        self.key = f"bank{next(_KEYS)}"

    def _choice(self) -> Choice:
        if torch.compiler.is_compiling():
            chosen: Choice | None = getattr(_CHOSEN_COMPILED, self.key, None)
        else:
            chosen = (_CHOSEN.get() or {}).get(self)
        return chosen if chosen is not None else (self.default, None)

    @property
    def selected(self) -> str | tuple[str, ...] | None:
        """One name for the whole batch, or one name per row (a mixed batch)."""
        return self._choice()[0]

    @property
    def template(self) -> bool | None:
        """Whether inputs hold virtual ids already (``att.use(template=...)``); None: look."""
        return self._choice()[1]

    @contextmanager
    def choose(
        self, selected: str | tuple[str, ...] | None, template: bool | None
    ) -> Iterator[None]:
        """Make ``(selected, template)`` this context's choice for the ``with`` block."""
        token = _CHOSEN.set({**(_CHOSEN.get() or {}), self: (selected, template)})
        before = getattr(_CHOSEN_COMPILED, self.key, None)
        setattr(_CHOSEN_COMPILED, self.key, (selected, template))
        try:
            yield
        finally:
            _CHOSEN.reset(token)
            setattr(_CHOSEN_COMPILED, self.key, before)

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
        selected = self._choice()[0]
        if selected is None:
            raise RuntimeError(
                f"several prompts are attached ({', '.join(self.prompts)}) and none is selected: "
                "wrap the call in `with att.use('name'):`"
            )
        return selected

    def active(self) -> str:
        """The one prompt of the batch; for a mixed batch, its first row's (all
        rows of a mixed batch are token prompts)."""
        selection = self.selection()
        return selection if isinstance(selection, str) else selection[0]

    def selects(self, kind: str) -> bool:
        """Some row of the batch uses a prompt of this kind (``tokens`` or ``prefix``)."""
        selection = self.selection()
        if isinstance(selection, str):  # one prompt (every decode step reads this)
            return bool(self.prompts[selection].kind == kind)
        return any(self.prompts[n].kind == kind for n in selection)

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

    def token_names(self, names: Iterable[str]) -> list[str]:
        """The token prompts among ``names``, in id order."""
        # Sorted by start, not filtered from ``starts``: a call's cost must not grow
        # with the number of prompts attached.
        wanted = {name for name in names if name in self.starts}
        return sorted(wanted, key=self.starts.__getitem__)

    def names_of_ids(self, ids: torch.Tensor) -> list[str]:
        """The token prompts whose virtual ids ``ids`` hold (a host read), in id
        order; found by bisection, so the cost does not grow with the number of
        prompts attached."""
        virtual = sorted(set(torch.unique(ids[ids >= self.vocab_size]).tolist()))
        names, starts = self._by_start
        found: dict[str, None] = {}
        for v in virtual:
            i = bisect.bisect_right(starts, v) - 1
            if i < 0 or v >= starts[i] + self.prompts[names[i]].num_virtual_tokens:
                raise IndexError(
                    f"input id {v} is neither a token of the {self.vocab_size}-token "
                    f"vocabulary nor a virtual id of an attached prompt ({self._ranges()}); "
                    "use ids below the vocabulary size, or att.virtual_ids(name)"
                )
            found[names[i]] = None
        return list(found)

    def _ranges(self) -> str:
        ranges = [
            f"{name!r}: {start}..{start + self.prompts[name].num_virtual_tokens - 1}"
            for name, start in self.starts.items()
        ]
        return ", ".join(ranges) or "none has virtual ids"

    def lookup(
        self, ids: torch.Tensor, names: list[str] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``ids`` and a table holding just the prompts ``names`` (``None``: all),
        with their virtual ids renumbered into it: row ``id - vocab_size``.

        A call computes only the prompts it uses (a P-tuning prompt runs its
        encoder to make its table), so its cost does not grow with the number of
        prompts attached."""
        if names is None or len(names) == len(self.starts):
            tables = [self.prompts[name].table() for name in self.starts]
            return ids, tables[0] if len(tables) == 1 else torch.cat(tables)
        renumbered, row = ids, self.vocab_size
        tables = []
        for name in names:
            start, prompt = self.starts[name], self.prompts[name]
            inside = (ids >= start) & (ids < start + prompt.num_virtual_tokens)
            renumbered = torch.where(inside, ids - (start - row), renumbered)
            row += prompt.num_virtual_tokens
            tables.append(prompt.table())
        return renumbered, tables[0] if len(tables) == 1 else torch.cat(tables)
