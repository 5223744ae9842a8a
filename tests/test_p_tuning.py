"""P-tuning: the prompt encoder's vectors wherever the template puts the pseudo tokens.

The oracle is the model fed ``inputs_embeds`` built by hand: the token
embeddings with the encoder's output rows written at the pseudo-token
positions (plain loops, no library code).

* Pseudo tokens anywhere (the paper's (3, 3, 3) layout), LSTM and MLP encoders, on
  GPT-2 and a BERT masked LM; ``export()`` keeps the outputs.
* A PEFT ``P_TUNING`` adapter loaded with ``ph.load_peft`` gives PEFT's logits.
* ``ph.fill_template`` builds the paper's layouts, and padded template rows equal
  the rows alone.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import PromptEncoderConfig, get_peft_model

import prompthooks as ph
from prompthooks.methods import PromptTable, PTuningPrompt
from tests.support.models import VOCAB, batch, tiny

P = 9


def template_ids(virtual: list[int], cls_first: bool, seed: int) -> torch.Tensor:
    """Two rows of the (3, 3, 3) layout: [CLS] P P P x x P P P y y y P P P [SEP]."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(2):
        words = torch.randint(3, VOCAB, (5,), generator=g).tolist()
        row = [1] if cls_first else []
        row += virtual[0:3] + words[:2] + virtual[3:6] + words[2:] + virtual[6:9]
        row += [2] if cls_first else []
        rows.append(row)
    return torch.tensor(rows)


def oracle(model: torch.nn.Module, ids: torch.Tensor, table: torch.Tensor, start: int):
    embed = model.get_input_embeddings()
    rows = []
    for row in ids.tolist():
        vectors = []
        for token in row:
            if token >= start:
                vectors.append(table[token - start])
            else:
                vectors.append(embed.weight[token])
        rows.append(torch.stack(vectors))
    return model(inputs_embeds=torch.stack(rows), attention_mask=torch.ones_like(ids)).logits


@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_pseudo_tokens_anywhere_equal_hand_built_embeddings(arch: str, encoder: str) -> None:
    model = tiny(arch, head="lm")  # BERT: a masked LM
    torch.manual_seed(0)
    with ph.attach(model, ph.PTuning(P, encoder=encoder, hidden_size=16)) as att:
        virtual = att.virtual_ids()
        ids = template_ids(virtual, cls_first=arch == "bert", seed=1)
        with torch.no_grad():
            got = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            table = att.prompts["default"].table()
        assert got.shape == (2, ids.shape[1], VOCAB)  # nothing inserted: a template
        model(input_ids=ids).logits.square().mean().backward()
        grads = [p.grad for p in att.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
    with torch.no_grad():  # the detached model, fed by hand
        expected = oracle(model, ids, table, virtual[0])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
def test_export_keeps_outputs_and_leaves_one_table(encoder: str, tmp_path: Path) -> None:
    model = tiny("gpt2")
    ids = torch.randint(3, VOCAB, (2, 6))
    with ph.attach(model, ph.PTuning(P, encoder=encoder, hidden_size=16)) as att:
        with torch.no_grad():
            before = model(input_ids=ids).logits
        att.save(tmp_path / "encoder.safetensors")
        att.export()
        assert isinstance(att.prompts["default"], PromptTable)
        assert [tuple(p.shape) for p in att.parameters()] == [(P, 32)]
        with torch.no_grad():
            after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)
    reloaded = ph.load(tmp_path / "encoder.safetensors")["default"]
    assert isinstance(reloaded, PTuningPrompt)  # the encoder is saved: training can resume
    with ph.attach(model, reloaded), torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


@pytest.mark.parametrize("encoder", ["MLP", "LSTM"])
def test_load_peft_p_tuning_gives_peft_logits(encoder: str, tmp_path: Path) -> None:
    model = tiny("gpt2")
    config = PromptEncoderConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=4,
        encoder_hidden_size=16,
        encoder_reparameterization_type=encoder,
    )
    peft_model = get_peft_model(copy.deepcopy(model), config)
    torch.manual_seed(3)
    with torch.no_grad():
        for p in peft_model.prompt_encoder.parameters():
            p.normal_(0, 0.5)
    peft_model.save_pretrained(tmp_path)
    peft_model.eval()
    ids = torch.randint(3, VOCAB, (2, 6))
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, 4:]
    with ph.attach(model, ph.load_peft(tmp_path)), torch.no_grad():
        got = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_p_tuning_spec_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="encoder"):
        ph.PTuning(3, encoder="gru")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_layers"):
        ph.PTuning(3, num_layers=0)
    with pytest.raises(ValueError, match="dropout"):
        ph.PTuning(3, dropout=1.0)


def _word_tokenizer(padding_side: str):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(5, VOCAB)}
    vocab.update({"[PAD]": 0, "[CLS]": 1, "[SEP]": 2, "[MASK]": 3, "[UNK]": 4})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        unk_token="[UNK]",
        padding_side=padding_side,
    )


def test_fill_template_builds_the_papers_333_layouts() -> None:
    virtual = list(range(100, 109))
    bert_tok = _word_tokenizer("right")
    bert = ph.fill_template(
        ["[CLS]", 3, "{mask}", 3, "{x}", 3, "[SEP]"], ["w7 w8", "w9"], bert_tok, virtual
    )
    first = [1, 100, 101, 102, 3, 103, 104, 105, 7, 8, 106, 107, 108, 2]
    assert bert.input_ids[0].tolist() == first
    assert bert.input_ids[1].tolist() == [1, 100, 101, 102, 3, 103, 104, 105, 9] + [
        106,
        107,
        108,
        2,
        0,
    ]
    assert bert.attention_mask.sum(1).tolist() == [14, 13]
    assert bert.target.tolist() == [4, 4]  # the [MASK]
    gpt_tok = _word_tokenizer("left")
    gpt = ph.fill_template([3, "{x}", 3, "w20", 3, "{target}"], ["w7 w8", "w9"], gpt_tok, virtual)
    assert gpt.input_ids[1].tolist() == [0, 100, 101, 102, 9, 103, 104, 105, 20, 106, 107, 108]
    assert gpt.target.tolist() == [11, 11]  # the last position predicts the answer
    with pytest.raises(ValueError, match="places 6 pseudo tokens"):
        ph.fill_template([3, "{x}", 3, "{target}"], ["w7"], gpt_tok, virtual)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_template_rows_padded_equal_rows_alone(arch: str) -> None:
    model = tiny(arch, head="lm")
    tok = _word_tokenizer("left" if arch == "gpt2" else "right")
    pattern = ["[CLS]", 3, "{mask}", 3, "{x}", 3, "[SEP]"] if arch == "bert" else None
    pattern = pattern or [3, "{x}", 3, "w20", 3, "{target}"]
    texts = ["w7 w8 w9 w10", "w11"]
    with ph.attach(model, ph.PTuning(P, encoder="mlp", hidden_size=16)) as att:
        batch = ph.fill_template(pattern, texts, tok, att.virtual_ids())
        with torch.no_grad():
            together = model(**batch.model_inputs()).logits
            for row, text in enumerate(texts):
                alone = ph.fill_template(pattern, [text], tok, att.virtual_ids())
                single = model(**alone.model_inputs()).logits
                torch.testing.assert_close(
                    together[row, batch.target[row]], single[0, alone.target[0]], atol=1e-5, rtol=0
                )


def test_the_encoder_follows_the_models_train_and_eval_mode() -> None:
    """An LSTM encoder with dropout attached to a model in eval mode runs without
    dropout (two identical calls agree); ``model.train()`` / ``model.eval()``
    reach it afterwards."""
    model = tiny("gpt2")  # eval mode
    ids, mask = batch("gpt2", [5, 3])
    spec = ph.PTuning(4, encoder="lstm", num_layers=2, dropout=0.5)
    with ph.attach(model, spec) as att, torch.no_grad():
        prompt = att.prompts["default"]
        assert not any(m.training for m in prompt.modules())
        first = model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(first, model(input_ids=ids, attention_mask=mask).logits)
        model.train()
        assert all(m.training for m in prompt.modules())
        torch.manual_seed(0)
        dropped = model(input_ids=ids, attention_mask=mask).logits
        assert not torch.equal(dropped, first)  # dropout between the LSTM layers is on
        model.eval()
        assert torch.equal(first, model(input_ids=ids, attention_mask=mask).logits)
