"""Trainable prompt modules. Nothing here knows about hooks."""

from .base import PromptSpec, SoftPrompt
from .p_tuning import PTuning, PTuningPrompt
from .prefix_tuning import Prefix, PrefixTuning
from .prompt_tuning import PromptTable, PromptTuning

__all__ = [
    "Prefix",
    "PrefixTuning",
    "PromptSpec",
    "PromptTable",
    "PromptTuning",
    "PTuning",
    "PTuningPrompt",
    "SoftPrompt",
]
