"""LLaMA: ``LlamaModel`` and its heads, grouped-query attention included."""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import AttentionSite, Located, Locator
from .classes import named
from .registry import register_locator

_MODULE = "transformers.models.llama.modeling_llama"
_PRETRAINED = named(_MODULE, "LlamaPreTrainedModel")
_MODEL = named(_MODULE, "LlamaModel")


@register_locator
class LlamaLocator(Locator):
    name = "llama"

    def matches(self, model: nn.Module) -> bool:
        return _PRETRAINED.of(model)

    def locate(self, model: nn.Module) -> Located:
        stack: Any = model if _MODEL.of(model) else model.model
        sites = []
        for i, layer in enumerate(stack.layers):
            attn = layer.self_attn
            head_dim = int(attn.head_dim)
            # KV heads from the projection itself: with GQA it is narrower
            # than hidden_size / num_attention_heads suggests.
            kv_heads = int(attn.k_proj.out_features) // head_dim
            sites.append(AttentionSite(attn, "self", i, kv_heads, head_dim))
        max_pos = getattr(stack.config, "max_position_embeddings", None)
        return Located(
            locator=self.name,
            model=model,
            embedding=stack.embed_tokens,
            input_stack=stack,
            encoder_mask_readers=(),
            sites=tuple(sites),
            max_positions=int(max_pos) if max_pos is not None else None,
            shifted_labels=hasattr(model, "lm_head"),  # a language-model head
        )
