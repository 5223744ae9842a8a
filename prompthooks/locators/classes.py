"""Knowing a model's class by its name, without importing it.

A class-based locator asks "is this model a ``GPT2PreTrainedModel``?".
Answered with ``isinstance``, the question needs the class object, so every
built-in locator imported its family's modeling module, and ``import
prompthooks`` imported eleven of them (about 2 s). Each class records where
it was defined (``__module__``, ``__qualname__``), and so does every class in
a model's MRO, so the answer is read from there instead: nothing is imported,
and a subclass (a user's own ``GPT2LMHeadModel`` subclass) matches as it does
with ``isinstance``.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Every name the built-in locators match by, in creation order: a test imports
#: each one and checks it still names a class defined there (a class that moved
#: to another module would silently stop matching).
KNOWN: list[ClassNames] = []


@dataclass(frozen=True)
class ClassNames:
    """One or more classes, each known by its module and qualified name."""

    names: frozenset[tuple[str, str]]

    def of(self, obj: object) -> bool:
        """``isinstance(obj, <any of the classes>)``, read from ``type(obj).__mro__``."""
        return any((c.__module__, c.__qualname__) in self.names for c in type(obj).__mro__)

    def __or__(self, other: ClassNames) -> ClassNames:
        return ClassNames(self.names | other.names)


def named(module: str, *qualnames: str) -> ClassNames:
    """The classes ``qualnames`` defined in ``module`` (which is not imported)."""
    found = ClassNames(frozenset((module, q) for q in qualnames))
    KNOWN.append(found)
    return found
