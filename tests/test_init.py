"""Issue 19: prompts that start from the model's own activations.

Oracles, none of them library code:

* decoder-only models: the bare model fed the text's tokens concatenated by
  hand in front of each row's first real token (positions counted over the
  mask in a loop); ``generate`` on that input;
* BERT (P-tuning): the text's tokens typed right after ``[CLS]``;
* bidirectional models (no fixed prefix equals typed text there): the first
  layer's keys and values recomputed by hand from the embedding and the key /
  value projections of a run over the text alone, and the cross-attention
  keys from the bare encoder's output over the text;
* ``save_peft``: PEFT's own model given the saved adapter.

Measured once on the real Gemma-3-270M (three left-padded reviews; not by these
tests): a prefix initialised from a 7-token text differs from the text typed in
front by at most 3.4e-5 in the logits (4.8e-5 through the MLP), on logits of up
to 30 that the text moves by up to 6.3; P-tuning's text init by 3.5e-5 (LSTM) and
3.9e-5 (MLP). The MLP's closed-form fit is exact when ``hidden_size + 1 >= P``
(3.8e-9 relative there). A zero prefix is no no-op: 10 zero tokens move the logits
by up to 2.33 (mean 0.24), 1 token by 0.33 (0.04), a random 10-token prefix by 6.49
(0.87).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel, PrefixTuningConfig, get_peft_model
from torch import nn

import prompthooks as ph
from prompthooks.methods import Prefix, PTuningPrompt
from tests.support.builders import encoder_batch, tiny_bart, tiny_causal, tiny_encoder
from tests.support.models import VOCAB, batch, tiny
from tests.support.plain_models import PlainLM, PlainSeq2Seq

TEXT = [5, 9, 11, 4, 7]

pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")


class Ids:
    """A tokenizer for tests: ``"5 9 11"`` -> ids 5, 9, 11 (special tokens: none)."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [int(t) for t in text.split()]}


def words(ids: list[int]) -> str:
    return " ".join(str(i) for i in ids)


def prefix_spec(ids: list[int] = TEXT, **kw: Any) -> ph.PrefixTuning:
    return ph.PrefixTuning(init="text", init_text=words(ids), tokenizer=Ids(), **kw)


def p_tuning_spec(ids: list[int] = TEXT, **kw: Any) -> ph.PTuning:
    return ph.PTuning(init="text", init_text=words(ids), tokenizer=Ids(), **kw)


def causal(arch: str) -> nn.Module:
    return tiny(arch) if arch in ("gpt2", "llama") else tiny_causal(arch)


# -- the oracle: text typed in front ---------------------------------------------------


def typed(
    ids: torch.Tensor, mask: torch.Tensor, text: list[int], after: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]]]:
    """Rows with ``text`` written in before each row's first real token (``after``
    tokens after it: 1 keeps ``[CLS]`` first); the mask, positions counted over
    the mask, and per row the indices of the user's own tokens."""
    rows, masks, positions, keep = [], [], [], []
    for row, m in zip(ids.tolist(), mask.tolist(), strict=True):
        at = m.index(1) + after
        rows.append(row[:at] + text + row[at:])
        full = m[:at] + [1] * len(text) + m[at:]
        masks.append(full)
        count, pos = 0, []
        for v in full:
            pos.append(count if v else 0)
            count += v
        positions.append(pos)
        keep.append(list(range(at)) + list(range(at + len(text), len(full))))
    return torch.tensor(rows), torch.tensor(masks), torch.tensor(positions), keep


def typed_logits(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, text: list[int], after: int = 0
) -> torch.Tensor:
    full, full_mask, positions, keep = typed(ids, mask, text, after)
    with torch.no_grad():
        out = model(input_ids=full, attention_mask=full_mask, position_ids=positions)
    logits: torch.Tensor = out if isinstance(out, torch.Tensor) else out.logits
    return torch.stack([logits[b, keep[b]] for b in range(ids.shape[0])])


def logits_of(model: nn.Module, **kw: Any) -> torch.Tensor:
    with torch.no_grad():
        out = model(**kw)
    result: torch.Tensor = out if isinstance(out, torch.Tensor) else out.logits
    return result


def assert_real_close(got: torch.Tensor, expected: torch.Tensor, mask: torch.Tensor) -> float:
    """Equal at real tokens; returns the largest difference."""
    diff = float((got - expected)[mask.bool()].abs().max())
    assert diff <= 2e-5, diff
    return diff


# -- prefixes: decoder-only models equal the text typed in front ----------------------


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox", "opt"])
def test_text_prefix_equals_text_typed_in_front(arch: str, projection: bool) -> None:
    model = causal(arch)
    ids, mask = batch("gpt2", [7, 3, 5], seed=4)  # left padded
    expected = typed_logits(model, ids, mask, TEXT)
    bare = logits_of(model, input_ids=ids, attention_mask=mask)
    assert float((bare - expected)[mask.bool()].abs().max()) > 0.05  # the text matters
    with ph.attach(model, prefix_spec(projection=projection)) as att:
        assert att.prompts["default"].num_virtual_tokens == len(TEXT)
        got = logits_of(model, input_ids=ids, attention_mask=mask)
        unpadded = logits_of(model, input_ids=ids[:1])  # the longest row, no mask at all
    assert_real_close(got, expected, mask)
    torch.testing.assert_close(unpadded, expected[:1], atol=2e-5, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_text_prefix_generate_equals_generate_after_typed_text(arch: str) -> None:
    model = causal(arch)
    ids, mask = batch(arch, [6, 2, 4], seed=8)
    full, full_mask, _, _ = typed(ids, mask, TEXT)
    settings_ = {"max_new_tokens": 6, "do_sample": False}
    with torch.no_grad():
        expected = model.generate(input_ids=full, attention_mask=full_mask, **settings_)
        with ph.attach(model, prefix_spec(projection=False)):
            cached = model.generate(input_ids=ids, attention_mask=mask, **settings_)
            uncached = model.generate(
                input_ids=ids, attention_mask=mask, use_cache=False, **settings_
            )
    new = expected[:, full.shape[1] :]
    assert torch.equal(cached[:, ids.shape[1] :], new)
    assert torch.equal(uncached[:, ids.shape[1] :], new)


@settings(max_examples=6, deadline=None)
@given(
    text=st.lists(st.integers(3, VOCAB - 1), min_size=1, max_size=5),
    count=st.one_of(st.none(), st.integers(1, 9)),
    projection=st.booleans(),
)
def test_num_virtual_tokens_repeats_or_cuts_the_text(
    text: list[int], count: int | None, projection: bool
) -> None:
    """A given length runs the model over the ids repeated or cut to it: the
    prefix equals those ids typed in front."""
    model = tiny("llama")
    ids, mask = batch("llama", [5, 3], seed=2)
    length = len(text) if count is None else count
    spelled = (text * length)[:length]
    spec = prefix_spec(text, num_virtual_tokens=count, projection=projection)
    with ph.attach(model, spec) as att:
        assert att.prompts["default"].num_virtual_tokens == length
        got = logits_of(model, input_ids=ids, attention_mask=mask)
    assert_real_close(got, typed_logits(model, ids, mask, spelled), mask)


@pytest.mark.parametrize("batch_first", [True, False])
def test_text_prefix_on_a_plain_causal_multihead_attention_model(batch_first: bool) -> None:
    """``nn.MultiheadAttention`` models number positions themselves (the prefix
    does not shift them), so the call passes positions that start after the text."""
    model = PlainLM(batch_first)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 29, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    mask[2, 2:] = 0  # right padded
    text = [4, 8, 15, 16]
    expected = typed_logits(model, ids, mask, text)
    positions = (mask.cumsum(-1) - 1).clamp(min=0) + len(text)
    with ph.attach(model, prefix_spec(text, projection=False)):
        got = logits_of(model, input_ids=ids, attention_mask=mask, position_ids=positions)
    assert_real_close(got, expected, mask)


def test_text_prefix_rows_of_a_mixed_batch_equal_the_text_typed_in_front() -> None:
    model = tiny("llama")
    ids, mask = batch("llama", [6, 4, 5], seed=6)
    prompts = {
        "text": prefix_spec(projection=False),
        "other": ph.PrefixTuning(3, projection=False),
        "soft": ph.PromptTuning(2),
    }
    expected = typed_logits(model, ids, mask, TEXT)
    with ph.attach(model, prompts) as att, att.use(["text", "other", "text"]):
        got = logits_of(model, input_ids=ids, attention_mask=mask)
    rows = torch.tensor([0, 2])
    assert_real_close(got[rows], expected[rows], mask[rows])


# -- prefixes: bidirectional and encoder-decoder models -----------------------------


def _text_table(model: nn.Module, **kw: Any) -> torch.Tensor:
    with ph.attach(model, prefix_spec(projection=False, **kw)) as att:
        prompt = att.prompts["default"]
        assert isinstance(prompt, Prefix) and prompt.weight is not None
        return prompt.weight.detach().clone()


def _site(table: torch.Tensor, model: nn.Module, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Site ``index``'s keys and values ``(P, H * D)`` from a table (documented layout)."""
    sites = ph.locate(model).sites
    start = sum(2 * s.num_kv_heads * s.head_dim for s in sites[:index])
    w = sites[index].num_kv_heads * sites[index].head_dim
    return table[:, start : start + w], table[:, start + w : start + 2 * w]


def _differs_from_random(model: nn.Module, kw: dict[str, Any]) -> None:
    text_out = logits_or_hidden(model, prefix_spec(projection=False), kw)
    random_out = logits_or_hidden(model, ph.PrefixTuning(len(TEXT), projection=False), kw)
    bare = logits_or_hidden(model, None, kw)
    assert torch.isfinite(text_out).all()
    assert float((text_out - random_out).abs().max()) > 1e-3
    assert float((text_out - bare).abs().max()) > 1e-3


def logits_or_hidden(model: nn.Module, spec: Any, kw: dict[str, Any]) -> torch.Tensor:
    def run() -> torch.Tensor:
        with torch.no_grad():
            out = model(**kw)
        for name in ("logits", "last_hidden_state"):
            if hasattr(out, name):
                result: torch.Tensor = getattr(out, name)
                return result
        assert isinstance(out, torch.Tensor)
        return out

    if spec is None:
        return run()
    with ph.attach(model, spec):
        return run()


def test_bert_text_prefix_holds_each_sites_keys_of_the_text_alone() -> None:
    model = tiny("bert", head="base")
    text = torch.tensor([TEXT])
    table = _text_table(model)
    with torch.no_grad():
        hidden = model.embeddings(input_ids=text)[0]
        attention = model.encoder.layer[0].attention.self
        keys, values = attention.key(hidden), attention.value(hidden)
        second = model.encoder.layer[0](hidden[None])[0]
        second = second[0] if isinstance(second, tuple) else second
        keys_1 = model.encoder.layer[1].attention.self.key(second)
    got_k, got_v = _site(table, model, 0)
    torch.testing.assert_close(got_k, keys, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_v, values, atol=1e-5, rtol=0)
    torch.testing.assert_close(_site(table, model, 1)[0], keys_1.reshape(len(TEXT), -1))
    ids, mask = batch("bert", [6, 4])
    _differs_from_random(model, {"input_ids": ids, "attention_mask": mask})


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_encoder_family_text_prefix_holds_the_first_layers_keys(family: str) -> None:
    model = tiny_encoder(family)
    table = _text_table(model)
    text = torch.tensor([TEXT])
    with torch.no_grad():
        hidden = model.embeddings(input_ids=text)[0]
        if family == "distilbert":
            attention = model.transformer.layer[0].attention
            keys, values = attention.k_lin(hidden), attention.v_lin(hidden)
        else:
            attention = model.encoder.layer[0].attention.self
            keys, values = attention.key(hidden), attention.value(hidden)
    got_k, got_v = _site(table, model, 0)
    torch.testing.assert_close(got_k, keys, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_v, values, atol=1e-5, rtol=0)
    ids, mask = encoder_batch(family, [6, 4])
    _differs_from_random(model, {"input_ids": ids, "attention_mask": mask})


def test_t5_text_prefix_reads_the_encoder_and_decoder_runs_over_the_text() -> None:
    """Encoder self-attention: the encoder's run over the text; decoder
    self-attention: the decoder's run over the text; cross-attention: keys of
    the encoder's output over the text."""
    model = tiny("t5")
    table = _text_table(model)
    layers = model.config.num_layers
    text = torch.tensor([TEXT])
    with torch.no_grad():
        enc_attn = model.encoder.block[0].layer[0]
        normed = enc_attn.layer_norm(model.encoder.embed_tokens(text))[0]
        encoded = model.encoder(input_ids=text).last_hidden_state[0]
        dec_attn = model.decoder.block[0].layer[0]
        dec_normed = dec_attn.layer_norm(model.decoder.embed_tokens(text))[0]
        cross = model.decoder.block[1].layer[1].EncDecAttention
    torch.testing.assert_close(_site(table, model, 0)[0], enc_attn.SelfAttention.k(normed))
    torch.testing.assert_close(_site(table, model, 0)[1], enc_attn.SelfAttention.v(normed))
    sites = ph.locate(model).sites
    assert (sites[layers].role, sites[layers + 3].role) == ("dec_self", "cross")
    torch.testing.assert_close(_site(table, model, layers)[0], dec_attn.SelfAttention.k(dec_normed))
    torch.testing.assert_close(_site(table, model, layers + 3)[0], cross.k(encoded))
    torch.testing.assert_close(_site(table, model, layers + 3)[1], cross.v(encoded))
    ids, mask = batch("t5", [6, 4])
    _differs_from_random(
        model, {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids[:, :3]}
    )
    encoder_only = tiny("t5", head="base")
    _differs_from_random(encoder_only, {"input_ids": ids, "attention_mask": mask})


@pytest.mark.parametrize("head", ["lm", "cls"])
def test_bart_text_prefix_runs_and_reads_the_encoded_text(head: str) -> None:
    model = tiny_bart(head=head)
    table = _text_table(model)
    text = torch.tensor([TEXT])
    layers = model.config.encoder_layers
    with torch.no_grad():
        encoded = model.get_encoder()(input_ids=text).last_hidden_state[0]
        cross = model.get_decoder().layers[0].encoder_attn
    assert ph.locate(model).sites[layers + 1].role == "cross"
    torch.testing.assert_close(_site(table, model, layers + 1)[0], cross.k_proj(encoded))
    ids, mask = batch("t5", [6, 4])
    ids[:, 3] = 2  # the classifier pools an end-of-sequence token
    kw: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if head == "lm":
        kw["decoder_input_ids"] = torch.tensor([[2, 5], [2, 7]])
    _differs_from_random(model, kw)


@pytest.mark.parametrize("batch_first", [True, False])
def test_plain_seq2seq_text_prefix_holds_the_attention_inputs(batch_first: bool) -> None:
    model = PlainSeq2Seq(batch_first)
    table = _text_table(model)
    text = torch.tensor([TEXT])
    with torch.no_grad():
        x = model.tok(text) + model.pos(torch.arange(len(TEXT)))
        memory = model.core.encoder(x if batch_first else x.transpose(0, 1))
        memory = memory[0] if batch_first else memory[:, 0]
    sites = ph.locate(model).sites
    first_cross = next(i for i, s in enumerate(sites) if s.role == "cross")
    torch.testing.assert_close(_site(table, model, 0)[0], x[0])  # the first layer's input
    torch.testing.assert_close(_site(table, model, first_cross)[0], memory)
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 0]])
    kw = {
        "input_ids": ids,
        "attention_mask": (ids > 0).long(),
        "decoder_input_ids": torch.tensor([[3, 5], [4, 6]]),
    }
    _differs_from_random(model, kw)


# -- the MLP: closed-form fit ----------------------------------------------------------


@pytest.mark.parametrize("init", ["text", "zero"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5", "bert"])
def test_projection_is_fitted_to_the_table(arch: str, init: str) -> None:
    model = tiny(arch, head="base" if arch == "bert" else "lm")
    reference = _text_table(model) if init == "text" else None
    kw: dict[str, Any] = {"projection": True, "hidden_size": 16}
    spec = prefix_spec(**kw) if init == "text" else ph.PrefixTuning(5, init="zero", **kw)
    with ph.attach(model, spec) as att:
        prompt = att.prompts["default"]
        assert isinstance(prompt, Prefix) and prompt.projection is not None
        with torch.no_grad():
            produced = prompt.flat()
    assert prompt.init_residual is not None and prompt.init_residual <= 1e-4
    target = torch.zeros_like(produced) if reference is None else reference
    error = float((produced - target).norm() / max(float(target.norm()), 1.0))
    assert error <= 1e-4, error


def test_projection_narrower_than_the_prefix_reports_its_residual() -> None:
    """Hidden width + 1 < P: the fit cannot be exact, and says by how much."""
    model = tiny("gpt2")
    text = [5, 9, 11, 4, 7, 12, 13, 14]
    with ph.attach(model, prefix_spec(text, projection=False)) as att:
        prompt = att.prompts["default"]
        assert isinstance(prompt, Prefix) and prompt.weight is not None
        target = prompt.weight.detach().clone()
    with ph.attach(model, prefix_spec(text, projection=True, hidden_size=3)) as att:
        prompt = att.prompts["default"]
        assert isinstance(prompt, Prefix)
        with torch.no_grad():
            produced = prompt.flat()
    actual = float((produced - target).norm() / target.norm())
    assert prompt.init_residual is not None
    assert prompt.init_residual > 1e-2
    assert abs(prompt.init_residual - actual) <= 1e-5 * max(actual, 1.0)


# -- zero ----------------------------------------------------------------------------


@pytest.mark.parametrize("projection", [False, True])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_zero_prefix_is_pefts_zero_init_and_not_a_no_op(arch: str, projection: bool) -> None:
    """Zero keys and values: PEFT's ``init_weights="zero"`` at step 0 (PEFT zeroes
    its MLP's last layer; ours keeps that layer's weights off the fitted
    directions, so gradients reach the layers before it). Each prefix slot
    still takes the softmax weight of a score-0 key, so outputs move."""
    model = tiny(arch)
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    config = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=4,
        init_weights="zero",
        prefix_projection=projection,
        encoder_hidden_size=16,
    )
    peft_model = get_peft_model(copy.deepcopy(model), config).eval()
    expected = logits_of(peft_model, input_ids=ids)
    spec = ph.PrefixTuning(4, projection=projection, hidden_size=16, init="zero")
    with ph.attach(model, spec):
        got = logits_of(model, input_ids=ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert float((got - logits_of(model, input_ids=ids)).abs().max()) > 0.05


# -- P-tuning --------------------------------------------------------------------------


@pytest.mark.parametrize("encoder", ["lstm", "mlp"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert", "plain"])
def test_p_tuning_text_equals_text_typed_in_its_place(arch: str, encoder: str) -> None:
    if arch == "plain":
        model: nn.Module = PlainLM()
        ids = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 0, 0]])
        mask = (ids > 0).long()
        text = [4, 8, 15, 16]
    else:
        model = tiny(arch, head="base" if arch == "bert" else "lm")
        ids, mask = batch(arch, [6, 3, 5], seed=9)
        text = TEXT
    after = 1 if arch == "bert" else 0  # BERT keeps [CLS] first
    spec = p_tuning_spec(text, encoder=encoder)
    with ph.attach(model, spec) as att:
        prompt = att.prompts["default"]
        assert isinstance(prompt, PTuningPrompt)
        assert prompt.init_residual is not None and prompt.init_residual <= 1e-4
        if arch == "bert":
            with torch.no_grad():
                got = model(input_ids=ids, attention_mask=mask).last_hidden_state
        else:
            got = logits_of(model, input_ids=ids, attention_mask=mask)
    if arch == "bert":
        full, full_mask, _, keep = typed(ids, mask, text, after)
        with torch.no_grad():
            hidden = model(input_ids=full, attention_mask=full_mask).last_hidden_state
        expected = torch.stack([hidden[b, keep[b]] for b in range(ids.shape[0])])
    else:
        expected = typed_logits(model, ids, mask, text)
    assert_real_close(got, expected, mask)


def test_p_tuning_text_with_a_given_length_repeats_the_text() -> None:
    model = tiny("gpt2")
    ids, mask = batch("gpt2", [4, 6], seed=1)
    with ph.attach(model, p_tuning_spec([7, 8], num_virtual_tokens=5, encoder="mlp")):
        got = logits_of(model, input_ids=ids, attention_mask=mask)
    assert_real_close(got, typed_logits(model, ids, mask, [7, 8, 7, 8, 7]), mask)


# -- training starts from there ------------------------------------------------------

SPECS = {
    "prefix table, text": lambda: prefix_spec(projection=False),
    "prefix MLP, text": lambda: prefix_spec(projection=True, hidden_size=16),
    "prefix table, zero": lambda: ph.PrefixTuning(4, projection=False, init="zero"),
    "prefix MLP, zero": lambda: ph.PrefixTuning(4, init="zero", hidden_size=16),
    "p-tuning lstm, text": lambda: p_tuning_spec(encoder="lstm"),
    "p-tuning mlp, text": lambda: p_tuning_spec(encoder="mlp"),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_gradients_reach_every_trainable_parameter_after_init(name: str) -> None:
    model = tiny("llama")
    ids, mask = batch("llama", [6, 4], seed=3)
    labels = ids.masked_fill(mask == 0, -100)
    with ph.attach(model, SPECS[name]()) as att:
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        for param_name, param in att.prompts.named_parameters():
            assert param.grad is not None, param_name
            assert float(param.grad.abs().max()) > 0, param_name
        assert all(p.grad is None for n, p in model.named_parameters() if "prompthooks" not in n)


# -- files -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["prefix table, text", "prefix MLP, text", "p-tuning lstm, text"])
def test_save_and_load_keep_the_initialised_prompt(name: str, tmp_path: Path) -> None:
    model = tiny("gpt2")
    ids, mask = batch("gpt2", [6, 4], seed=5)
    expected = typed_logits(model, ids, mask, TEXT)
    path = tmp_path / "prompt.safetensors"
    with ph.attach(model, SPECS[name]()) as att:
        att.save(path)
        saved = att.prompts["default"].state_dict()
    loaded = ph.load(path)["default"]
    assert loaded.state_dict().keys() == saved.keys()  # the MLP / encoder is kept
    with ph.attach(copy.deepcopy(model), loaded):
        pass
    with ph.attach(model, loaded):
        got = logits_of(model, input_ids=ids, attention_mask=mask)
    assert_real_close(got, expected, mask)


@pytest.mark.parametrize("name", ["prefix MLP, text", "p-tuning mlp, text"])
def test_save_peft_of_an_initialised_prompt_loads_in_peft(name: str, tmp_path: Path) -> None:
    """PEFT's own model given the adapter equals the text typed in front
    (unpadded input: PEFT places prompts right only there)."""
    model = tiny("gpt2")
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    expected = typed_logits(model, ids, mask, TEXT)
    with ph.attach(model, SPECS[name]()) as att:
        att.save_peft(tmp_path)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    peft_logits = logits_of(peft_model, input_ids=ids, attention_mask=mask)
    if peft_logits.shape[1] != ids.shape[1]:  # PEFT keeps a soft prompt's positions
        peft_logits = peft_logits[:, -ids.shape[1] :]
    torch.testing.assert_close(peft_logits, expected, atol=2e-5, rtol=0)
    with ph.attach(model, ph.load_peft(tmp_path)):
        again = logits_of(model, input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(again, expected, atol=2e-5, rtol=0)


# -- errors and the model left alone ----------------------------------------------------


def test_text_init_asks_for_what_it_needs() -> None:
    with pytest.raises(ValueError, match="init_text"):
        ph.PrefixTuning(init="text", tokenizer=Ids())
    with pytest.raises(ValueError, match="tokenizer"):
        ph.PTuning(init="text", init_text="5 6")
    with pytest.raises(ValueError, match="'random', 'text' or 'zero'"):
        ph.PrefixTuning(init="vocab")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'random' or 'text'"):
        ph.PTuning(init="zero")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="own tokenizer"):
        ph.attach(tiny("gpt2"), prefix_spec([3, VOCAB + 4]))


def test_the_capture_leaves_no_hook_and_keeps_the_modes() -> None:
    from tests.support.models import hooks_on

    model = tiny("t5")
    model.train()
    model.decoder.eval()
    before = hooks_on(model)
    modes = {n: m.training for n, m in model.named_modules()}
    att = ph.attach(model, prefix_spec(projection=False))
    att.detach()
    assert hooks_on(model) == before
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_a_failed_capture_leaves_the_model_as_it_was() -> None:
    """A text the model cannot run over (longer than its position table) fails
    inside the capture run: no hook, mode or flag of it stays behind."""
    from tests.support.models import hooks_on, same_snapshot, snapshot

    model = PlainLM()
    model.train()
    before = snapshot(model)
    modes = {n: m.training for n, m in model.named_modules()}
    with pytest.raises(IndexError):
        ph.attach(model, prefix_spec([3] * 45, projection=False))
    assert same_snapshot(before, snapshot(model)) and hooks_on(model) == before["hooks"]
    assert {n: m.training for n, m in model.named_modules()} == modes
    with pytest.raises(ValueError, match="embeds at most 64 positions"):
        ph.attach(tiny("gpt2"), prefix_spec([3] * 70))
