"""Plain PyTorch models (``nn.Embedding`` + ``nn.MultiheadAttention``): the
generic locator, soft prompts and input-space prefixes against a float64
reference written from the weights (tests/support/plain_models.py: a causal LM on
``nn.TransformerEncoder`` and an encoder-decoder on ``nn.Transformer``, batch-first
and sequence-first; einsum attention, no ``nn.MultiheadAttention``).

* Prompt Tuning, and input-space prefixes at every site, with and without
  autograd (where PyTorch's fused path would otherwise bypass the hooks);
* input-space prefixes solved for randomly chosen keys and values make the model
  compute exactly the attention over those keys;
* an optimizer over ``model.parameters()`` trains only the prompts; detaching is
  bit-identical (padded rows and mixed batches: tests/test_conformance.py).
"""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
from torch import nn

import prompthooks as ph
from prompthooks.methods import Prefix as PrefixPrompt
from tests.support.builders import random_table
from tests.support.models import hooks_on, same_snapshot, snapshot
from tests.support.plain_models import (
    VOCAB,
    WIDTH,
    PlainLM,
    PlainSeq2Seq,
    Prefix,
    plain_batch,
    reference,
)

DEC = torch.tensor([[3, 5, 7], [4, 6, 8], [9, 10, 11]])
# nn.Transformer asks for batch_first to use its nested-tensor path: not the point here.
pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")


def _model(kind: str, batch_first: bool) -> nn.Module:
    return PlainLM(batch_first) if kind == "lm" else PlainSeq2Seq(batch_first)


_batch = plain_batch  # right-padded random ids (pad id 0 never occurs in a real token)


def _call(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, first: int = 0) -> torch.Tensor:
    """The model on a batch; a seq2seq model's rows get decoder ids from row ``first`` on."""
    dec = DEC[first : first + ids.shape[0]]
    extra = {"decoder_input_ids": dec} if isinstance(model, PlainSeq2Seq) else {}
    out: torch.Tensor = model(input_ids=ids, attention_mask=mask, **extra)
    return out


_table = random_table


def _prefix(model: nn.Module, p: int, seed: int = 3) -> tuple[PrefixPrompt, list[Prefix]]:
    """A prefix with random values, and the same values per site for the reference."""
    sites = ph.locate(model).sites
    table = _table(p, len(sites) * 2 * WIDTH, seed)
    view = table.view(p, len(sites), 2, WIDTH)
    per_site: list[Prefix] = [(view[:, s, 0], view[:, s, 1]) for s in range(len(sites))]
    return PrefixPrompt([(1, WIDTH)] * len(sites), table=table), per_site


def _spliced(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, table: torch.Tensor):  # type: ignore[no-untyped-def]
    """Embeddings with the prompt in front of each row (right padding: at 0), by hand."""
    p = table.shape[0]
    embeds = torch.cat([table.expand(ids.shape[0], -1, -1), model.tok(ids)], dim=1)
    return embeds, torch.cat([torch.ones(ids.shape[0], p, dtype=mask.dtype), mask], dim=1)


def _real(out: torch.Tensor, mask: torch.Tensor, kind: str) -> torch.Tensor:
    return out[mask.bool()] if kind == "lm" else out


# -- locating ---------------------------------------------------------------------------


@pytest.mark.parametrize("batch_first", [True, False])
def test_sites_roles_and_summary(batch_first: bool, caplog: pytest.LogCaptureFixture) -> None:
    lm, s2s = PlainLM(batch_first), PlainSeq2Seq(batch_first)
    before = snapshot(s2s)
    with caplog.at_level(logging.INFO, logger="prompthooks"):
        found = ph.locate(s2s)
    assert same_snapshot(before, snapshot(s2s))
    assert "torch-mha" in caplog.text and "PlainSeq2Seq" in caplog.text
    assert [(s.role, s.layer) for s in found.sites] == [
        ("enc_self", 0),
        ("enc_self", 1),
        ("dec_self", 0),
        ("cross", 0),
        ("dec_self", 1),
        ("cross", 1),
    ]
    assert found.is_encoder_decoder and found.embedding is s2s.tok
    assert [s.module for s in ph.locate(lm).sites] == [layer.self_attn for layer in lm.body.layers]
    assert {(s.role, s.num_kv_heads, s.head_dim, s.prefix_in) for s in ph.locate(lm).sites} == {
        ("self", 1, WIDTH, "inputs")
    }
    summary = str(found)
    assert "torch-mha" in summary and "core.decoder.layers.1.multihead_attn" in summary


def test_what_the_generic_locator_refuses() -> None:
    class NoIds(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(5, 4)
            self.attn = nn.MultiheadAttention(4, 1)

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            x = self.tok(tokens)
            out: torch.Tensor = self.attn(x, x, x)[0]
            return out

    class TwoEmbeddings(NoIds):
        def __init__(self) -> None:
            super().__init__()
            self.pos = nn.Embedding(5, 4)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
            return super().forward(input_ids)

    with pytest.raises(TypeError, match="input_ids"):
        ph.locate(NoIds())
    with pytest.raises(TypeError, match="get_input_embeddings"):
        ph.locate(TwoEmbeddings())
    with pytest.raises(ph.UnsupportedModelError, match="register_locator"):
        ph.locate(nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4)))


def test_a_transformers_model_with_a_stray_multihead_attention_is_not_claimed() -> None:
    """Gemma 3's multimodal model pools image features with nn.MultiheadAttention;
    its text attention is transformers' own, which this locator cannot serve."""

    class Tower(transformers.PreTrainedModel):
        config_class = transformers.PretrainedConfig

        def __init__(self) -> None:
            super().__init__(transformers.PretrainedConfig())
            self.tok = nn.Embedding(5, 4)
            self.pool = nn.MultiheadAttention(4, 1)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            x = self.tok(input_ids)
            out: torch.Tensor = self.pool(x, x, x)[0]
            return out

    with pytest.raises(ph.UnsupportedModelError):
        ph.locate(Tower())


# -- soft prompts -------------------------------------------------------------------------


@pytest.mark.kernel_paths  # also run on the Triton path (tests/conftest.py)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["lm", "s2s"])
def test_prompt_tuning_matches_the_float64_reference(kind: str, batch_first: bool) -> None:
    model = _model(kind, batch_first)
    ids, mask = _batch([6, 3, 5])
    spec = ph.PromptTuning(4)
    with ph.attach(model, spec) as att, torch.no_grad():
        table = att.prompts["default"].weight.detach().clone()
        got = _call(model, ids, mask)
    with torch.no_grad():  # the model itself fed the prompt by hand
        embeds, wide = _spliced(model, ids, mask, table)
        extra = {"decoder_input_ids": DEC} if kind == "s2s" else {}
        through_model = model(inputs_embeds=embeds, attention_mask=wide, **extra)
    expected = reference(model, embeds, wide, [None] * len(ph.locate(model).sites), DEC)
    assert got.shape == (3, ids.shape[1] if kind == "lm" else DEC.shape[1], VOCAB)
    if kind == "lm":
        expected, through_model = expected[:, 4:], through_model[:, 4:]
    torch.testing.assert_close(_real(got, mask, kind), _real(through_model, mask, kind))
    torch.testing.assert_close(
        _real(got, mask, kind).double(), _real(expected, mask, kind), atol=2e-5, rtol=0
    )


# -- prefixes -----------------------------------------------------------------------------


@pytest.mark.kernel_paths  # also run on the Triton path (tests/conftest.py)
@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", ["lm", "s2s"])
def test_prefix_matches_the_float64_reference(kind: str, batch_first: bool, grad: bool) -> None:
    """With and without autograd: in eval mode under no_grad, nn.TransformerEncoder
    would take PyTorch's fused path and pack padded rows into nested tensors."""
    model = _model(kind, batch_first)
    ids, mask = _batch([6, 3, 5], seed=1)
    prefix, per_site = _prefix(model, 3)
    with ph.attach(model, prefix), torch.set_grad_enabled(grad):
        got = _call(model, ids, mask).detach()
    expected = reference(model, model.tok(ids).detach(), mask, per_site, DEC)
    torch.testing.assert_close(
        _real(got, mask, kind).double(), _real(expected, mask, kind), atol=2e-5, rtol=0
    )
    assert torch.backends.mha.get_fastpath_enabled()  # the call turned it back on
    # the prefix does something at every site
    if grad:  # once per model: the prefix does something at every site
        embeds = model.tok(ids).detach()
        without = reference(model, embeds, mask, [None] * len(per_site), DEC)
        for site in range(len(per_site)):
            only: list[Prefix] = [None] * len(per_site)
            only[site] = per_site[site]
            assert (reference(model, embeds, mask, only, DEC) - without).abs().max() > 1e-3


def test_input_space_prefix_reaches_any_keys_and_values() -> None:
    """The claim behind the parameterisation: with invertible projections, keys
    and values chosen freely are the projections of some input-space prefix."""
    model = PlainLM()
    g = torch.Generator().manual_seed(5)
    wanted: list[Prefix] = []
    table = torch.zeros(4, 2, 2, WIDTH, dtype=torch.float64)
    for site, layer in enumerate(model.body.layers):
        attn = layer.self_attn
        _, wk, wv = attn.in_proj_weight.detach().double().chunk(3)
        _, bk, bv = attn.in_proj_bias.detach().double().chunk(3)
        keys = 3 * torch.randn(4, WIDTH, generator=g, dtype=torch.float64)
        values = 3 * torch.randn(4, WIDTH, generator=g, dtype=torch.float64)
        table[:, site, 0] = torch.linalg.solve(wk, (keys - bk).T).T
        table[:, site, 1] = torch.linalg.solve(wv, (values - bv).T).T
        wanted.append((keys, values))
    prefix = PrefixPrompt([(1, WIDTH)] * 2, table=table.reshape(4, -1).float())
    ids, mask = _batch([5, 2])
    with ph.attach(model, prefix), torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask)
    expected = reference(model, model.tok(ids).detach(), mask, wanted, space="keys")
    torch.testing.assert_close(got[mask.bool()].double(), expected[mask.bool()], atol=1e-4, rtol=0)


# -- padding, mixed batches --------------------------------------------------------------


# -- training and detaching -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["lm", "s2s"])
def test_training_moves_only_the_prompts_and_detach_restores(kind: str) -> None:
    model = _model(kind, batch_first=kind == "lm")
    ids, mask = _batch([6, 4, 5], seed=3)
    before = snapshot(model)
    with torch.no_grad():
        plain = _call(model, ids, mask)
    spec = {"prompt": ph.PromptTuning(3), "prefix": ph.PrefixTuning(3)}
    with ph.attach(model, spec) as att:
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-2)
        for name in ("prompt", "prefix"):
            with att.use(name):
                first = None
                for _ in range(8):
                    logits = _call(model, ids, mask)
                    target = DEC if kind == "s2s" else ids
                    real = (
                        torch.ones_like(target, dtype=torch.bool) if kind == "s2s" else mask.bool()
                    )
                    loss = nn.functional.cross_entropy(logits[real], target[real])
                    optimizer.zero_grad()
                    loss.backward()
                    grads = [p.grad for p in att.prompts[name].parameters()]
                    assert all(g is not None and g.abs().sum() > 0 for g in grads)
                    optimizer.step()
                    first = loss.item() if first is None else first
                assert loss.item() < first
        assert all(
            torch.equal(v, before["state"][k])
            for k, v in model.state_dict().items()
            if not k.startswith("prompthooks")
        )
    assert same_snapshot(before, snapshot(model))
    assert hooks_on(model) == 0 and torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad():
        assert torch.equal(_call(model, ids, mask), plain)
