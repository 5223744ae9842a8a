"""Trainable prompt modules. Nothing here knows about hooks."""

from .base import PromptSpec, SoftPrompt
from .prompt_tuning import PromptTable, PromptTuning

__all__ = ["PromptSpec", "PromptTable", "PromptTuning", "SoftPrompt"]
