"""T5: encoder-decoder (``T5ForConditionalGeneration``, ``T5Model``) and
encoder-only (``T5EncoderModel``).

Soft prompts go into the encoder input. The decoder reads the encoder output
through cross-attention with an ``encoder_attention_mask`` that the user (or
``generate``) sized for the un-prompted input, so the decoder stack is listed
as an encoder-mask reader and gets that mask widened too.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import AttentionSite, Located, Locator, Role
from .classes import named
from .registry import register_locator

_MODULE = "transformers.models.t5.modeling_t5"
_PRETRAINED = named(_MODULE, "T5PreTrainedModel")
_STACK = named(_MODULE, "T5Stack")


def _site(attn: Any, role: Role, layer: int) -> AttentionSite:
    return AttentionSite(
        attn,
        role,
        layer,
        int(attn.n_heads),
        int(attn.key_value_proj_dim),
        causal=bool(attn.is_causal),
    )


def _sites(stack: Any, self_role: Role) -> list[AttentionSite]:
    sites = []
    for i, block in enumerate(stack.block):
        attn = block.layer[0].SelfAttention
        sites.append(_site(attn, self_role, i))
        if self_role == "dec_self":
            sites.append(_site(block.layer[1].EncDecAttention, "cross", i))
    return sites


@register_locator
class T5Locator(Locator):
    name = "t5"

    def matches(self, model: nn.Module) -> bool:
        return _PRETRAINED.of(model) and _STACK.of(getattr(model, "encoder", None))

    def locate(self, model: nn.Module) -> Located:
        encoder: Any = model.encoder
        decoder: Any = getattr(model, "decoder", None)
        assert _STACK.of(encoder)
        sites = _sites(encoder, "enc_self")
        with_decoder = _STACK.of(decoder)
        if with_decoder:
            sites += _sites(decoder, "dec_self")
        embedding = encoder.embed_tokens
        assert isinstance(embedding, nn.Embedding)
        return Located(
            locator=self.name,
            model=model,
            embedding=embedding,
            input_stack=encoder,
            encoder_mask_readers=(decoder,) if with_decoder else (),
            sites=tuple(sites),
            max_positions=None,  # relative position buckets: no hard limit
            is_encoder_decoder=with_decoder,
        )
