"""Tiny random-weight models of the families beyond ``models.tiny`` (GPT-2, LLaMA,
T5, BERT), their batch makers, and the small prompt helpers every test file used
to copy: a random table, a prefix table sized for a model, a ``Prefix`` over it.

The configs are the ones the per-family files have always used, so results
(and the hand-checked scales: weights large enough that every site moves the
logits) are unchanged. No weights are downloaded.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers as tf
from torch import nn

import prompthooks as ph
from prompthooks.methods import Prefix

VOCAB = 61
MAX_POSITIONS = 64


# -- shared prompt helpers ----------------------------------------------------------


def random_table(rows: int, width: int, seed: int = 7, scale: float = 1.0) -> torch.Tensor:
    """Values far from any init, so that equality with an oracle means something."""
    return scale * torch.randn(rows, width, generator=torch.Generator().manual_seed(seed))


def prefix_width(model: nn.Module) -> int:
    """Columns of a prefix table: keys and values of every site, in site order."""
    return sum(2 * s.num_kv_heads * s.head_dim for s in ph.locate(model).sites)


def prefix_table(model: nn.Module, n: int = 4, seed: int = 7) -> torch.Tensor:
    return random_table(n, prefix_width(model), seed)


def prefix_of(model: nn.Module, table: torch.Tensor, shift: bool = True) -> Prefix:
    """A prefix holding exactly ``table`` (no projection), for the oracles to read."""
    shapes = [(s.num_kv_heads, s.head_dim) for s in ph.locate(model).sites]
    return Prefix(shapes, table=table, shift_positions=shift)


def no_early_stop(model: nn.Module) -> nn.Module:
    """Generation of fixed length: pad id 0, no end-of-sequence id."""
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = None
    return model


def left_padded(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random non-special ids, left padded with 0 (how decoder-only models are batched)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask


# -- GPT-NeoX and OPT ---------------------------------------------------------------

CAUSAL_HEADS: dict[str, dict[str, Any]] = {
    "neox": {
        "lm": tf.GPTNeoXForCausalLM,
        "base": tf.GPTNeoXModel,
        "cls": tf.GPTNeoXForSequenceClassification,
        "tok": tf.GPTNeoXForTokenClassification,
        "qa": tf.GPTNeoXForQuestionAnswering,
    },
    "opt": {
        "lm": tf.OPTForCausalLM,
        "base": tf.OPTModel,
        "decoder": tf.models.opt.modeling_opt.OPTDecoder,
        "cls": tf.OPTForSequenceClassification,
        "qa": tf.OPTForQuestionAnswering,
    },
}


def tiny_causal(family: str, attn: str = "sdpa", head: str = "lm") -> nn.Module:
    """GPT-NeoX (``neox``), OPT (``opt``) or OPT-350m's layout (``opt-proj``: word
    embeddings narrower than the hidden size, norms after attention): 2 layers,
    hidden 32, 4 heads (head_dim 8), random weights at a scale (0.2) where the
    logits depend visibly on every input, in eval mode."""
    torch.manual_seed(0)
    config: Any
    common = {
        "num_hidden_layers": 2,
        "hidden_size": 32,
        "num_attention_heads": 4,
        "vocab_size": VOCAB,
        "max_position_embeddings": MAX_POSITIONS,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    if family == "neox":  # default partial rotary (25% of each head) is kept
        config = tf.GPTNeoXConfig(intermediate_size=64, initializer_range=0.2, **common)
    else:
        proj = family == "opt-proj"
        config = tf.OPTConfig(
            ffn_dim=64,
            init_std=0.2,
            word_embed_proj_dim=16 if proj else 32,
            do_layer_norm_before=not proj,
            **common,
        )
    config._attn_implementation = attn
    model: nn.Module = CAUSAL_HEADS[family.split("-")[0]][head](config).eval()
    return no_early_stop(model)


# -- LLaMA-like (structural) ----------------------------------------------------------

WINDOW = 5
LLAMA_LIKE_COMMON: dict[str, Any] = {
    "num_hidden_layers": 2,
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 64,
    "vocab_size": VOCAB,
    "max_position_embeddings": MAX_POSITIONS,
    "initializer_range": 0.2,  # logits depend visibly on every input
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

#: config class, model class, config overrides, head_dim, per-layer windows
LLAMA_LIKE: dict[str, tuple[Any, Any, dict[str, Any], int, list[int | None]]] = {
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": WINDOW}, 8, [5, 5]),
    "qwen2": (
        tf.Qwen2Config,
        tf.Qwen2ForCausalLM,
        {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
        8,
        [None, 5],
    ),
    # head_dim 16 with hidden 32 and 4 heads: read from the module, not hidden / heads
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 16}, 16, [None, None]),
    "gemma": (tf.GemmaConfig, tf.GemmaForCausalLM, {"head_dim": 8}, 8, [None, None]),
    "gemma3": (
        tf.Gemma3TextConfig,
        tf.Gemma3ForCausalLM,
        {
            "head_dim": 16,
            "sliding_window": WINDOW,
            "layer_types": ["sliding_attention", "full_attention"],
        },
        16,
        [5, None],
    ),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {}, 8, [None, None]),
    "granite": (
        tf.GraniteConfig,
        tf.GraniteForCausalLM,
        {
            "embedding_multiplier": 3.0,
            "attention_multiplier": 0.2,
            "residual_multiplier": 0.5,
            "logits_scaling": 2.0,
        },
        8,
        [None, None],
    ),
}


def tiny_llama_like(name: str, attn: str = "sdpa", **overrides: Any) -> nn.Module:
    """A 2-layer causal LM of family ``name`` with random weights, in eval mode
    (``overrides``: config fields, e.g. another ``sliding_window``)."""
    config_cls, model_cls, extra, _, _ = LLAMA_LIKE[name]
    config = config_cls(**{**LLAMA_LIKE_COMMON, **extra, **overrides})
    config._attn_implementation = attn
    torch.manual_seed(0)
    model: nn.Module = model_cls(config).eval()
    return no_early_stop(model)


# -- RoBERTa and DistilBERT -----------------------------------------------------------

ENCODER_PAD = {"roberta": 1, "distilbert": 0, "xlm_roberta": 1, "camembert": 1}
ENCODER_CLS = {"roberta": 0, "distilbert": 2, "xlm_roberta": 0, "camembert": 0}  # <s> / [CLS]
ENCODER_FIRST = {"roberta": 2, "distilbert": 0, "xlm_roberta": 2, "camembert": 2}  # 1st position
ENCODER_CLASSES: dict[str, dict[str, Any]] = {
    "roberta": {
        "base": tf.RobertaModel,
        "cls": tf.RobertaForSequenceClassification,
        "lm": tf.RobertaForMaskedLM,
        "tok": tf.RobertaForTokenClassification,
    },
    "distilbert": {
        "base": tf.DistilBertModel,
        "cls": tf.DistilBertForSequenceClassification,
        "lm": tf.DistilBertForMaskedLM,
        "tok": tf.DistilBertForTokenClassification,
    },
    "xlm_roberta": {"base": tf.XLMRobertaModel, "cls": tf.XLMRobertaForSequenceClassification},
    "camembert": {"base": tf.CamembertModel, "cls": tf.CamembertForSequenceClassification},
}
ROBERTA_CONFIGS = {
    "roberta": tf.RobertaConfig,
    "xlm_roberta": tf.XLMRobertaConfig,
    "camembert": tf.CamembertConfig,
}


def tiny_encoder(family: str, head: str = "base", attn: str = "sdpa", seed: int = 0) -> nn.Module:
    """2 layers, hidden 32, 4 heads, 64 usable positions, random weights, eval mode."""
    torch.manual_seed(seed)
    config: Any
    if family in ROBERTA_CONFIGS:
        config = ROBERTA_CONFIGS[family](
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=VOCAB,
            max_position_embeddings=MAX_POSITIONS + ENCODER_FIRST[family],
            pad_token_id=ENCODER_PAD[family],
            bos_token_id=0,
            eos_token_id=2,
            type_vocab_size=1,
        )
    else:
        config = tf.DistilBertConfig(
            n_layers=2,
            dim=32,
            n_heads=4,
            hidden_dim=64,
            vocab_size=VOCAB,
            max_position_embeddings=MAX_POSITIONS,
            pad_token_id=ENCODER_PAD["distilbert"],
        )
    config._attn_implementation = attn
    model: nn.Module = ENCODER_CLASSES[family][head](config).eval()
    return model


def encoder_batch(
    family: str, lengths: list[int], seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random ids that start with the [CLS]-like id."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), ENCODER_PAD[family], dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(3, VOCAB, (n,), generator=g)
        ids[row, 0] = ENCODER_CLS[family]
        mask[row, :n] = 1
    return ids, mask


# -- BART ---------------------------------------------------------------------------

BART_HEADS: dict[str, Any] = {
    "lm": tf.BartForConditionalGeneration,
    "base": tf.BartModel,
    "cls": tf.BartForSequenceClassification,
    "qa": tf.BartForQuestionAnswering,
}
BART_EOS = 2
BART_START = 2  # decoder_start_token_id


def tiny_bart(attn: str = "sdpa", head: str = "lm", seed: int = 0) -> Any:
    """2 + 2 layers, d_model 32, 4 heads, random weights, eval mode; embeddings
    scaled by sqrt(d_model) so a prompt that skipped or doubled the scale shows."""
    torch.manual_seed(seed)
    config = tf.BartConfig(
        encoder_layers=2,
        decoder_layers=2,
        d_model=32,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POSITIONS,
        scale_embedding=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=BART_EOS,
        decoder_start_token_id=BART_START,
        forced_eos_token_id=None,
        init_std=0.25,  # weights large enough that every prompt site moves the logits
    )
    config.num_labels = 3
    config._attn_implementation = attn
    model = BART_HEADS[head](config).eval()
    if head == "lm":
        gen = model.generation_config
        gen.eos_token_id = gen.forced_eos_token_id = None  # fixed lengths, no forced tokens
        gen.pad_token_id = 0
    return model
