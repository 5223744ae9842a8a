"""Models written in plain PyTorch (no transformers), and a float64 reference.

``PlainLM`` is a causal language model on ``nn.TransformerEncoder``;
``PlainSeq2Seq`` an encoder-decoder on ``nn.Transformer``. Both take
``(batch, length)`` ids with an ``attention_mask`` (1 = real token) and
``inputs_embeds`` as an alternative to ids, which is what the soft-prompt
oracle feeds. ``batch_first=False`` runs the layers sequence-first inside.

``reference`` recomputes either model in float64 from its weights, with
einsum attention and a prefix given as the *inputs* of each attention's key
and value projections, sharing no code with prompthooks or with
``nn.MultiheadAttention``'s forward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

VOCAB, WIDTH, HEADS, MAX_LEN = 29, 16, 2, 40


def plain_batch(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random ids (pad id 0 never occurs in a real token)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[row, :n] = 1
    return ids, mask


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class PlainLM(nn.Module):
    """Token + learned position embeddings, a causal encoder stack, an LM head."""

    def __init__(self, batch_first: bool = True, layers: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.tok = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Embedding(MAX_LEN, WIDTH)
        layer = nn.TransformerEncoderLayer(
            WIDTH, HEADS, 2 * WIDTH, dropout=0.0, batch_first=batch_first
        )
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=batch_first)
        self.head = nn.Linear(WIDTH, VOCAB)
        self.batch_first = batch_first
        self.eval()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = self.tok(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = x.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long)
        if position_ids is None:
            position_ids = _positions(attention_mask)
        x = x + self.pos(position_ids)
        causal = torch.ones(length, length, dtype=torch.bool).triu(1)
        pad = attention_mask == 0
        if not self.batch_first:
            x = x.transpose(0, 1)
        x = self.body(x, mask=causal, src_key_padding_mask=pad, is_causal=True)
        if not self.batch_first:
            x = x.transpose(0, 1)
        out: torch.Tensor = self.head(x)
        return out


class PlainSeq2Seq(nn.Module):
    """``nn.Transformer`` with one shared token embedding and learned positions."""

    def __init__(self, batch_first: bool = True, layers: int = 2, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.tok = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Embedding(MAX_LEN, WIDTH)
        self.core = nn.Transformer(
            WIDTH,
            HEADS,
            num_encoder_layers=layers,
            num_decoder_layers=layers,
            dim_feedforward=2 * WIDTH,
            dropout=0.0,
            batch_first=batch_first,
        )
        self.head = nn.Linear(WIDTH, VOCAB)
        self.batch_first = batch_first
        self.eval()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.tok

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        assert decoder_input_ids is not None
        x = self.tok(input_ids) if inputs_embeds is None else inputs_embeds
        batch, length = x.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long)
        x = x + self.pos(_positions(attention_mask))
        t = decoder_input_ids.shape[1]
        y = self.tok(decoder_input_ids) + self.pos(torch.arange(t))
        pad = attention_mask == 0
        causal = torch.ones(t, t, dtype=torch.bool).triu(1)
        if not self.batch_first:
            x, y = x.transpose(0, 1), y.transpose(0, 1)
        z = self.core(
            x,
            y,
            tgt_mask=causal,
            src_key_padding_mask=pad,
            memory_key_padding_mask=pad,
            tgt_is_causal=True,
        )
        if not self.batch_first:
            z = z.transpose(0, 1)
        out: torch.Tensor = self.head(z)
        return out


# -- the float64 reference ------------------------------------------------------------

#: Per site: key inputs and value inputs ``(P, WIDTH)`` (or keys and values
#: themselves when ``reference(..., space="keys")``), or None for no prefix.
Prefix = tuple[torch.Tensor, torch.Tensor] | None


def _attention(
    attn: nn.MultiheadAttention,
    x: torch.Tensor,
    memory: torch.Tensor,
    prefix: Prefix,
    keep: torch.Tensor,
    causal: bool,
    space: str,
) -> torch.Tensor:
    """Multi-head attention written out. ``keep``: (B, S) real memory tokens."""
    d = lambda t: t.detach().double()  # noqa: E731
    w, b = d(attn.in_proj_weight), d(attn.in_proj_bias)
    wq, wk, wv = w.chunk(3)
    bq, bk, bv = b.chunk(3)
    batch, q_len, _ = x.shape
    keys, values = memory @ wk.T + bk, memory @ wv.T + bv
    visible = keep.bool()
    p = 0
    if prefix is not None:
        p = prefix[0].shape[0]
        pk, pv = d(prefix[0]), d(prefix[1])
        if space == "inputs":
            pk, pv = pk @ wk.T + bk, pv @ wv.T + bv
        keys = torch.cat([pk.expand(batch, -1, -1), keys], dim=1)
        values = torch.cat([pv.expand(batch, -1, -1), values], dim=1)
        visible = torch.cat([torch.ones(batch, p, dtype=torch.bool), visible], dim=1)
    s = keys.shape[1]
    q = (x @ wq.T + bq).view(batch, q_len, HEADS, -1).transpose(1, 2)
    k = keys.view(batch, s, HEADS, -1).transpose(1, 2)
    v = values.view(batch, s, HEADS, -1).transpose(1, 2)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / q.shape[-1] ** 0.5
    allowed = visible[:, None, None, :].expand(-1, 1, q_len, -1)
    if causal:
        j = torch.arange(s)
        i = torch.arange(q_len).unsqueeze(1) + p
        allowed = allowed & (j.unsqueeze(0) <= i)
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v).transpose(1, 2)
    out = out.reshape(batch, q_len, -1)
    return out @ d(attn.out_proj.weight).T + d(attn.out_proj.bias)


def _norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(
        x, norm.normalized_shape, norm.weight.double(), norm.bias.double(), norm.eps
    )


def _feed_forward(layer: Any, x: torch.Tensor) -> torch.Tensor:
    h = F.relu(x @ layer.linear1.weight.double().T + layer.linear1.bias.double())
    return h @ layer.linear2.weight.double().T + layer.linear2.bias.double()


def _encoder(
    layers: Any,
    x: torch.Tensor,
    keep: torch.Tensor,
    prefixes: list[Prefix],
    causal: bool,
    space: str,
) -> torch.Tensor:
    for layer, prefix in zip(layers, prefixes, strict=True):
        attended = _attention(layer.self_attn, x, x, prefix, keep, causal, space)
        x = _norm(layer.norm1, x + attended)
        x = _norm(layer.norm2, x + _feed_forward(layer, x))
    return x


def reference(
    model: nn.Module,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    prefixes: list[Prefix],
    decoder_ids: torch.Tensor | None = None,
    space: str = "inputs",
) -> torch.Tensor:
    """Logits of ``model`` computed in float64 from ``embeds`` (token embeddings,
    prompts already spliced in), ``mask`` and one prefix per attention site in
    ``ph.locate(model).sites`` order (``None``: no prefix at that site), given
    as the inputs of the key and value projections (``space="inputs"``) or as
    keys and values (``space="keys"``)."""
    x = embeds.double() + model.pos.weight.double()[_positions(mask)]
    if isinstance(model, PlainLM):
        x = _encoder(model.body.layers, x, mask, prefixes, True, space)
    else:
        assert isinstance(model, PlainSeq2Seq) and decoder_ids is not None
        core = model.core
        n = len(core.encoder.layers)
        x = _encoder(core.encoder.layers, x, mask, prefixes[:n], False, space)
        memory = _norm(core.encoder.norm, x)
        t = decoder_ids.shape[1]
        y = model.tok.weight.double()[decoder_ids] + model.pos.weight.double()[torch.arange(t)]
        everyone = torch.ones(y.shape[:2], dtype=torch.bool)
        for i, layer in enumerate(core.decoder.layers):
            own, cross = prefixes[n + 2 * i], prefixes[n + 2 * i + 1]
            y = _norm(
                layer.norm1, y + _attention(layer.self_attn, y, y, own, everyone, True, space)
            )
            crossed = _attention(layer.multihead_attn, y, memory, cross, mask, False, space)
            y = _norm(layer.norm2, y + crossed)
            y = _norm(layer.norm3, y + _feed_forward(layer, y))
        x = _norm(core.decoder.norm, y)
    return x @ model.head.weight.double().T + model.head.bias.double()
