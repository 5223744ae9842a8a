"""BERT: ``BertModel`` and its heads (sequence classification, masked LM,
token classification, ...). ``[CLS]`` stays first; prompts go after it."""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import AttentionSite, Located, Locator
from .classes import named
from .registry import register_locator

_MODULE = "transformers.models.bert.modeling_bert"
_PRETRAINED = named(_MODULE, "BertPreTrainedModel")
_MODEL = named(_MODULE, "BertModel")


def encoder_sites(stack: Any) -> tuple[AttentionSite, ...]:
    """The self-attention of every layer of a BERT-layout encoder
    (``stack.encoder.layer[i].attention.self``; RoBERTa shares it). Only
    self-attention: a decoder's cross-attention (``add_cross_attention``)
    reads an encoder this library does not see, so it gets no prefix."""
    return tuple(
        AttentionSite(
            module=layer.attention.self,
            role="self",
            layer=i,
            num_kv_heads=int(layer.attention.self.num_attention_heads),
            head_dim=int(layer.attention.self.attention_head_size),
            causal=bool(layer.attention.self.is_causal),
        )
        for i, layer in enumerate(stack.encoder.layer)
    )


@register_locator
class BertLocator(Locator):
    name = "bert"

    def matches(self, model: nn.Module) -> bool:
        return _PRETRAINED.of(model)

    def locate(self, model: nn.Module) -> Located:
        stack: Any = model if _MODEL.of(model) else model.bert
        sites = encoder_sites(stack)
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
