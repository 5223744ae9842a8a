"""Bad input gets an error that names the problem, and the model is left as it was."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import PromptTuningConfig, get_peft_model
from torch import nn

import prompthooks as ph
from tests.support.models import MAX_POSITIONS, VOCAB, batch, same_snapshot, snapshot, tiny


class Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.emb(x)


def test_unsupported_architecture_lists_locators_and_how_to_register() -> None:
    model = Unknown()
    before = snapshot(model)
    with pytest.raises(ph.UnsupportedModelError) as info:
        ph.attach(model, ph.PromptTuning(3))
    message = str(info.value)
    assert "Unknown" in message
    for name in ("gpt2", "llama", "t5", "bert"):
        assert name in message
    assert "register_locator" in message
    assert same_snapshot(before, snapshot(model))


def test_second_prompt_under_an_attached_name() -> None:
    model = tiny("gpt2")
    att = ph.attach(model, ph.PromptTuning(3))
    attached = snapshot(model)
    with pytest.raises(ValueError, match="'default' is already attached"):
        ph.attach(model, ph.PromptTuning(4))
    assert same_snapshot(attached, snapshot(model))
    att.detach()


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_num_virtual_tokens_must_be_positive(n: object) -> None:
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        ph.PromptTuning(n)  # type: ignore[arg-type]


def test_text_init_needs_a_tokenizer_and_a_text() -> None:
    with pytest.raises(ValueError, match="tokenizer"):
        ph.PromptTuning(5, init="text", init_text="hello")
    with pytest.raises(ValueError, match="init_text"):
        ph.PromptTuning(5, init="text", tokenizer=object())
    with pytest.raises(ValueError, match="init must be"):
        ph.PromptTuning(5, init="zeros")  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_input_too_long_once_the_prompt_is_added(arch: str) -> None:
    model = tiny(arch)
    ids, mask = batch(arch, [MAX_POSITIONS - 2])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)  # fits without a prompt
    calls = []
    model.get_input_embeddings().register_forward_hook(lambda *a: calls.append(1))
    with ph.attach(model, ph.PromptTuning(4)):
        expected = f"{MAX_POSITIONS + 2} positions.*at most {MAX_POSITIONS}"
        with pytest.raises(ValueError, match=expected):
            model(input_ids=ids, attention_mask=mask)
    assert calls == []  # refused before the model ran


def test_peft_adapter_for_another_hidden_size(tmp_path: Path) -> None:
    other = tiny("gpt2")
    other.config.n_embd = 48
    import transformers as tf

    bigger = tf.GPT2LMHeadModel(
        tf.GPT2Config(n_layer=1, n_embd=48, n_head=4, vocab_size=VOCAB, n_positions=MAX_POSITIONS)
    )
    peft_model = get_peft_model(
        copy.deepcopy(bigger), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    peft_model.save_pretrained(tmp_path)
    model = tiny("gpt2")
    before = snapshot(model)
    prompt = ph.load_peft(tmp_path)
    with pytest.raises(ValueError, match=r"hidden size 48.*32.*\(4, 48\).*\(4, 32\)"):
        ph.attach(model, prompt)
    assert same_snapshot(before, snapshot(model))


def test_load_peft_rejects_other_adapter_types_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        ph.load_peft(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(FileNotFoundError, match="never pickle"):
        ph.load_peft(tmp_path)
    (tmp_path / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="LORA"):
        ph.load_peft(tmp_path)


def test_several_prompts_need_a_selection() -> None:
    model = tiny("gpt2")
    ids, mask = batch("gpt2", [4])
    with ph.attach(model, {"a": ph.PromptTuning(2), "b": ph.PromptTuning(3)}) as att:
        with pytest.raises(RuntimeError, match="att.use"):
            model(input_ids=ids, attention_mask=mask)
        with att.use("b"), torch.no_grad():
            assert model(input_ids=ids, attention_mask=mask).logits.shape[1] == 4
        with pytest.raises(KeyError, match="'c'"):
            with att.use("c"):
                pass


def test_failed_build_leaves_the_model_unchanged() -> None:
    model = tiny("gpt2")
    before = snapshot(model)

    class Broken:
        def build(self, located: object) -> object:
            raise RuntimeError("cannot build")

    with pytest.raises(RuntimeError, match="cannot build"):
        ph.attach(model, {"ok": ph.PromptTuning(2), "bad": Broken()})  # type: ignore[dict-item]
    assert same_snapshot(before, snapshot(model))


# -- prefixes -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
        ({"num_virtual_tokens": 3, "hidden_size": 0}, "hidden_size"),
    ],
)
def test_prefix_spec_rejects_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ph.PrefixTuning(**kwargs)


def test_prefix_for_another_model_names_both_shapes() -> None:
    gpt2, llama = tiny("gpt2"), tiny("llama")
    with ph.attach(gpt2, ph.PrefixTuning(3)) as att:
        prefix = att.prompts["default"]
    before = snapshot(llama)
    with pytest.raises(ValueError, match=r"\(4, 8\).*\(2, 8\)|\(2, 8\).*\(4, 8\)") as info:
        ph.attach(llama, prefix)
    assert "(P, 128)" in str(info.value) and "(P, 64)" in str(info.value)
    assert same_snapshot(before, snapshot(llama))


def test_prefix_too_long_with_position_shift_is_refused_before_running() -> None:
    model = tiny("gpt2")
    ids = torch.randint(3, VOCAB, (1, MAX_POSITIONS - 2))
    with ph.attach(model, ph.PrefixTuning(4)):
        with pytest.raises(ValueError, match="shift_positions=False"):
            model(input_ids=ids)
    with ph.attach(model, ph.PrefixTuning(4, shift_positions=False)), torch.no_grad():
        assert model(input_ids=ids).logits.shape == (1, MAX_POSITIONS - 2, VOCAB)


def test_prefix_has_no_virtual_ids() -> None:
    model = tiny("gpt2")
    with ph.attach(model, ph.PrefixTuning(3)) as att:
        with pytest.raises(ValueError, match="prefix"):
            att.virtual_ids()


def test_decoding_a_cache_filled_without_the_prefix_is_refused() -> None:
    model = tiny("llama")
    ids, mask = batch("llama", [5, 5], seed=1)
    with torch.no_grad():
        cache = model(input_ids=ids, attention_mask=mask, use_cache=True).past_key_values
    with ph.attach(model, ph.PrefixTuning(3)):
        with pytest.raises(ValueError, match="not filled with the attached prefix"):
            model(input_ids=ids[:, :1], past_key_values=cache)


def test_t5_prefix_cannot_be_written_in_peft_format(tmp_path: Path) -> None:
    model = tiny("t5")
    with ph.attach(model, ph.PrefixTuning(3)) as att:
        with pytest.raises(ValueError, match="att.save"):
            att.save_peft(tmp_path)
    assert not (tmp_path / "adapter_model.safetensors").exists()


def test_peft_prefix_for_a_seq2seq_model_is_explained(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "PREFIX_TUNING",
                "num_virtual_tokens": 2,
                "num_transformer_submodules": 2,
                "num_layers": 2,
                "num_attention_heads": 4,
                "token_dim": 32,
            }
        )
    )
    from safetensors.torch import save_file

    save_file(
        {"prompt_embeddings": torch.zeros(2, 128)}, str(tmp_path / "adapter_model.safetensors")
    )
    with pytest.raises(ValueError, match="decoder self-attention"):
        ph.load_peft(tmp_path)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_a_prompt_longer_than_the_position_table_is_refused_at_attach(arch: str) -> None:
    """Refused at attach, where the limit is known, not at the first forward."""
    model = tiny(arch)
    limit = ph.locate(model).max_positions
    assert limit is not None
    before = snapshot(model)
    for spec in (ph.PromptTuning(limit), ph.PrefixTuning(limit)):
        with pytest.raises(ValueError, match=f"takes {limit} positions.*at most {limit}"):
            ph.attach(model, spec)
        assert same_snapshot(before, snapshot(model))
    ph.attach(model, ph.PromptTuning(limit - 1)).detach()  # one real token still fits
    ph.attach(model, ph.PrefixTuning(limit, shift_positions=False)).detach()  # takes none
