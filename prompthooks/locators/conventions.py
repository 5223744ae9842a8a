"""How a module takes its cache, mask and positions, read from its forward signature.

The hooks hand modules keyword arguments: a cache stand-in to an attention
module, a widened mask to a stack. The names of those arguments are private
call conventions of each model library, and they move: transformers 5.24
renamed ``past_key_values`` to ``cache`` on every attention module and stack,
and keeps the old name only as a deprecated alias that loses to the new one.
A hook that passed the old name would be ignored. So the names are never
hard-coded: they are read once, at locate time, from the signature
(``inspect.signature`` follows the ``functools.wraps`` of transformers'
decorators to the real forward), and only parameters the forward names
itself count, not ones it would swallow into ``**kwargs``.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

#: Names a key/value cache goes by, newest convention first.
CACHE_NAMES = ("cache", "past_key_values", "past_key_value", "layer_past")
#: Names of an attention mask: stacks and most attention modules, then T5's attention.
MASK_NAMES = ("attention_mask", "mask")
#: Names of position ids.
POSITION_NAMES = ("position_ids",)


def named_parameters(module: nn.Module) -> tuple[str, ...]:
    """The keyword-capable parameters ``module.forward`` names itself, in order
    (``*args`` and ``**kwargs`` excluded; empty if it has no readable signature)."""
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return ()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return tuple(p.name for p in params if p.kind in kinds)


def _first(names: tuple[str, ...], candidates: tuple[str, ...]) -> str | None:
    return next((c for c in candidates if c in names), None)


@dataclass(frozen=True)
class CallNames:
    """The keyword names one module's forward takes its cache, mask and positions
    under (``None``: the forward takes no such argument)."""

    cache: str | None
    mask: str | None
    positions: str | None

    @classmethod
    def of(cls, module: nn.Module) -> CallNames:
        names = named_parameters(module)
        return cls(
            cache=_first(names, CACHE_NAMES),
            mask=_first(names, MASK_NAMES),
            positions=_first(names, POSITION_NAMES),
        )

    def __str__(self) -> str:
        parts = [
            f"{what}={name}"
            for what, name in (
                ("cache", self.cache),
                ("mask", self.mask),
                ("positions", self.positions),
            )
            if name is not None
        ]
        return " ".join(parts) or "no cache, mask or positions"


def read_cache(kwargs: Mapping[str, Any], name: str | None) -> Any:
    """The cache a call hands over: under the module's own name, else under a
    deprecated alias that the module's decorators would rename (a caller
    written for another release)."""
    if name is not None and name in kwargs:  # the decorators let the own name win
        return kwargs[name]
    return next((kwargs[n] for n in CACHE_NAMES if kwargs.get(n) is not None), None)


def library_versions() -> str:
    """``transformers X, torch Y``: what an error about a call convention names."""
    import torch

    try:
        import transformers

        return f"transformers {transformers.__version__}, torch {torch.__version__}"
    except ImportError:  # plain PyTorch models need no transformers
        return f"torch {torch.__version__}"


class PromptNotAppliedError(RuntimeError):
    """A hook's contribution was not used by the module it was handed to.

    Raised instead of returning outputs computed without the prompt: the
    module's call conventions differ from what prompthooks read or was told
    (a newer transformers release, or a locator that names the wrong argument).
    """
