"""Independent references for prefix keys/values, sharing no code with the library.

* decoder-only and BERT: the model fed a ``DynamicCache`` filled by hand with
  the prefix (transformers' own past-key-values path) and explicit positions;
* T5 decoder self- and cross-attention: an ``EncoderDecoderCache`` filled by
  hand, the cross-attention keys computed from the encoder output by hand;
* T5 encoder: a hand-written encoder forward (attention written out with
  ``einsum``, the model's own norms, projections and feed-forward weights).
* BART: a hand-written encoder; the decoder given a hand-filled
  ``EncoderDecoderCache`` or, where positions must not count the prefix,
  written out as well.

The prefix table layout is the documented one (the module docstring of
``prompthooks/methods/prefix_tuning.py``: PEFT's ``prompt_embeddings`` layout):
``table.view(P, sites, 2, H_kv, D)``, sites in ``ph.locate(model).sites`` order.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers as tf
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache

from tests.support.builders import ENCODER_FIRST


def site_kv(
    table: torch.Tensor, sites: int, heads: int, dim: int
) -> list[tuple[torch.Tensor, ...]]:
    """Per site, keys and values ``(1, H, P, D)``."""
    p = table.shape[0]
    view = table.view(p, sites, 2, heads, dim)
    return [
        (view[:, s, 0].permute(1, 0, 2)[None], view[:, s, 1].permute(1, 0, 2)[None])
        for s in range(sites)
    ]


def filled_cache(kv: list[tuple[torch.Tensor, ...]], batch: int) -> DynamicCache:
    cache = DynamicCache()
    for layer, (k, v) in enumerate(kv):
        cache.update(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1), layer)
    return cache


def positions(mask: torch.Tensor, offset: int) -> torch.Tensor:
    """Real tokens numbered 0, 1, ... in each row (written as a loop), plus ``offset``."""
    rows = []
    for row in mask.tolist():
        count, out = 0, []
        for m in row:
            out.append(count if m else 0)
            count += int(m)
        rows.append([x + offset for x in out])
    return torch.tensor(rows)


def decoder_only_logits(
    model: nn.Module,
    ids: torch.Tensor,
    mask: torch.Tensor,
    table: torch.Tensor,
    heads: int,
    dim: int,
    shift: bool,
    output: str = "logits",
) -> torch.Tensor:
    """The model with the prefix given as its past, positions from the mask."""
    p, batch = table.shape[0], ids.shape[0]
    layers = table.shape[1] // (2 * heads * dim)
    cache = filled_cache(site_kv(table, layers, heads, dim), batch)
    out = model(
        input_ids=ids,
        attention_mask=torch.cat([torch.ones(batch, p, dtype=mask.dtype), mask], dim=1),
        position_ids=positions(mask, p if shift else 0),
        past_key_values=cache,
        use_cache=True,
    )
    result: torch.Tensor = getattr(out, output)
    return result


def decoder_with_filled_cache(
    model: Any,
    encoded: torch.Tensor,
    mask: torch.Tensor,
    decoder_ids: torch.Tensor,
    self_kv: list[tuple[torch.Tensor, ...]],
    cross_kv: list[tuple[torch.Tensor, ...]],
    encoder_keys: list[tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """An encoder-decoder's own decoder given a hand-filled ``EncoderDecoderCache``:
    layer i's self-attention holds ``self_kv[i]`` (the prefix), its cross-attention
    ``[cross_kv[i] ; encoder_keys[i]]`` (the prefix, then keys of the encoder output)."""
    b, p = decoder_ids.shape[0], self_kv[0][0].shape[2]
    self_cache, cross_cache = DynamicCache(), DynamicCache()
    cache = EncoderDecoderCache(self_cache, cross_cache)
    layers = zip(self_kv, cross_kv, encoder_keys, strict=True)
    for i, ((sk, sv), (ck, cv), (k, v)) in enumerate(layers):
        self_cache.update(sk.expand(b, -1, -1, -1), sv.expand(b, -1, -1, -1), i)
        cross_cache.update(
            torch.cat([ck.expand(b, -1, -1, -1), k], 2),
            torch.cat([cv.expand(b, -1, -1, -1), v], 2),
            i,
        )
        cache.is_updated[i] = True  # the decoder reuses these cross keys as they are
    # The encoder output only sizes the cross mask here: its keys come from the cache.
    padded_encoded = torch.cat([torch.zeros(b, p, encoded.shape[-1]), encoded], dim=1)
    out = model(
        encoder_outputs=(padded_encoded,),
        attention_mask=torch.cat([torch.ones(b, p, dtype=mask.dtype), mask], dim=1),
        decoder_input_ids=decoder_ids,
        past_key_values=cache,
        use_cache=True,
    )
    logits: torch.Tensor = out.logits
    return logits


# -- T5 ---------------------------------------------------------------------------


def _t5_attention(
    attn: Any,
    x: torch.Tensor,
    memory: torch.Tensor,
    prefix: tuple[torch.Tensor, ...],
    bias: torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """T5 attention written out: no scaling, additive bias and mask, prefix keys first."""
    b, q, _ = x.shape
    h, d = attn.n_heads, attn.key_value_proj_dim
    query = attn.q(x).view(b, q, h, d).transpose(1, 2)
    key = attn.k(memory).view(b, -1, h, d).transpose(1, 2)
    value = attn.v(memory).view(b, -1, h, d).transpose(1, 2)
    key = torch.cat([prefix[0].expand(b, -1, -1, -1), key], dim=2)
    value = torch.cat([prefix[1].expand(b, -1, -1, -1), value], dim=2)
    scores = torch.einsum("bhqd,bhkd->bhqk", query, key) + bias + mask
    out = torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), value)
    result: torch.Tensor = attn.o(out.transpose(1, 2).reshape(b, q, h * d))
    return result


def t5_encoder(
    model: Any, ids: torch.Tensor, mask: torch.Tensor, kv: list[tuple[torch.Tensor, ...]]
) -> torch.Tensor:
    """The T5 encoder with prefix ``kv[i]`` in layer i's self-attention.

    Relative positions treat the prefix as P earlier tokens: query i sits at
    ``P + i``, key j at ``j`` (prefix keys ``0..P-1``).
    """
    encoder = model.encoder
    x = encoder.embed_tokens(ids)
    p = kv[0][0].shape[2]
    length = ids.shape[1]
    first = encoder.block[0].layer[0].SelfAttention
    rel = torch.arange(p + length)[None, :] - (torch.arange(length)[:, None] + p)
    bucket = first._relative_position_bucket(
        rel,
        bidirectional=True,
        num_buckets=first.relative_attention_num_buckets,
        max_distance=first.relative_attention_max_distance,
    )
    bias = first.relative_attention_bias(bucket).permute(2, 0, 1)[None]
    keep = torch.cat([torch.ones(ids.shape[0], p), mask.float()], dim=1)
    additive = ((1 - keep) * torch.finfo(torch.float32).min)[:, None, None, :]
    for i, block in enumerate(encoder.block):
        attn_layer, ff_layer = block.layer[0], block.layer[1]
        normed = attn_layer.layer_norm(x)
        x = x + _t5_attention(attn_layer.SelfAttention, normed, normed, kv[i], bias, additive)
        x = x + ff_layer.DenseReluDense(ff_layer.layer_norm(x))
    out: torch.Tensor = encoder.final_layer_norm(x)
    return out


def t5_logits(
    model: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    decoder_ids: torch.Tensor,
    table: torch.Tensor,
) -> torch.Tensor:
    """Full T5 oracle: hand-written encoder, then the decoder given a hand-filled
    ``EncoderDecoderCache`` (self: prefix; cross: prefix + encoder keys)."""
    layers = model.config.num_layers
    h, d = model.config.num_heads, model.config.d_kv
    kv = site_kv(table, 3 * layers, h, d)  # enc 0..L-1, then (dec_self, cross) per layer
    enc_kv, dec_kv = kv[:layers], kv[layers:]
    encoded = t5_encoder(model, ids, mask, enc_kv)
    b = ids.shape[0]
    keys = []
    for block in model.decoder.block:
        cross = block.layer[1].EncDecAttention
        k = cross.k(encoded).view(b, -1, h, d).transpose(1, 2)
        v = cross.v(encoded).view(b, -1, h, d).transpose(1, 2)
        keys.append((k, v))
    return decoder_with_filled_cache(
        model, encoded, mask, decoder_ids, dec_kv[0::2], dec_kv[1::2], keys
    )


# -- BART ---------------------------------------------------------------------------


def _bart_attention(
    attn: Any,
    x: torch.Tensor,
    memory: torch.Tensor,
    prefix: tuple[torch.Tensor, ...],
    mask: torch.Tensor,
) -> torch.Tensor:
    """BART attention written out: scaled dot product, additive mask, prefix keys first."""
    b, q, _ = x.shape
    h, d = attn.num_heads, attn.head_dim
    query = attn.q_proj(x).view(b, q, h, d).transpose(1, 2)
    key = attn.k_proj(memory).view(b, -1, h, d).transpose(1, 2)
    value = attn.v_proj(memory).view(b, -1, h, d).transpose(1, 2)
    key = torch.cat([prefix[0].expand(b, -1, -1, -1), key], dim=2)
    value = torch.cat([prefix[1].expand(b, -1, -1, -1), value], dim=2)
    scores = torch.einsum("bhqd,bhkd->bhqk", query, key) * d**-0.5 + mask
    out = torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), value)
    result: torch.Tensor = attn.out_proj(out.transpose(1, 2).reshape(b, q, h * d))
    return result


def _additive(keep: torch.Tensor) -> torch.Tensor:
    """(B, K) or (B, Q, K) 0/1 -> additive (B, 1, Q or 1, K)."""
    keep = keep.float()
    blocked = (1 - keep) * torch.finfo(torch.float32).min
    return blocked[:, None, None, :] if keep.ndim == 2 else blocked[:, None]


def _bart_positions(stack: Any, length: int, start: int) -> torch.Tensor:
    """Learned positions ``start .. start + length - 1`` (BART stores p in row p + 2)."""
    rows = [p + 2 for p in range(start, start + length)]
    weight: torch.Tensor = stack.embed_positions.weight
    return weight[torch.tensor(rows)][None]


def bart_encoder(
    model: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    kv: list[tuple[torch.Tensor, ...]],
    start: int,
) -> torch.Tensor:
    """The BART encoder (post-norm) with prefix ``kv[i]`` in layer i's
    self-attention; real tokens at positions ``start, start + 1, ...``."""
    encoder = model.get_encoder()
    p = kv[0][0].shape[2]
    x = encoder.embed_tokens(ids) + _bart_positions(encoder, ids.shape[1], start)
    x = encoder.layernorm_embedding(x)
    additive = _additive(torch.cat([torch.ones(ids.shape[0], p), mask.float()], dim=1))
    for i, layer in enumerate(encoder.layers):
        x = layer.self_attn_layer_norm(x + _bart_attention(layer.self_attn, x, x, kv[i], additive))
        ff = layer.fc2(layer.activation_fn(layer.fc1(x)))
        x = layer.final_layer_norm(x + ff)
    out: torch.Tensor = x
    return out


def bart_decoder_by_hand(
    model: Any,
    encoded: torch.Tensor,
    mask: torch.Tensor,
    decoder_ids: torch.Tensor,
    self_kv: list[tuple[torch.Tensor, ...]],
    cross_kv: list[tuple[torch.Tensor, ...]],
    start: int,
) -> torch.Tensor:
    """The BART decoder written out, to logits: decoder tokens at positions
    ``start, start + 1, ...``; self-attention sees its prefix and earlier
    tokens, cross-attention its prefix and the unmasked encoder keys."""
    decoder = model.get_decoder()
    b, n = decoder_ids.shape
    p = self_kv[0][0].shape[2]
    x = decoder.embed_tokens(decoder_ids) + _bart_positions(decoder, n, start)
    x = decoder.layernorm_embedding(x)
    causal = torch.tensor(
        [[1.0] * p + [1.0 if j <= i else 0.0 for j in range(n)] for i in range(n)]
    )
    self_mask = _additive(causal[None].expand(b, -1, -1))
    cross_mask = _additive(torch.cat([torch.ones(b, p), mask.float()], dim=1))
    for i, layer in enumerate(decoder.layers):
        x = layer.self_attn_layer_norm(
            x + _bart_attention(layer.self_attn, x, x, self_kv[i], self_mask)
        )
        cross = _bart_attention(layer.encoder_attn, x, encoded, cross_kv[i], cross_mask)
        x = layer.encoder_attn_layer_norm(x + cross)
        ff = layer.fc2(layer.activation_fn(layer.fc1(x)))
        x = layer.final_layer_norm(x + ff)
    logits: torch.Tensor = model.lm_head(x) + model.final_logits_bias
    return logits


def bart_decoder_with_cache(
    model: Any,
    encoded: torch.Tensor,
    mask: torch.Tensor,
    decoder_ids: torch.Tensor,
    self_kv: list[tuple[torch.Tensor, ...]],
    cross_kv: list[tuple[torch.Tensor, ...]],
) -> torch.Tensor:
    """BART's own decoder given a hand-filled ``EncoderDecoderCache`` (self:
    the prefix; cross: the prefix + keys computed from the encoder output).
    BART numbers decoder positions from the cache length, so its tokens sit
    at ``P, P + 1, ...``: the ``shift_positions=True`` reference."""
    b = decoder_ids.shape[0]
    keys = []
    for layer in model.get_decoder().layers:
        cross = layer.encoder_attn
        h, d = cross.num_heads, cross.head_dim
        k = cross.k_proj(encoded).view(b, -1, h, d).transpose(1, 2)
        v = cross.v_proj(encoded).view(b, -1, h, d).transpose(1, 2)
        keys.append((k, v))
    return decoder_with_filled_cache(model, encoded, mask, decoder_ids, self_kv, cross_kv, keys)


def bart_logits(
    model: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    decoder_ids: torch.Tensor,
    table: torch.Tensor,
    shift: bool,
) -> torch.Tensor:
    """Full BART oracle: the hand-written encoder, then the decoder given a
    hand-filled cache (``shift``) or written out (no shift). Sites in locator
    order: encoder layers, then (dec_self, cross) per decoder layer."""
    config = model.config
    enc_layers, dec_layers = config.encoder_layers, config.decoder_layers
    h = config.encoder_attention_heads
    kv = site_kv(table, enc_layers + 2 * dec_layers, h, config.d_model // h)
    enc_kv, dec_kv = kv[:enc_layers], kv[enc_layers:]
    p = table.shape[0]
    encoded = bart_encoder(model, ids, mask, enc_kv, p if shift else 0)
    self_kv, cross_kv = dec_kv[0::2], dec_kv[1::2]
    if shift:
        return bart_decoder_with_cache(model, encoded, mask, decoder_ids, self_kv, cross_kv)
    return bart_decoder_by_hand(model, encoded, mask, decoder_ids, self_kv, cross_kv, 0)


# -- RoBERTa and DistilBERT -----------------------------------------------------------


def roberta_prefix_oracle(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, table: torch.Tensor, shift: bool
) -> Any:
    """RoBERTa given the prefix as a hand-filled past, positions from ``padding_idx + 1``."""
    p, b = table.shape[0], ids.shape[0]
    config = model.config
    heads = config.num_attention_heads
    dim = config.hidden_size // heads
    cache = filled_cache(site_kv(table, config.num_hidden_layers, heads, dim), b)
    return model(
        input_ids=ids,
        attention_mask=torch.cat([torch.ones(b, p, dtype=mask.dtype), mask], dim=1),
        position_ids=positions(mask, ENCODER_FIRST["roberta"] + (p if shift else 0)),
        past_key_values=cache,
        output_hidden_states=True,
    )


def distilbert_prefix_oracle(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, table: torch.Tensor, shift: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """DistilBERT written out: embeddings at explicit positions, then per block
    attention over ``[prefix ; keys]``, residual norms and the feed-forward.
    Returns the last hidden state and, for a classification head, its logits."""
    body = model.distilbert if hasattr(model, "distilbert") else model
    config = model.config
    heads, dim = config.n_heads, config.dim // config.n_heads
    kv = site_kv(table, config.n_layers, heads, dim)
    p, b, length = table.shape[0], ids.shape[0], ids.shape[1]
    x = body.embeddings(ids, None, positions(mask, p if shift else 0))
    keep = torch.cat([torch.ones(b, p), mask.float()], dim=1)
    additive = ((1 - keep) * torch.finfo(torch.float32).min)[:, None, None, :]
    for i, block in enumerate(body.transformer.layer):
        attn = block.attention

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, length, heads, dim).transpose(1, 2)

        query = split(attn.q_lin(x))
        key = torch.cat([kv[i][0].expand(b, -1, -1, -1), split(attn.k_lin(x))], dim=2)
        value = torch.cat([kv[i][1].expand(b, -1, -1, -1), split(attn.v_lin(x))], dim=2)
        scores = torch.einsum("bhqd,bhkd->bhqk", query, key) / dim**0.5 + additive
        mixed = torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), value)
        out = attn.out_lin(mixed.transpose(1, 2).reshape(b, length, heads * dim))
        x = block.sa_layer_norm(out + x)
        x = block.output_layer_norm(block.ffn(x) + x)
    logits = None
    if isinstance(model, tf.DistilBertForSequenceClassification):
        logits = model.classifier(torch.relu(model.pre_classifier(x[:, 0])))
    elif isinstance(model, tf.DistilBertForMaskedLM):  # its MLM head, written out
        head = model.vocab_layer_norm(model.activation(model.vocab_transform(x)))
        logits = model.vocab_projector(head)
    return x, logits
