"""Architecture knowledge: one module per family, plus the registry.

Importing this package registers the built-in locators; it imports no model code
(they know their classes by name: ``classes.py``).
"""

from . import (  # noqa: F401  (registration side effect)
    bart,
    bert,
    distilbert,
    gpt2,
    gpt_neox,
    llama,
    llama_like,
    opt,
    roberta,
    t5,
    torch_mha,
)
from .base import AttentionSite, Located, Locator, PositionTable
from .conventions import PromptNotAppliedError
from .registry import (
    UnsupportedModelError,
    locate,
    register_locator,
    registered_locators,
    unregister_locator,
)

__all__ = [
    "AttentionSite",
    "Located",
    "Locator",
    "PositionTable",
    "PromptNotAppliedError",
    "UnsupportedModelError",
    "locate",
    "register_locator",
    "registered_locators",
    "unregister_locator",
]
