"""A hooked forward's arguments by name, and how long a cache is: what every
hook module needs to read the call it is handed."""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

Kwargs = dict[str, Any]


# A plain dict, not ``functools.lru_cache``: ``torch.compile`` warns on (and
# ignores) cache wrappers, while it reads a dict like any other Python state.
_POSITIONAL_NAMES: dict[Any, tuple[str, ...] | None] = {}


def _positional_names(forward_function: Any) -> tuple[str, ...] | None:
    """Names that positional arguments bind to (after ``self``), or ``None`` when
    the signature takes ``*args`` and needs a full bind."""
    if forward_function in _POSITIONAL_NAMES:
        return _POSITIONAL_NAMES[forward_function]
    _POSITIONAL_NAMES[forward_function] = names = _signature_names(forward_function)
    return names


def _signature_names(forward_function: Any) -> tuple[str, ...] | None:
    names = []
    for param in list(inspect.signature(forward_function).parameters.values())[1:]:
        if param.kind is inspect.Parameter.VAR_POSITIONAL:
            return None
        if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
            names.append(param.name)
    return tuple(names)


def bind_kwargs(module: nn.Module, args: tuple[Any, ...], kwargs: Kwargs) -> Kwargs:
    """All arguments of a forward call by name, whether passed by position or not.

    Runs on every forward and decode step, so it avoids ``Signature.bind``.
    """
    if not args:  # the common case: transformers calls its stacks by keyword
        return dict(kwargs)
    names = _positional_names(type(module).forward)
    if names is None or len(args) > len(names):
        raise TypeError(
            f"prompthooks cannot name the positional arguments of {type(module).__name__}.forward"
        )
    out = dict(zip(names, args, strict=False))  # fewer args than names is normal
    for name in kwargs:
        if name in out:
            raise TypeError(f"{type(module).__name__}.forward got {name!r} twice")
    out.update(kwargs)
    return out


def cache_length(cache: Any, layer: int | None = None) -> int:
    """Tokens a cache holds (0 for no cache); of one layer if ``layer`` is given."""
    if cache is None or not hasattr(cache, "get_seq_length"):
        return 0
    return int(cache.get_seq_length() if layer is None else cache.get_seq_length(layer))
