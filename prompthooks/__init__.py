"""prompthooks: soft prompts for any PyTorch model, attached with hooks.

import prompthooks as ph
with ph.attach(model, ph.PromptTuning(20)) as att:
    loss = model(**batch).loss      # your own call, unchanged
"""

from ._version import __version__
from .attach import Attachment, attach, attachment, tune
from .io import CheckpointError, load, load_peft
from .locators import (
    AttentionSite,
    Located,
    Locator,
    PromptNotAppliedError,
    UnsupportedModelError,
    locate,
    register_locator,
    registered_locators,
    unregister_locator,
)
from .methods import PrefixTuning, PromptTuning, PTuning, SoftPrompt
from .templates import TemplateBatch, fill_template

__all__ = [
    "Attachment",
    "AttentionSite",
    "CheckpointError",
    "Located",
    "Locator",
    "PrefixTuning",
    "PromptNotAppliedError",
    "PromptTuning",
    "PTuning",
    "SoftPrompt",
    "TemplateBatch",
    "UnsupportedModelError",
    "attach",
    "attachment",
    "fill_template",
    "load",
    "load_peft",
    "locate",
    "register_locator",
    "registered_locators",
    "tune",
    "unregister_locator",
    "__version__",
]
