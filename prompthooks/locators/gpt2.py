"""GPT-2: ``GPT2Model`` and every ``GPT2PreTrainedModel`` head built on it."""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import AttentionSite, Located, Locator
from .classes import named
from .registry import register_locator

_MODULE = "transformers.models.gpt2.modeling_gpt2"
_PRETRAINED = named(_MODULE, "GPT2PreTrainedModel")
_MODEL = named(_MODULE, "GPT2Model")


@register_locator
class GPT2Locator(Locator):
    name = "gpt2"

    def matches(self, model: nn.Module) -> bool:
        return _PRETRAINED.of(model)

    def locate(self, model: nn.Module) -> Located:
        stack: Any = model if _MODEL.of(model) else model.transformer
        sites = tuple(
            AttentionSite(
                module=block.attn,
                role="self",
                layer=i,
                num_kv_heads=int(block.attn.num_heads),
                head_dim=int(block.attn.head_dim),
            )
            for i, block in enumerate(stack.h)
        )
        return Located(
            locator=self.name,
            model=model,
            embedding=stack.wte,
            input_stack=stack,
            encoder_mask_readers=(),
            sites=sites,
            max_positions=int(stack.wpe.num_embeddings),
            shifted_labels=hasattr(model, "lm_head"),  # a language-model head
        )
