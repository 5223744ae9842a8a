"""The list of known locators and the lookup that picks one for a model."""

from __future__ import annotations

import logging
from typing import TypeVar

from torch import nn

from .base import Located, Locator

_LOCATORS: list[Locator] = []
logger = logging.getLogger("prompthooks")

L = TypeVar("L", bound=type[Locator])


def register_locator(cls: L) -> L:
    """Class decorator: make a locator known. Later registrations win.

    Registering a class whose ``name`` is already registered replaces the old
    one, so re-running a notebook cell does not pile up duplicates.
    """
    if not (isinstance(cls, type) and issubclass(cls, Locator)):
        raise TypeError(f"register_locator expects a subclass of prompthooks.Locator, got {cls!r}")
    _LOCATORS[:] = [loc for loc in _LOCATORS if loc.name != cls.name]
    _LOCATORS.insert(0, cls())
    return cls


def unregister_locator(name: str) -> None:
    """Forget the locator registered under ``name``; undoes ``register_locator``.

    The registry is global, so a test or a notebook that registers a locator for
    a while removes it again with this. Raises ``KeyError`` for an unknown name.
    """
    if all(loc.name != name for loc in _LOCATORS):
        raise KeyError(
            f"no locator named {name!r} is registered; registered: "
            f"{', '.join(registered_locators())}"
        )
    _LOCATORS[:] = [loc for loc in _LOCATORS if loc.name != name]


def _in_order() -> list[Locator]:
    """Locators that name their classes first, structural ones after them: a
    model class someone wrote a locator for is never claimed by a guess."""
    return [loc for loc in _LOCATORS if not loc.structural] + [
        loc for loc in _LOCATORS if loc.structural
    ]


def registered_locators() -> list[str]:
    """Names of the registered locators, in the order they are tried."""
    return [loc.name for loc in _in_order()]


class UnsupportedModelError(TypeError):
    """No registered locator recognises the model."""


def locate(model: nn.Module) -> Located:
    """Return what prompthooks would hook on ``model``; the model is not changed."""
    for loc in _in_order():
        if loc.matches(model):
            located = loc.locate(model)
            if loc.structural:
                logger.info(
                    "prompthooks: %s recognised by its structure (locator %r)",
                    type(model).__name__,
                    loc.name,
                )
            return located
    raise UnsupportedModelError(
        f"prompthooks does not know how to attach to {type(model).__name__}.\n"
        f"Registered locators: {', '.join(registered_locators())}.\n"
        "Teach it the architecture with a locator:\n\n"
        "    import prompthooks as ph\n\n"
        "    @ph.register_locator\n"
        "    class MyLocator(ph.Locator):\n"
        "        name = 'my-model'\n"
        "        def matches(self, model): return isinstance(model, MyModel)\n"
        "        def locate(self, model): return ph.Located(locator=self.name, "
        "model=model, embedding=..., input_stack=..., encoder_mask_readers=(), "
        "sites=(), max_positions=...)\n\n"
        "A worked example: integrations/README.md, 'Teaching prompthooks a new "
        "architecture', and integrations/custom_locator.py.\n"
    )
