"""Architecture knowledge: one module per family, plus the registry.

Importing this package registers the built-in locators.
"""

from . import bert, gpt2, llama, t5  # noqa: F401  (registration side effect)
from .base import AttentionSite, Located, Locator
from .registry import UnsupportedModelError, locate, register_locator, registered_locators

__all__ = [
    "AttentionSite",
    "Located",
    "Locator",
    "UnsupportedModelError",
    "locate",
    "register_locator",
    "registered_locators",
]
