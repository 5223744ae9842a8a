"""What happens to a batch whose rows differ: rows with and without virtual ids,
ids at the vocabulary's edge, ids that are neither, an embedding resized while
attached. Each row gets what it gets alone, or the call gets a clear error."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prompthooks as ph
from tests.support.models import VOCAB, tiny

P = 3


def _row(draw: st.DrawFn, template: bool, virtual: list[int], length: int) -> list[int]:
    """Real ids drawn towards the vocabulary's edge; a template row holds
    some of the prompt's virtual ids among them."""
    real = st.sampled_from([3, 4, VOCAB - 2, VOCAB - 1]) | st.integers(3, VOCAB - 1)
    tokens = [draw(real) for _ in range(length)]
    if template:
        where = draw(st.integers(0, length))
        tokens[where:where] = draw(st.lists(st.sampled_from(virtual), min_size=1, max_size=P))
    return tokens


@st.composite
def _batches(draw: st.DrawFn, virtual: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    count = draw(st.integers(1, 4))
    rows = [_row(draw, draw(st.booleans()), virtual, draw(st.integers(1, 5))) for _ in range(count)]
    side = draw(st.sampled_from(["left", "right"]))
    width = max(len(r) for r in rows) + draw(st.integers(0, 2))
    ids = torch.zeros(count, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[b, span] = torch.tensor(row)
        mask[b, span] = 1
    return ids, mask


@settings(max_examples=30, deadline=None)
@given(arch=st.sampled_from(["gpt2", "llama"]), data=st.data())
def test_rows_with_and_without_virtual_ids_each_get_what_they_get_alone(
    arch: str, data: st.DataObject
) -> None:
    """Whether a row holds virtual ids (a template) is decided row by row: plain
    rows get the prompt inserted, template rows keep theirs, whatever the
    padding and however close real ids come to the vocabulary's edge."""
    model = tiny(arch)
    with ph.attach(model, ph.PromptTuning(P)) as att, torch.no_grad():
        ids, mask = data.draw(_batches(att.virtual_ids()))
        out = model(input_ids=ids, attention_mask=mask).logits
        for b in range(ids.shape[0]):
            real = mask[b].bool()
            alone = model(input_ids=ids[b : b + 1, real]).logits[0]
            torch.testing.assert_close(out[b, real], alone, atol=1e-5, rtol=0)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_an_id_that_is_neither_a_token_nor_a_virtual_id_is_named(arch: str) -> None:
    model = tiny(arch)
    with ph.attach(model, ph.PromptTuning(P)) as att:
        before = _snapshot(model)
        stray = max(att.virtual_ids()) + 1
        ids = torch.tensor([[5, 6, 7], [8, stray, 9]])
        with pytest.raises(IndexError, match=rf"input id {stray} .*{VOCAB}-token vocabulary"):
            model(input_ids=ids)
        after = _snapshot(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_resizing_the_embedding_while_attached_is_refused_clearly(method: str) -> None:
    """Virtual ids start at the vocabulary size the prompt was attached with;
    after a resize they would be real tokens. The next call says so, and
    detach / resize / attach again works."""
    model = tiny("gpt2")
    prompt = ph.PromptTuning(P) if method == "prompt" else ph.PrefixTuning(P)
    ids = torch.tensor([[5, 6, 7]])
    att = ph.attach(model, prompt)
    model.resize_token_embeddings(VOCAB + 8)
    if method == "prompt":
        with pytest.raises(RuntimeError, match=r"resized while prompts were attached.*detach"):
            model(input_ids=ids)
    else:  # a prefix has no virtual ids: resizing changes nothing it relies on
        model(input_ids=ids)
    att.detach()
    with ph.attach(model, ph.PromptTuning(P)) as again:
        assert min(again.virtual_ids()) == VOCAB + 8
        assert model(input_ids=ids).logits.shape == (1, 3, VOCAB + 8)


def test_an_encoder_decoder_batch_mixing_template_and_plain_rows_is_refused() -> None:
    """``generate`` runs an encoder-decoder model's encoder on its own, so its
    decoder cannot learn which rows got a prompt: such a batch is refused,
    naming the fix, and leaves the model as it was."""
    model = tiny("t5")
    with ph.attach(model, ph.PromptTuning(P)) as att:
        before = _snapshot(model)
        virtual = att.virtual_ids()
        ids = torch.tensor([[5, 6, 7], [virtual[0], 8, 9]])
        with pytest.raises(ValueError, match="virtual ids or none"):
            model(input_ids=ids, decoder_input_ids=torch.tensor([[0], [0]]))
        model(input_ids=ids[:1], decoder_input_ids=torch.tensor([[0]]))  # plain rows work
        after = _snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
