"""Prompted logits and loss equal the model run by hand on ``inputs_embeds``.

The oracle itself, for every family: tests/test_conformance.py (oracle). Here: the
label rule of the README's "What happens to your batch" for every padding, heads,
stripped outputs, positional arguments; gradient checkpointing gives the same loss
and prompt gradient.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import prompthooks as ph
from tests.support.models import ARCHS, batch, decoder_ids, tiny
from tests.support.oracle import oracle_logits


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_causal_lm_loss_is_the_loss_of_the_returned_logits(arch: str) -> None:
    """The loss has the targets of the user's batch: it equals the shifted
    cross-entropy a user computes from the (stripped) logits returned, so a
    token count made from the user's labels (``Trainer``'s
    ``num_items_in_batch``) is the right divisor."""
    model = tiny(arch)
    ids, _ = batch(arch, [6, 6, 6], seed=5)
    labels = ids.clone()
    labels[1, 2:4] = -100
    with ph.attach(model, ph.PromptTuning(3)), torch.no_grad():
        out = model(input_ids=ids, labels=labels)
        items = (labels[:, 1:] != -100).sum()
        summed = model(input_ids=ids, labels=labels, num_items_in_batch=items).loss
    by_hand = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
    )
    torch.testing.assert_close(out.loss, by_hand, atol=1e-6, rtol=0)
    torch.testing.assert_close(summed, by_hand, atol=1e-6, rtol=0)


@settings(max_examples=12, deadline=None)
@given(
    arch=st.sampled_from(["gpt2", "llama"]),
    method=st.sampled_from(["prompt", "p-tuning"]),
    side=st.sampled_from(["left", "right"]),
    lengths=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    masked=st.integers(0, 5),
)
def test_causal_lm_loss_is_the_returned_logits_loss_and_the_rows_alone_for_any_padding(
    arch: str, method: str, side: str, lengths: list[int], masked: int
) -> None:
    """The rule of the README's "What happens to your batch", for every padding:
    the loss is the shifted cross-entropy of the logits returned with the user's
    labels (a row's first real token is no target: nothing real precedes it),
    and equals the loss of the rows run alone, unpadded."""
    model = tiny(arch)
    width = max(lengths)
    g = torch.Generator().manual_seed(sum(lengths) + masked)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        span = slice(width - n, width) if side == "left" else slice(0, n)
        ids[row, span] = torch.randint(3, 60, (n,), generator=g)
        mask[row, span] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, masked % width] = -100  # a label the user masked
    first = mask.argmax(dim=1)  # each row's first real token: no target
    targets = labels.scatter(1, first.unsqueeze(1), -100)[:, 1:]
    count = int((targets != -100).sum())
    assume(count > 0)
    prompt = ph.PromptTuning(3) if method == "prompt" else ph.PTuning(3, encoder="mlp")
    with ph.attach(model, prompt), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        rows = [(ids[b, mask[b].bool()], labels[b, mask[b].bool()]) for b in range(len(lengths))]
        alone = [model(input_ids=row[None], labels=lab[None]).logits[0] for row, lab in rows]
    ce = torch.nn.functional.cross_entropy
    by_hand = ce(out.logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
    sums = [
        ce(logits[:-1], lab[1:], ignore_index=-100, reduction="sum")
        for logits, (_, lab) in zip(alone, rows, strict=True)
    ]
    torch.testing.assert_close(out.loss, by_hand, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, torch.stack(sums).sum() / count, atol=1e-5, rtol=0)


def test_strip_false_keeps_virtual_positions() -> None:
    model = tiny("gpt2")
    ids, mask = batch("gpt2", [5, 5])
    with ph.attach(model, ph.PromptTuning(3), strip=False), torch.no_grad():
        assert model(input_ids=ids, attention_mask=mask).logits.shape[1] == 8
    with ph.attach(model, ph.PromptTuning(3)), torch.no_grad():
        assert model(input_ids=ids, attention_mask=mask).logits.shape[1] == 5


@pytest.mark.parametrize("arch", ARCHS)
def test_hidden_states_and_attentions_are_stripped(arch: str) -> None:
    model = tiny(arch, "eager")
    ids, mask = batch(arch, [6, 4])
    extra = {"decoder_input_ids": decoder_ids(2)} if arch == "t5" else {}
    with ph.attach(model, ph.PromptTuning(3)), torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=mask,
            output_hidden_states=True,
            output_attentions=True,
            **extra,
        )
    if arch == "t5":
        assert out.encoder_last_hidden_state.shape[1] == 6
        assert all(h.shape[1] == 6 for h in out.encoder_hidden_states)
        assert all(a.shape[-2:] == (6, 6) for a in out.encoder_attentions)
        assert all(a.shape[-1] == 6 for a in out.cross_attentions)
        assert out.logits.shape[1] == 4  # decoder positions are the user's own
    else:
        assert all(h.shape[1] == 6 for h in out.hidden_states)
        assert all(a.shape[-2:] == (6, 6) for a in out.attentions)


def test_bert_heads_keep_cls_first_and_align_labels() -> None:
    """Token labels get -100 after [CLS]; sequence labels are untouched."""
    tok = tiny("bert", head="tok")
    ids, mask = batch("bert", [6, 4])
    labels = torch.randint(0, 2, ids.shape)
    with ph.attach(tok, ph.PromptTuning(3)) as att:
        table = att.prompts["default"].table().detach().clone()
        with torch.no_grad():
            out = tok(input_ids=ids, attention_mask=mask, labels=labels)
    with torch.no_grad():
        ref, ref_loss = oracle_logits(tok, "bert", ids, mask, table, labels)
    torch.testing.assert_close(out.logits, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, ref_loss, atol=1e-5, rtol=0)

    cls = tiny("bert", head="cls")
    with ph.attach(cls, ph.PromptTuning(3)), torch.no_grad():
        out = cls(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1]))
    assert out.logits.shape == (2, 2) and out.loss is not None


def test_user_position_ids_describe_real_tokens() -> None:
    """Explicit positions equal to the mask-derived ones give the same logits."""
    model = tiny("gpt2")
    ids, mask = batch("gpt2", [6, 3])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with ph.attach(model, ph.PromptTuning(4)), torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).logits
        b = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], atol=1e-6, rtol=0)


def test_positional_arguments_work() -> None:
    model = tiny("gpt2")
    ids, _ = batch("gpt2", [5])
    with ph.attach(model, ph.PromptTuning(2)), torch.no_grad():
        a = model(ids).logits
        b = model(input_ids=ids).logits
    assert torch.equal(a, b)


def test_inputs_embeds_get_the_prompt_too() -> None:
    model = tiny("llama")
    ids, mask = batch("llama", [6, 4])
    with ph.attach(model, ph.PromptTuning(3)), torch.no_grad():
        from_ids = model(input_ids=ids, attention_mask=mask).logits
        embeds = model.get_input_embeddings()(ids)
        from_embeds = model(inputs_embeds=embeds, attention_mask=mask).logits
    torch.testing.assert_close(from_ids, from_embeds, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_gradient_checkpointing_gives_the_same_loss_and_prompt_gradient(arch: str) -> None:
    model = tiny(arch)
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    ids, mask = batch(arch, [6, 4])
    with ph.attach(model, ph.PromptTuning(3)) as att:
        weight = att.prompts["default"].weight
        results = []
        for checkpointing in (False, True):
            if checkpointing:
                model.activation_checkpointing_enable()
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
            loss.backward()
            assert weight.grad is not None
            results.append((loss.detach(), weight.grad.clone()))
            weight.grad = None
        model.activation_checkpointing_disable()
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-6, rtol=0)
