"""Prefix Tuning and P-tuning v2 against independent references.

* PEFT given the same prefix values (GPT-2, LLaMA with grouped-query
  attention, BERT), unpadded and left/right-padded with explicit position ids,
  and the round trip through ``save_peft`` -> ``PeftModel.from_pretrained`` ->
  ``load_peft``;
* the model fed a hand-filled cache (``shift_positions=False`` too, which PEFT
  cannot express);
* T5: a hand-written encoder and a hand-filled ``EncoderDecoderCache`` for the
  decoder self- and cross-attention; changing any one site's table changes both
  alike.

Also: every prefix parameter and site gets a gradient; gradient checkpointing
(reentrant and not) gives the same loss and gradients; ``export()`` keeps the
outputs; in generation a padded row equals the row alone, a cache equals no cache,
a static cache equals the dynamic one (greedy and beam; soft prompts and mixed
batches too), and a hand-written decoding loop equals one forward.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, get_peft_model

import prompthooks as ph
from prompthooks.methods import Prefix
from tests.support.builders import prefix_of as _prefix
from tests.support.builders import prefix_table
from tests.support.models import batch, decoder_ids, tiny
from tests.support.prefix_oracle import positions, t5_logits

TASKS = {"gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "bert": "FEATURE_EXTRACTION"}
OUTPUT = {"gpt2": "logits", "llama": "logits", "bert": "last_hidden_state"}
N = 4


def _model(arch: str, attn: str = "sdpa") -> torch.nn.Module:
    return tiny(arch, attn, head="base" if arch == "bert" else "lm")


def _table(model: torch.nn.Module, n: int = N, seed: int = 7) -> torch.Tensor:
    return prefix_table(model, n, seed)  # far from any init, so parity means something


def _peft(model: torch.nn.Module, arch: str, table: torch.Tensor) -> Any:
    config = PrefixTuningConfig(task_type=TASKS[arch], num_virtual_tokens=table.shape[0])
    peft_model = get_peft_model(copy.deepcopy(model), config)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(table)
    return peft_model.eval()


def _padded(arch: str) -> tuple[torch.Tensor, torch.Tensor]:
    return batch(arch, [7, 3, 5], seed=4)  # left-padded for GPT-2/LLaMA, right for BERT


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_peft_parity_unpadded(arch: str, attn: str) -> None:
    model = _model(arch, attn)
    table = _table(model)
    ids, mask = batch(arch, [6, 6], seed=3)
    with torch.no_grad():
        peft_out = _peft(model, arch, table)(input_ids=ids, attention_mask=mask)
    expected = getattr(peft_out, OUTPUT[arch])
    with ph.attach(model, _prefix(model, table)), torch.no_grad():
        got = getattr(model(input_ids=ids, attention_mask=mask), OUTPUT[arch])
        without_mask = getattr(model(input_ids=ids), OUTPUT[arch])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(without_mask, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_peft_parity_padded_with_explicit_positions(arch: str) -> None:
    """PEFT is right on padded rows only when given position ids; prompthooks
    gets the same result with or without them (it derives them from the mask)."""
    model = _model(arch)
    table = _table(model)
    ids, mask = _padded(arch)
    pos = positions(mask, 0)
    with torch.no_grad():
        peft_out = _peft(model, arch, table)(input_ids=ids, attention_mask=mask, position_ids=pos)
    expected = getattr(peft_out, OUTPUT[arch])
    real = mask.bool()
    with ph.attach(model, _prefix(model, table)), torch.no_grad():
        derived = getattr(model(input_ids=ids, attention_mask=mask), OUTPUT[arch])
        given = getattr(model(input_ids=ids, attention_mask=mask, position_ids=pos), OUTPUT[arch])
    torch.testing.assert_close(derived[real], expected[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(given[real], expected[real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
def test_save_peft_round_trip(arch: str, tmp_path: Path) -> None:
    model = _model(arch)
    ids, mask = _padded(arch)
    pos = positions(mask, 0)
    real = mask.bool()
    torch.manual_seed(0)
    with ph.attach(model, ph.PrefixTuning(N, projection=True, hidden_size=16)) as att:
        with torch.no_grad():
            ours = getattr(model(input_ids=ids, attention_mask=mask), OUTPUT[arch])
        att.save_peft(tmp_path)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    with torch.no_grad():
        theirs = getattr(
            peft_model(input_ids=ids, attention_mask=mask, position_ids=pos), OUTPUT[arch]
        )
    torch.testing.assert_close(ours[real], theirs[real], atol=1e-5, rtol=0)
    # ... and back: load_peft reads what PEFT loaded
    with ph.attach(model, ph.load_peft(tmp_path)), torch.no_grad():
        again = getattr(model(input_ids=ids, attention_mask=mask), OUTPUT[arch])
    torch.testing.assert_close(again[real], ours[real], atol=1e-6, rtol=0)


@pytest.mark.oldest_release
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_t5_three_sites_against_hand_written_oracle(attn: str, use_cache: bool) -> None:
    model = tiny("t5", attn)
    table = _table(model)
    ids, mask = batch("t5", [7, 3, 5], seed=4)
    dec = decoder_ids(3)
    with torch.no_grad():
        expected = t5_logits(model, ids, mask, dec, table)
    with ph.attach(model, _prefix(model, table)), torch.no_grad():
        got = model(
            input_ids=ids, attention_mask=mask, decoder_input_ids=dec, use_cache=use_cache
        ).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_t5_oracle_depends_on_every_site() -> None:
    """The oracle is not blind to a site: changing any one site's block of the
    table changes its logits (and prompthooks' logits change the same way)."""
    model = tiny("t5")
    table = _table(model)
    ids, mask = batch("t5", [5, 4], seed=2)
    dec = decoder_ids(2)
    located = ph.locate(model)
    block = 2 * located.sites[0].num_kv_heads * located.sites[0].head_dim
    with torch.no_grad():
        base = t5_logits(model, ids, mask, dec, table)
        for role in ("enc_self", "dec_self", "cross"):
            s = next(i for i, site in enumerate(located.sites) if site.role == role)
            changed = table.clone()
            changed[:, s * block : (s + 1) * block] += 1.0
            oracle = t5_logits(model, ids, mask, dec, changed)
            assert (oracle - base).abs().max() > 1e-3, role
            with ph.attach(model, _prefix(model, changed)):
                got = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
            torch.testing.assert_close(got, oracle, atol=1e-5, rtol=0)


@pytest.mark.parametrize("projection", [True, False])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5", "bert"])
def test_gradients_reach_every_prefix_parameter_and_site(arch: str, projection: bool) -> None:
    model = tiny(arch, head="lm")
    ids, mask = _padded(arch) if arch != "t5" else batch("t5", [7, 3, 5], seed=4)
    kw: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if arch == "t5":
        kw["decoder_input_ids"] = decoder_ids(3)
    with ph.attach(model, ph.PrefixTuning(N, projection=projection, hidden_size=16)) as att:
        model(**kw).logits.square().mean().backward()
        params = list(att.parameters())
        assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
        if not projection:  # every site's block of the table gets a gradient
            located = ph.locate(model)
            grad = att.prompts["default"].weight.grad
            start = 0
            for site in located.sites:
                width = 2 * site.num_kv_heads * site.head_dim
                assert grad[:, start : start + width].abs().sum() > 0, site
                start += width


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5", "bert"])
def test_gradient_checkpointing_same_loss_and_gradients(arch: str, reentrant: bool) -> None:
    model = tiny(arch, head="lm")
    model.train()
    for module in model.modules():  # no dropout, so both runs compute the same thing
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "dropout", None), float):
            module.dropout = 0.0  # T5 attention's own dropout rate
    ids, mask = _padded(arch) if arch != "t5" else batch("t5", [7, 3, 5], seed=4)
    labels = decoder_ids(3, seed=5) if arch == "t5" else ids.masked_fill(mask == 0, -100)
    kw: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    torch.manual_seed(1)
    prompt = ph.PrefixTuning(N, projection=True, hidden_size=16).build(ph.locate(model))
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        with ph.attach(model, prompt) as att:
            att.prompts.zero_grad()
            loss = model(**kw).loss
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in att.parameters()]))
    model.gradient_checkpointing_disable()
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=1e-6, rtol=0)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5", "bert"])
def test_export_drops_the_projection_and_keeps_outputs(arch: str) -> None:
    model = tiny(arch, head="lm")
    ids, mask = _padded(arch) if arch != "t5" else batch("t5", [7, 3, 5], seed=4)
    kw: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if arch == "t5":
        kw["decoder_input_ids"] = decoder_ids(3)
    with ph.attach(model, ph.PrefixTuning(N, projection=True, hidden_size=16)) as att:
        with torch.no_grad():
            before = model(**kw).logits
        att.export()
        prefix = att.prompts["default"]
        located = ph.locate(model)
        per_token = sum(2 * s.num_kv_heads * s.head_dim for s in located.sites)
        assert [tuple(p.shape) for p in att.parameters()] == [(N, per_token)]
        assert any(p is prefix.weight for p in model.parameters())
        with torch.no_grad():
            after = model(**kw).logits
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


def test_own_format_round_trip_keeps_the_projection(tmp_path: Path) -> None:
    model = tiny("llama")
    ids, mask = _padded("llama")
    with ph.attach(model, ph.PrefixTuning(N, hidden_size=16, shift_positions=False)) as att:
        with torch.no_grad():
            before = model(input_ids=ids, attention_mask=mask).logits
        att.save(tmp_path / "prefix.safetensors")
    loaded = ph.load(tmp_path / "prefix.safetensors")["default"]
    assert isinstance(loaded, Prefix) and loaded.projection is not None
    assert not loaded.shift_positions
    with ph.attach(model, loaded), torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(after, before)


@pytest.mark.parametrize("arch", ["gpt2", "t5"])
def test_prompt_and_prefix_attached_together_each_equal_alone(arch: str) -> None:
    model = tiny(arch)
    ids, mask = batch(arch, [6, 4], seed=9)
    kw: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if arch == "t5":
        kw["decoder_input_ids"] = decoder_ids(2)
    located = ph.locate(model)
    soft = ph.PromptTuning(3).build(located)
    prefix = ph.PrefixTuning(2, hidden_size=16).build(located)
    with torch.no_grad():
        with ph.attach(model, soft):
            soft_alone = model(**kw).logits
        with ph.attach(model, prefix):
            prefix_alone = model(**kw).logits
        with ph.attach(model, {"soft": soft, "prefix": prefix}) as att:
            with att.use("soft"):
                soft_together = model(**kw).logits
            with att.use("prefix"):
                prefix_together = model(**kw).logits
                generated = model.generate(**kw, max_new_tokens=3, do_sample=False)
    assert torch.equal(soft_together, soft_alone)
    assert torch.equal(prefix_together, prefix_alone)
    assert generated.shape[0] == 2
