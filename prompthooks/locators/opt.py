"""OPT: ``OPTModel``, ``OPTDecoder`` and every ``OPTPreTrainedModel`` head.

The input stack is the ``OPTDecoder``: ``OPTForCausalLM`` calls it directly,
skipping ``OPTModel``. OPT's learned position embedding adds an offset of 2
internally; the ``position_ids`` the decoder takes count real tokens from 0
(padding gets -1), so the hooks hand it positions from 0.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import AttentionSite, Located, Locator
from .classes import named
from .registry import register_locator

_MODULE = "transformers.models.opt.modeling_opt"
_PRETRAINED = named(_MODULE, "OPTPreTrainedModel")
_MODEL = named(_MODULE, "OPTModel")
_DECODER = named(_MODULE, "OPTDecoder")
_CAUSAL = named(_MODULE, "OPTForCausalLM")


def _decoder(model: nn.Module) -> Any:
    if _DECODER.of(model):
        return model
    base: Any = model if _MODEL.of(model) else model.model  # every head's OPTModel
    return base.decoder


@register_locator
class OPTLocator(Locator):
    name = "opt"

    def matches(self, model: nn.Module) -> bool:
        return _PRETRAINED.of(model)

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
            shifted_labels=_CAUSAL.of(model),
        )
