"""GPT-NeoX (Pythia, GPT-NeoX-20B): ``GPTNeoXModel`` and its heads.

Differences from GPT-2/LLaMA that the hooks must know (transformers 5.x):
the attention module receives its cache as ``layer_past`` (read from its
signature, like every site's), and one fused ``query_key_value`` projection
holds the queries, keys and values of every head, interleaved head by head.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import AttentionSite, Located, Locator
from .classes import named
from .registry import register_locator

_MODULE = "transformers.models.gpt_neox.modeling_gpt_neox"
_PRETRAINED = named(_MODULE, "GPTNeoXPreTrainedModel")
_MODEL = named(_MODULE, "GPTNeoXModel")
_CAUSAL = named(_MODULE, "GPTNeoXForCausalLM")


@register_locator
class GPTNeoXLocator(Locator):
    name = "gpt_neox"

    def matches(self, model: nn.Module) -> bool:
        return _PRETRAINED.of(model)

    def locate(self, model: nn.Module) -> Located:
        stack: Any = model if _MODEL.of(model) else model.gpt_neox
        sites = []
        for i, layer in enumerate(stack.layers):
            attn = layer.attention
            head_dim = int(attn.head_size)
            # Heads from the fused projection itself (3 * head_size columns per
            # head), not from the config.
            kv_heads = int(attn.query_key_value.out_features) // (3 * head_dim)
            index = i if attn.layer_idx is None else int(attn.layer_idx)
            sites.append(AttentionSite(attn, "self", index, kv_heads, head_dim))
        max_pos = getattr(stack.config, "max_position_embeddings", None)
        return Located(
            locator=self.name,
            model=model,
            embedding=stack.embed_in,
            input_stack=stack,
            encoder_mask_readers=(),
            sites=tuple(sites),
            max_positions=int(max_pos) if max_pos is not None else None,
            # The LM head (``lm_head`` in 5.x, ``embed_out`` in 4.x) shifts its labels.
            shifted_labels=_CAUSAL.of(model),
        )
