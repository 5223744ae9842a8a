"""What every trained prompt is, and what a spec is.

Two kinds of prompt enter a model in two places:
  * ``kind = "tokens"`` (Prompt Tuning, P-tuning): ``table()`` is a
    ``(P, hidden)`` block of virtual-token vectors spliced into the token
    embedding output;
  * ``kind = "prefix"`` (Prefix Tuning, P-tuning v2): learned keys and values
    placed in front of every attention site (see ``methods/prefix_tuning.py``).

Specs (``PromptTuning(...)``) describe a prompt before the model is known;
``spec.build(located)`` sizes it from the model. A built ``SoftPrompt`` can be
attached directly (that is what ``ph.load`` and ``ph.load_peft`` return).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from ..locators.base import Located


class SoftPrompt(nn.Module):
    """A trained or trainable prompt. Token prompts implement ``table()``."""

    method: ClassVar[str] = "soft"
    kind: ClassVar[Literal["tokens", "prefix"]] = "tokens"

    @property
    def num_virtual_tokens(self) -> int:
        raise NotImplementedError

    @property
    def hidden_size(self) -> int:
        raise NotImplementedError

    def table(self) -> torch.Tensor:
        """The ``(num_virtual_tokens, hidden_size)`` vectors fed to the model."""
        raise NotImplementedError

    def export(self) -> SoftPrompt:
        """The same prompt without any training-time reparameterisation:
        only the tables the model reads. Outputs stay identical."""
        return self

    def config(self) -> dict[str, Any]:
        """JSON-able description, saved next to the weights."""
        return {
            "method": self.method,
            "num_virtual_tokens": self.num_virtual_tokens,
            "hidden_size": self.hidden_size,
        }

    def check_fits(self, located: Located) -> None:
        """Raise a clear error if this prompt was made for another model."""
        if self.hidden_size != located.hidden_size:
            raise ValueError(
                f"this prompt was made for a model with hidden size {self.hidden_size}, "
                f"but {type(located.model).__name__} embeds tokens into "
                f"{located.hidden_size} dimensions: table shape "
                f"({self.num_virtual_tokens}, {self.hidden_size}) vs expected "
                f"({self.num_virtual_tokens}, {located.hidden_size})"
            )


@runtime_checkable
class PromptSpec(Protocol):
    """Anything that can build a prompt once the model is known."""

    def build(self, located: Located) -> SoftPrompt: ...


def check_num_virtual_tokens(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_virtual_tokens must be an integer >= 1, got {n!r}")
    return n
