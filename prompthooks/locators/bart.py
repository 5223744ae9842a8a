"""BART: ``BartModel``, ``BartForConditionalGeneration`` and the other
``BartPreTrainedModel`` heads built on a ``BartModel`` (sequence
classification, question answering).

Soft prompts go into the encoder input. The decoder reads the encoder output
through cross-attention with an ``encoder_attention_mask`` sized for the
un-prompted input, so it is listed as an encoder-mask reader and gets that
mask widened.

BART numbers positions itself: the encoder from the sequence length (a
prompt's virtual tokens take positions ``0..P-1``, as in PEFT), the decoder
from the length of the cache it is given. Neither stack takes position ids,
so the learned position tables are listed for the prefix hooks, which
renumber them (``shift_positions``) the same way with or without a cache.

``BartForCausalLM`` (the decoder alone) has no encoder and is not claimed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import AttentionSite, Located, Locator, PositionTable, Role
from .classes import named
from .registry import register_locator

_MODULE = "transformers.models.bart.modeling_bart"
_PRETRAINED = named(_MODULE, "BartPreTrainedModel")
_MODEL = named(_MODULE, "BartModel")
_ENCODER = named(_MODULE, "BartEncoder")
_DECODER = named(_MODULE, "BartDecoder")


def _site(attn: Any, role: Role, layer: int) -> AttentionSite:
    return AttentionSite(
        attn, role, layer, int(attn.num_heads), int(attn.head_dim), causal=bool(attn.is_causal)
    )


def _base(model: nn.Module) -> Any:
    """The model's ``BartModel`` (itself or its ``.model``), or ``None``."""
    if _MODEL.of(model):
        return model
    inner = getattr(model, "model", None)
    return inner if _MODEL.of(inner) else None


class _Lookup:
    """Position ids ``(B, L)`` -> BART's learned position embeddings ``(B, L, D)``.

    ``BartLearnedPositionalEmbedding`` stores position ``p`` in row ``p + 2``.
    """

    def __init__(self, table: Any) -> None:  # a BartLearnedPositionalEmbedding
        self.table = table

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(positions + self.table.offset, self.table.weight)


@register_locator
class BartLocator(Locator):
    name = "bart"

    def matches(self, model: nn.Module) -> bool:
        base = _base(model)
        return (
            _PRETRAINED.of(model)
            and base is not None
            and _ENCODER.of(base.encoder)
            and _DECODER.of(base.decoder)
        )

    def locate(self, model: nn.Module) -> Located:
        base = _base(model)
        assert base is not None
        encoder, decoder = base.encoder, base.decoder
        sites = [_site(layer.self_attn, "enc_self", i) for i, layer in enumerate(encoder.layers)]
        for i, layer in enumerate(decoder.layers):
            sites.append(_site(layer.self_attn, "dec_self", i))
            sites.append(_site(layer.encoder_attn, "cross", i))
        # ``shared`` and ``encoder.embed_tokens`` are two modules with one weight;
        # the encoder calls its own.
        embedding = encoder.embed_tokens
        assert isinstance(embedding, nn.Embedding)
        tables = (
            PositionTable(encoder.embed_positions, "enc_self", _Lookup(encoder.embed_positions)),
            PositionTable(decoder.embed_positions, "dec_self", _Lookup(decoder.embed_positions)),
        )
        return Located(
            locator=self.name,
            model=model,
            embedding=embedding,
            input_stack=encoder,
            encoder_mask_readers=(decoder,),
            sites=tuple(sites),
            max_positions=int(encoder.max_source_positions),
            is_encoder_decoder=True,
            position_tables=tables,
        )
