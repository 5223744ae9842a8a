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

from .base import AttentionSite, Located, Locator
from .classes import named
from .registry import register_locator

_MODULE = "transformers.models.distilbert.modeling_distilbert"
_PRETRAINED = named(_MODULE, "DistilBertPreTrainedModel")
_MODEL = named(_MODULE, "DistilBertModel")


@register_locator
class DistilBertLocator(Locator):
    name = "distilbert"

    def matches(self, model: nn.Module) -> bool:
        return _PRETRAINED.of(model)

    def locate(self, model: nn.Module) -> Located:
        stack: Any = model if _MODEL.of(model) else model.distilbert
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
