"""OPT: ``OPTModel``, ``OPTDecoder`` and every ``OPTPreTrainedModel`` head.

The input stack is the ``OPTDecoder``: ``OPTForCausalLM`` calls it directly,
skipping ``OPTModel``. OPT's learned position embedding adds an offset of 2
internally; the ``position_ids`` the decoder takes count real tokens from 0
(padding gets -1), so the hooks hand it positions from 0.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers.models.opt.modeling_opt import (
    OPTDecoder,
    OPTForCausalLM,
    OPTModel,
    OPTPreTrainedModel,
)

from .base import AttentionSite, Located, Locator
from .registry import register_locator


def _decoder(model: nn.Module) -> Any:
    if isinstance(model, OPTDecoder):
        return model
    base: Any = model if isinstance(model, OPTModel) else model.model  # every head's OPTModel
    return base.decoder


@register_locator
class OPTLocator(Locator):
    name = "opt"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, OPTPreTrainedModel)

    def locate(self, model: nn.Module) -> Located:
        decoder = _decoder(model)
        sites = []
        for i, layer in enumerate(decoder.layers):
            attn = layer.self_attn
            head_dim = int(attn.head_dim)
            kv_heads = int(attn.k_proj.out_features) // head_dim
            index = i if attn.layer_idx is None else int(attn.layer_idx)
            sites.append(AttentionSite(attn, "self", index, kv_heads, head_dim))
        positions = decoder.embed_positions  # num_embeddings includes the offset of 2
        return Located(
            locator=self.name,
            model=model,
            embedding=decoder.embed_tokens,
            input_stack=decoder,
            encoder_mask_readers=(),
            sites=tuple(sites),
            max_positions=int(positions.num_embeddings) - int(positions.offset),
            shifted_labels=isinstance(model, OPTForCausalLM),
        )
