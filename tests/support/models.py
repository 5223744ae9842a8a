"""Tiny random-weight models of each built-in architecture, and batch makers.

No weights are downloaded: every model here is built from a config.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers as tf
from packaging.version import Version
from torch import nn

ARCHS = ("gpt2", "llama", "t5", "bert")
#: The keyword transformers attention modules and stacks take their cache under:
#: renamed from ``past_key_values`` in 5.24 (prompthooks reads it from signatures).
CACHE_ARG = "cache" if Version(tf.__version__).release >= (5, 24) else "past_key_values"
DECODER_ONLY = ("gpt2", "llama")
VOCAB = 61
MAX_POSITIONS = 64


def tiny(arch: str, attn: str = "sdpa", seed: int = 0, head: str = "lm") -> nn.Module:
    """A 2-layer model of ``arch`` with deterministic random weights, in eval mode."""
    torch.manual_seed(seed)
    config: Any
    if arch == "gpt2":
        config = tf.GPT2Config(
            n_layer=2,
            n_embd=32,
            n_head=4,
            vocab_size=VOCAB,
            n_positions=MAX_POSITIONS,
            bos_token_id=1,
            eos_token_id=2,
        )
        cls: Any = tf.GPT2LMHeadModel if head == "lm" else tf.GPT2Model
    elif arch == "llama":
        config = tf.LlamaConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=VOCAB,
            max_position_embeddings=MAX_POSITIONS,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
        cls = tf.LlamaForCausalLM if head == "lm" else tf.LlamaModel
    elif arch == "t5":
        config = tf.T5Config(
            num_layers=2,
            d_model=32,
            d_kv=8,
            num_heads=4,
            d_ff=64,
            vocab_size=VOCAB,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=2,
        )
        cls = tf.T5ForConditionalGeneration if head == "lm" else tf.T5EncoderModel
    elif arch == "bert":
        config = tf.BertConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=VOCAB,
            max_position_embeddings=MAX_POSITIONS,
            pad_token_id=0,
        )
        heads = {
            "lm": tf.BertForMaskedLM,
            "base": tf.BertModel,
            "cls": tf.BertForSequenceClassification,
            "tok": tf.BertForTokenClassification,
        }
        cls = heads[head]
    else:
        raise ValueError(arch)
    config._attn_implementation = attn
    model: nn.Module = cls(config).eval()
    if hasattr(model, "generation_config") and model.generation_config is not None:
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = None  # never stop early: fixed lengths
    return model


def padding_side(arch: str) -> str:
    return "left" if arch in DECODER_ONLY else "right"


def batch(
    arch: str, lengths: list[int], seed: int = 0, pad_to: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (never a special id) padded to one length on the architecture's side."""
    g = torch.Generator().manual_seed(seed)
    width = pad_to or max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        tokens = torch.randint(3, VOCAB, (n,), generator=g)
        if arch == "bert":
            tokens[0] = 1  # a [CLS]-like first token
        span = slice(width - n, width) if padding_side(arch) == "left" else slice(0, n)
        ids[row, span] = tokens
        mask[row, span] = 1
    return ids, mask


def unpad(arch: str, ids: torch.Tensor, mask: torch.Tensor, row: int) -> torch.Tensor:
    return ids[row : row + 1, mask[row].bool()]


def decoder_ids(batch_size: int, length: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch_size, length), generator=g)


def model_inputs(arch: str, ids: torch.Tensor, mask: torch.Tensor | None) -> dict[str, Any]:
    kw: dict[str, Any] = {"input_ids": ids}
    if mask is not None:
        kw["attention_mask"] = mask
    if arch == "t5":
        kw["decoder_input_ids"] = decoder_ids(ids.shape[0])
    return kw


def hooks_on(model: nn.Module) -> int:
    """How many forward hooks of any kind are installed anywhere in ``model``."""
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a detach must restore: weights, flags, hooks, submodules."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "flags": {k: p.requires_grad for k, p in model.named_parameters()},
        "hooks": hooks_on(model),
        "modules": [n for n, _ in model.named_modules()],
    }


def same_snapshot(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (
        a["state"].keys() == b["state"].keys()
        and all(torch.equal(a["state"][k], b["state"][k]) for k in a["state"])
        and a["flags"] == b["flags"]
        and a["hooks"] == b["hooks"]
        and a["modules"] == b["modules"]
    )
