"""DistilBERT: ``DistilBertModel`` and its heads (sequence classification,
masked LM, token classification, ...). ``[CLS]`` stays first; prompts go after
it, and the classification heads read it.

DistilBERT's attention takes no cache, so a prefix cannot arrive as a past:
it enters through the key and value projections (``prefix_in="projections"``,
see ``AttentionSite``).
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.models.distilbert.modeling_distilbert import (
    DistilBertModel,
    DistilBertPreTrainedModel,
)

from .base import AttentionSite, Located, Locator
from .registry import register_locator


@register_locator
class DistilBertLocator(Locator):
    name = "distilbert"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, DistilBertPreTrainedModel)

    def locate(self, model: nn.Module) -> Located:
        stack: Any = model if isinstance(model, DistilBertModel) else model.distilbert
        sites = tuple(
            AttentionSite(
                module=block.attention,
                role="self",
                layer=i,
                num_kv_heads=int(block.attention.n_heads),
                head_dim=int(block.attention.attention_head_size),
                causal=bool(block.attention.is_causal),
                prefix_in="projections",
                key_proj=block.attention.k_lin,
                value_proj=block.attention.v_lin,
            )
            for i, block in enumerate(stack.transformer.layer)
        )
        return Located(
            locator=self.name,
            model=model,
            embedding=stack.embeddings.word_embeddings,
            input_stack=stack,
            encoder_mask_readers=(),
            sites=sites,
            max_positions=int(stack.embeddings.position_embeddings.num_embeddings),
            cls_first=True,
        )
