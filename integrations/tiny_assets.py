"""A tiny model, tokenizer and corpus for the integration scripts' ``--tiny`` runs.

Everything is built locally in well under a second, so the tests can run each
integration end to end: a 2-layer LLaMA with random weights, a word-level
tokenizer (``w3 w4 ...``) and a corpus with a structure a soft prompt can learn
(every sentence counts upwards through a small set of words, so a prompt that
raises the odds of those words lowers the loss).
"""

from __future__ import annotations

import random
from typing import Literal

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

VOCAB = 64
PAD, BOS, EOS = 0, 1, 2
FIRST_WORD = 3
#: Sentences use these words only, in counting order (wrapping around).
CYCLE = 12
SENTENCE_WORDS = 10


def word_tokenizer(padding_side: Literal["left", "right"] = "right") -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``w3 ... w63`` with pad/bos/eos tokens."""
    vocab = {"[PAD]": PAD, "[BOS]": BOS, "[EOS]": EOS}
    vocab |= {f"w{i}": i for i in range(FIRST_WORD, VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[PAD]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        padding_side=padding_side,
        model_input_names=["input_ids", "attention_mask"],  # LLaMA takes no token_type_ids
    )


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer LLaMA (grouped-query attention, no dropout) with seeded random weights.

    Generation never stops at an end-of-sequence token, so every run produces
    exactly ``max_new_tokens`` tokens and outputs can be compared position by position.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=128,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None
    torch.nn.Module.eval(model)
    return model


def counting_texts(n: int, seed: int) -> list[str]:
    """``n`` sentences of consecutive words from a cycle of ``CYCLE`` words."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        start = rng.randrange(CYCLE)
        words = [f"w{FIRST_WORD + (start + i) % CYCLE}" for i in range(SENTENCE_WORDS)]
        texts.append(" ".join(words))
    return texts
