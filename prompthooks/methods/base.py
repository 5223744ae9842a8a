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

    #: The model a loaded prompt was trained for (``Located.fingerprint()``),
    #: checked when it is attached; ``None`` skips that check.
    trained_for: dict[str, Any] | None = None

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

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SoftPrompt:
        """An untrained prompt of the shape ``config`` describes, ready for
        ``load_state_dict``: how ``ph.load`` rebuilds what ``config()`` wrote."""
        raise NotImplementedError

    def check_fits(self, located: Located) -> None:
        """Raise a clear error if this prompt was made for another model."""
        check_trained_for(self, located)
        check_positions(self, located)
        if self.hidden_size != located.hidden_size:
            raise ValueError(
                f"this prompt was made for a model with hidden size {self.hidden_size}, "
                f"but {type(located.model).__name__} embeds tokens into "
                f"{located.hidden_size} dimensions: table shape "
                f"({self.num_virtual_tokens}, {self.hidden_size}) vs expected "
                f"({self.num_virtual_tokens}, {located.hidden_size})"
            )


def check_positions(prompt: SoftPrompt, located: Located) -> None:
    """Refuse, at attach, a prompt that leaves no position for a real token: a
    soft prompt's virtual tokens, and a prefix's shift, take positions before it."""
    taken = prompt.num_virtual_tokens
    if prompt.kind == "prefix" and not getattr(prompt, "shift_positions", True):
        taken = 0
    limit = located.max_positions
    if limit is not None and taken >= limit:
        raise ValueError(
            f"this prompt takes {taken} positions, but {type(located.model).__name__} "
            f"embeds at most {limit}, which leaves no room for the input: use fewer "
            "virtual tokens"
            + (" or PrefixTuning(shift_positions=False)" if prompt.kind == "prefix" else "")
        )


@runtime_checkable
class PromptSpec(Protocol):
    """Anything that can build a prompt once the model is known."""

    def build(self, located: Located) -> SoftPrompt: ...


# -- reading a saved config: every field checked, named when wrong ----------------


def config_int(config: dict[str, Any], key: str, minimum: int = 1) -> int:
    """An integer field of a saved config (not a bool, not a string)."""
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"field {key!r} must be an integer >= {minimum}, got {value!r}")
    return value


def config_bool(config: dict[str, Any], key: str, default: bool) -> bool:
    """A true/false field of a saved config (a string such as "false" is refused)."""
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise ValueError(f"field {key!r} must be true or false, got {value!r}")
    return value


def config_fraction(config: dict[str, Any], key: str) -> float:
    """A probability field of a saved config, in [0, 1)."""
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"field {key!r} must be a number in [0, 1), got {value!r}")
    return float(value)


def config_choice(config: dict[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = config[key]
    if value not in choices:
        raise ValueError(f"field {key!r} must be one of {list(choices)}, got {value!r}")
    return str(value)


def check_num_virtual_tokens(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_virtual_tokens must be an integer >= 1, got {n!r}")
    return n


def check_text_init(init: str, init_text: str | None, tokenizer: Any, spec: str) -> None:
    """``init="text"`` needs both the text and the tokenizer that turns it into ids."""
    if init != "text":
        return
    if not init_text:
        raise ValueError("init='text' needs init_text, the text that starts the prompt")
    if tokenizer is None:
        raise ValueError(
            "init='text' needs the model's tokenizer: "
            f"{spec}(..., init='text', init_text=..., tokenizer=tokenizer)"
        )


def _describe(fingerprint: dict[str, Any]) -> dict[str, str]:
    """The facts of a model fingerprint that a prompt depends on, as text."""
    sites = fingerprint.get("sites", [])
    roles: dict[str, int] = {}
    for role, *_ in sites:
        roles[role] = roles.get(role, 0) + 1
    return {
        "hidden size": str(fingerprint["hidden_size"]),
        "vocabulary": str(fingerprint["vocab_size"]),
        "attention layers": ", ".join(f"{n} {r}" for r, n in sorted(roles.items())) or "none",
        "KV heads": ", ".join(str(h) for h in sorted({s[2] for s in sites})) or "none",
        "head size": ", ".join(str(d) for d in sorted({s[3] for s in sites})) or "none",
    }


def check_trained_for(prompt: SoftPrompt, located: Located) -> None:
    """Refuse a loaded prompt on a model unlike the one it was trained for,
    naming every shape that differs (a prompt trained on one model is
    meaningless on another, even when the widths happen to agree)."""
    if prompt.trained_for is None:
        return
    saved, here = _describe(prompt.trained_for), _describe(located.fingerprint())
    differing = [f"{k} {saved[k]} vs {here[k]}" for k in saved if saved[k] != here[k]]
    if not differing:
        return
    saved_embedding = (prompt.trained_for["vocab_size"], prompt.trained_for["hidden_size"])
    raise ValueError(
        f"this prompt was trained for a {prompt.trained_for.get('architecture', 'model')} "
        f"unlike this {type(located.model).__name__} (saved vs this model): "
        + "; ".join(differing)
        + f"; token embedding {saved_embedding} vs {(located.vocab_size, located.hidden_size)}. "
        "Attach it to the model it was trained for (set prompt.trained_for = None to skip "
        "this check when the model is a compatible variant)."
    )
