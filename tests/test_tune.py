"""The decorator, save/load, and the three initialisations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import prompthooks as ph
from tests.support.models import VOCAB, batch, same_snapshot, snapshot, tiny


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {f"w{i}": i for i in range(VOCAB)}
    vocab["[UNK]"] = 0
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.mark.parametrize(
    "spec", [ph.PromptTuning(4), ph.PrefixTuning(4, hidden_size=16)], ids=["prompt", "prefix"]
)
def test_tune_decorates_unchanged_training_code(
    tmp_path: Path, spec: ph.PromptTuning | ph.PrefixTuning
) -> None:
    model = tiny("gpt2")
    before = snapshot(model)
    ids, mask = batch("gpt2", [6, 4])
    path = tmp_path / "prompt.safetensors"

    @ph.tune(spec, model="model", save_to=path)
    def train(model: torch.nn.Module, steps: int) -> float:
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
            loss.backward()
            optimizer.step()
        return float(loss.detach())

    first = train(model, 1)
    later = train(model, 5)  # a fresh prompt each call, trained for longer
    assert later < first
    assert same_snapshot(before, snapshot(model))
    ((name, prompt),) = ph.load(path).items()
    with ph.attach(model, prompt), torch.no_grad():
        reloaded = float(model(input_ids=ids, attention_mask=mask, labels=ids).loss)
    assert reloaded < first


def test_tune_needs_the_named_parameter() -> None:
    with pytest.raises(TypeError, match="'net'"):
        ph.tune(ph.PromptTuning(2), model="net")(lambda model: None)


def test_tune_reads_a_model_given_as_the_default() -> None:
    """The decorated function's model parameter has a default and the caller
    leaves it out: the default is the model prompts attach to (it raised KeyError)."""
    default = tiny("gpt2")
    ids, mask = batch("gpt2", [4, 3])
    seen: list[int] = []

    @ph.tune(ph.PromptTuning(2))
    def evaluate(ids: torch.Tensor, model: torch.nn.Module = default) -> torch.Tensor:
        seen.append(sum(1 for n, _ in model.named_parameters() if n.startswith("prompthooks")))
        out: torch.Tensor = model(input_ids=ids, attention_mask=mask).logits
        return out

    before = snapshot(default)
    assert evaluate(ids).shape == (2, 4, VOCAB)
    assert seen == [1]  # attached for the call ...
    assert same_snapshot(before, snapshot(default))  # ... and detached after it

    @ph.tune(ph.PromptTuning(2))
    def no_model(model: torch.nn.Module | None = None) -> None: ...

    with pytest.raises(TypeError, match="argument 'model', which is NoneType"):
        no_model()


def test_text_init_uses_the_texts_embeddings_repeated_to_length() -> None:
    model = tiny("llama")
    tok = word_tokenizer()
    spec = ph.PromptTuning(5, init="text", init_text="w7 w9", tokenizer=tok)
    with ph.attach(model, spec) as att:
        table = att.prompts["default"].weight.detach()
        embed = model.get_input_embeddings().weight
        assert torch.equal(table, embed[[7, 9, 7, 9, 7]])


def test_vocab_init_copies_vocabulary_rows_and_random_init_is_scaled() -> None:
    model = tiny("gpt2")
    embed = model.get_input_embeddings().weight.detach()
    with ph.attach(model, ph.PromptTuning(6, init="vocab")) as att:
        table = att.prompts["default"].weight.detach()
        assert all(any(torch.equal(row, e) for e in embed) for row in table)
    torch.manual_seed(0)
    # Many rows for a steady estimate: built, not attached (200 rows leave no position
    # of this model's 64 for an input, so attaching them is refused).
    prompt = ph.PromptTuning(200, init="random").build(ph.locate(model))
    std = float(prompt.weight.std())
    assert abs(std - float(embed.std())) < 0.3 * float(embed.std())
    with ph.attach(model, ph.PromptTuning(20, init="random")) as att:
        assert len(list(att.parameters())) == 1


class _ScaledEmbedding(torch.nn.Embedding):
    """Like Gemma's embedding: the model sees each row multiplied by a scale."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 8.0


def test_init_starts_from_what_a_scaled_embedding_outputs() -> None:
    """Text, vocab and random init match the vectors the model actually sees,
    not the raw rows of an embedding that scales them (Gemma, PEFT's behaviour)."""
    model = tiny("llama")
    old = model.model.embed_tokens
    scaled = _ScaledEmbedding(old.num_embeddings, old.embedding_dim)
    scaled.weight = old.weight
    model.model.embed_tokens = scaled
    tok = word_tokenizer()
    spec = ph.PromptTuning(4, init="text", init_text="w7 w9", tokenizer=tok)
    with ph.attach(model, spec) as att:
        table = att.prompts["default"].weight.detach()
        assert torch.equal(table, 8.0 * old.weight.detach()[[7, 9, 7, 9]])
    with ph.attach(model, ph.PromptTuning(6, init="vocab")) as att:
        table = att.prompts["default"].weight.detach()
        rows = 8.0 * old.weight.detach()
        assert all(any(torch.equal(row, e) for e in rows) for row in table)
    torch.manual_seed(0)
    prompt = ph.PromptTuning(300, init="random").build(ph.locate(model))  # built, not attached
    std = float(prompt.weight.std())
    seen = 8.0 * float(old.weight.std())
    assert abs(std - seen) < 0.2 * seen
