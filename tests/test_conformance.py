"""The conformance matrix: one property test each, over every family of the registry.

``tests/support/families.py`` lists the families (tiny configs, padding side,
sites, oracles, and the properties that do not apply, with the reason). Each
test below is one property, parametrized over the (family, method) cells where
it applies; hypothesis draws batch size, lengths and prompt length (a few
examples: every family multiplies them). Non-applicable cells are not
collected; the table ``tests/conftest.py`` prints at the end of the run shows
them as ``n/a (reason)``.

* oracle: Prompt Tuning equals the family's ``inputs_embeds`` oracle (logits
  and loss), a prefix its hand-filled cache or hand-written forward, on padded
  batches, both attention implementations;
* padded: each row of a padded batch equals the row alone, unpadded;
* detach: after training steps and ``generate``, detaching leaves weights,
  flags, hooks, logits and generated tokens bit-identical;
* gradients: every virtual token / every site's keys and values get a gradient,
  no model parameter does;
* cache: a forward with ``use_cache`` equals one without, and ``generate`` with a
  cache equals ``generate`` without (greedy and beam search);
* static: ``generate`` with a static cache equals the dynamic cache;
* mixed: rows with different prompts (and lengths, methods) equal each row alone;
* save_load: ``att.save`` -> ``ph.load`` gives bit-identical logits;
* peft: ``att.save_peft`` -> PEFT's ``PeftModel.from_pretrained`` gives the same
  outputs, and ``ph.load_peft`` reads it back to them.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import PeftModel
from torch import nn

import prompthooks as ph
from prompthooks.methods import PromptTable
from tests.support.builders import prefix_of, prefix_width, random_table
from tests.support.families import FAMILIES, KINDS, Family, cells, logits_of
from tests.support.models import hooks_on, same_snapshot, snapshot

# nn.Transformer asks for batch_first to use its nested-tensor path: not the point here.
pytestmark = pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")

FEW = settings(max_examples=3, deadline=None)  # oracles: every family multiplies these
FEWER = settings(max_examples=2, deadline=None)


def _params(prop: str, every_attn: tuple[str, ...] = ()) -> list[Any]:
    """One pytest param per applicable (family, method[, attention]) cell, marked
    with the cell so the conftest can tabulate the outcome; families of the
    kinds ``every_attn`` get one per attention implementation (or plain layout)."""
    out = []
    for name, method in cells(prop):
        family = FAMILIES[name]
        for attn in family.attns if family.kind in every_attn else family.attns[-1:]:
            marks = [pytest.mark.conformance(family=name, prop=prop, method=method)]
            finding = family.failure(prop, method)
            if finding is not None:  # refused loudly, not hidden: a fix turns it into a failure
                marks.append(
                    pytest.mark.xfail(strict=True, raises=NotImplementedError, reason=finding)
                )
            out.append(pytest.param(name, method, attn, id=f"{name}-{method}-{attn}", marks=marks))
    return out


def _lengths(family: Family, data: st.DataObject, rows: int = 3) -> list[int]:
    """1..rows rows, then one row longer than all of them: the batch is always padded."""
    low = family.min_length
    drawn = data.draw(st.lists(st.integers(low, 6), min_size=1, max_size=rows), label="lengths")
    return [*drawn, max(drawn) + data.draw(st.integers(1, 3), label="longer")]


def _call(
    model: nn.Module, family: Family, ids: torch.Tensor, mask: torch.Tensor | None, **kw: Any
) -> Any:
    extra = family.extra(ids.shape[0])
    return model(input_ids=ids, attention_mask=mask, **extra, **kw)


def _row_extra(family: Family, batch: int, row: int) -> dict[str, Any]:
    return {k: v[row : row + 1] for k, v in family.extra(batch).items()}


def _selected(family: Family, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """What is compared: the user's positions, or an encoder-decoder's decoder logits."""
    return logits[mask.bool()] if family.token_level() else logits


def _spec(method: str, p: int, seed: int, drawn: tuple[bool, bool] = (False, True)) -> Any:
    """Prompt Tuning, or a prefix: P-tuning v2's table or through its MLP
    (``drawn[0]``), positions shifted by P or not (``drawn[1]``)."""
    torch.manual_seed(seed)
    if method == "prompt":
        return ph.PromptTuning(p)
    projection, shift = drawn
    return ph.PrefixTuning(p, projection=projection, hidden_size=16, shift_positions=shift)


def _draw_prefix(family: Family, data: st.DataObject) -> tuple[bool, bool]:
    projection = data.draw(st.booleans(), label="projection")
    return projection, data.draw(st.sampled_from(family.shifts), label="shift")


def _generate(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, **kw: Any) -> torch.Tensor:
    kw.setdefault("max_new_tokens", 3)
    out: torch.Tensor = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw)
    return out


def _scalar(family: Family, out: Any, mask: torch.Tensor) -> torch.Tensor:
    """A training objective that reads every compared output."""
    return _selected(family, logits_of(out), mask).float().pow(2).mean()


# -- oracle equality ------------------------------------------------------------------


@pytest.mark.kernel_paths  # also run on the Triton path and the oldest release
@FEW
@given(data=st.data())
@pytest.mark.parametrize(("family", "method", "attn"), _params("oracle", every_attn=KINDS))
def test_oracle(family: str, method: str, attn: str, data: st.DataObject) -> None:
    fam = FAMILIES[family]
    model = fam.build(attn)
    lengths = _lengths(fam, data)
    p, seed = data.draw(st.integers(1, 4), label="p"), data.draw(st.integers(0, 3), label="seed")
    ids, mask = fam.make_batch(lengths, seed)
    extra = fam.extra(len(lengths))
    kw: dict[str, Any] = {}
    ref_loss = None
    with torch.no_grad():
        plain = logits_of(_call(model, fam, ids, mask))
        if method == "prompt":
            table = random_table(p, ph.locate(model).hidden_size, seed, fam.prompt_scale)
            spec: Any = PromptTable(table)
            labels = fam.labels(ids, mask)
            ref, ref_loss = fam.prompt_oracle(model, ids, mask, table, labels, extra)
            if labels is not None:
                kw["labels"] = labels
        else:
            shift = data.draw(st.sampled_from(fam.shifts), label="shift")
            table = random_table(p, prefix_width(model), seed)
            spec = prefix_of(model, table, shift)
            ref = fam.prefix_oracle(model, ids, mask, table, shift, extra)
            if fam.generates:  # a cache the model makes itself, or none
                kw["use_cache"] = data.draw(st.booleans(), label="use_cache")
    with ph.attach(model, spec), torch.no_grad():
        out = _call(model, fam, ids, mask, **kw)
    got, ref, plain = (_selected(fam, x, mask).double() for x in (logits_of(out), ref, plain))
    assert (ref - plain).abs().max() > 1e-3  # the prompt matters to the oracle
    torch.testing.assert_close(got, ref, atol=fam.atol, rtol=0)
    if ref_loss is not None:
        torch.testing.assert_close(out.loss, ref_loss, atol=1e-5, rtol=0)


# -- padding --------------------------------------------------------------------------


@pytest.mark.workflow
@FEWER
@given(data=st.data())
@pytest.mark.parametrize(
    ("family", "method", "attn"), _params("padded", every_attn=("encoder", "plain"))
)
def test_padded_rows_equal_rows_alone(
    family: str, method: str, attn: str, data: st.DataObject
) -> None:
    fam = FAMILIES[family]
    model = fam.build(attn)
    lengths = _lengths(fam, data)
    p, seed = data.draw(st.integers(1, 4), label="p"), data.draw(st.integers(0, 3), label="seed")
    ids, mask = fam.make_batch(lengths, seed)
    spec = _spec(method, p, seed, _draw_prefix(fam, data))
    with ph.attach(model, spec), torch.no_grad():
        together = logits_of(_call(model, fam, ids, mask))
        for row in range(len(lengths)):
            alone_ids = ids[row : row + 1, mask[row].bool()]
            extra = _row_extra(fam, len(lengths), row)
            alone = logits_of(model(input_ids=alone_ids, **extra))
            got = together[row : row + 1]
            if fam.token_level():
                got = got[:, mask[row].bool()]
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)


# -- detach and gradients -------------------------------------------------------------


@pytest.mark.workflow
@FEWER
@given(data=st.data())
@pytest.mark.parametrize(("family", "method", "attn"), _params("detach"))
def test_detach_is_bit_identical(family: str, method: str, attn: str, data: st.DataObject) -> None:
    """A backward pass and ``generate`` while attached, then detach: weights,
    flags, hooks, submodules, logits and generated tokens are as before."""
    fam = FAMILIES[family]
    model = fam.build(attn)
    lengths = _lengths(fam, data, rows=2)
    p, seed = data.draw(st.integers(1, 4), label="p"), data.draw(st.integers(0, 3), label="seed")
    ids, mask = fam.make_batch(lengths, seed)
    before, hooks = snapshot(model), hooks_on(model)
    with torch.no_grad():
        base = logits_of(_call(model, fam, ids, mask))
        base_gen = _generate(model, ids, mask) if fam.generates else None
    att = ph.attach(model, _spec(method, p, seed, _draw_prefix(fam, data)))
    _scalar(fam, _call(model, fam, ids, mask), mask).backward()
    with torch.no_grad():
        prompted = logits_of(_call(model, fam, ids, mask))
        if fam.generates:
            _generate(model, ids, mask)
    att.detach()
    assert not torch.equal(prompted, base)  # it was attached
    assert same_snapshot(before, snapshot(model)) and hooks_on(model) == hooks
    assert not hasattr(model, "prompthooks")
    with torch.no_grad():
        assert torch.equal(logits_of(_call(model, fam, ids, mask)), base)
        if base_gen is not None:
            assert torch.equal(_generate(model, ids, mask), base_gen)


@pytest.mark.workflow
@FEWER
@given(data=st.data())
@pytest.mark.parametrize(("family", "method", "attn"), _params("gradients"))
def test_gradients_reach_only_the_prompt(
    family: str, method: str, attn: str, data: st.DataObject
) -> None:
    fam = FAMILIES[family]
    model = fam.build(attn)
    lengths = _lengths(fam, data, rows=2)
    p, seed = data.draw(st.integers(1, 4), label="p"), data.draw(st.integers(0, 3), label="seed")
    ids, mask = fam.make_batch(lengths, seed)
    with ph.attach(model, _spec(method, p, seed)) as att:
        _scalar(fam, _call(model, fam, ids, mask), mask).backward()
        (weight,) = list(att.parameters())
        grad = weight.grad
        assert grad is not None
        if method == "prompt":  # every virtual token
            assert (grad.abs().sum(dim=1) > 0).all()
        else:  # every site's keys and values
            start = 0
            for site in ph.locate(model).sites:
                width = site.num_kv_heads * site.head_dim
                for part in (start, start + width):  # keys, then values
                    assert grad[:, part : part + width].abs().sum() > 0, (site, part)
                start += 2 * width
            assert start == grad.shape[1]
    assert all(p.grad is None for p in model.parameters())


# -- caches ---------------------------------------------------------------------------


@pytest.mark.workflow
@pytest.mark.parametrize(("family", "method", "attn"), _params("cache"))
def test_cache_equals_no_cache(family: str, method: str, attn: str) -> None:
    """The forward with and without ``use_cache``; ``generate`` with and
    without a cache, greedy and beam search."""
    fam = FAMILIES[family]
    model = fam.build(attn)
    ids, mask = fam.make_batch([6, 3, 5], 8)
    with ph.attach(model, _spec(method, 4, 1)), torch.no_grad():
        cached = logits_of(_call(model, fam, ids, mask, use_cache=True))
        uncached = logits_of(_call(model, fam, ids, mask, use_cache=False))
        torch.testing.assert_close(
            _selected(fam, cached, mask), _selected(fam, uncached, mask), atol=1e-5, rtol=0
        )
        for beams in (1, 2):
            with_cache = _generate(model, ids, mask, num_beams=beams, use_cache=True)
            without = _generate(model, ids, mask, num_beams=beams, use_cache=False)
            assert torch.equal(with_cache, without), beams


@pytest.mark.workflow
@pytest.mark.parametrize(("family", "method", "attn"), _params("static"))
def test_static_cache_equals_dynamic(family: str, method: str, attn: str) -> None:
    """``generate`` sizes a static cache for the user's tokens; the prompt
    needs P more slots."""
    fam = FAMILIES[family]
    model = fam.build(attn)
    ids, mask = fam.make_batch([6, 3, 5], 11)
    with ph.attach(model, _spec(method, 4, 2)), torch.no_grad():
        for beams in (1, 2):
            dynamic = _generate(model, ids, mask, num_beams=beams)
            static = _generate(model, ids, mask, num_beams=beams, cache_implementation="static")
            assert torch.equal(static, dynamic), beams


# -- mixed batches --------------------------------------------------------------------

MIXED: dict[str, dict[str, Any]] = {
    "prompt": {
        "a": lambda n: ph.PromptTuning(n),
        "b": lambda n: ph.PTuning(n, "mlp", hidden_size=16),
    },
    "prefix": {
        "a": lambda n: ph.PrefixTuning(n, hidden_size=16),
        "b": lambda n: ph.PrefixTuning(n, projection=False, shift_positions=False),
        "c": lambda n: ph.PTuning(n, "mlp", hidden_size=16),  # soft prompts among prefixes
    },
}


@pytest.mark.workflow
@FEWER
@given(data=st.data())
@pytest.mark.parametrize(("family", "method", "attn"), _params("mixed"))
def test_mixed_batch_rows_equal_rows_alone(
    family: str, method: str, attn: str, data: st.DataObject
) -> None:
    """Rows with prompts of different lengths (Prompt Tuning and P-tuning; a
    prefix through its MLP, P-tuning v2 unshifted and a soft prompt) equal
    each row alone."""
    fam = FAMILIES[family]
    model = fam.build(attn)
    lengths = _lengths(fam, data)
    seed = data.draw(st.integers(0, 3), label="seed")
    n = len(MIXED[method])
    sizes = data.draw(st.lists(st.integers(1, 5), min_size=n, max_size=n), label="sizes")
    ids, mask = fam.make_batch(lengths, seed)
    located = ph.locate(model)
    torch.manual_seed(seed)
    prompts = {
        name: make(n).build(located)
        for (name, make), n in zip(MIXED[method].items(), sizes, strict=True)
    }
    names = st.sampled_from(sorted(prompts))
    rows = data.draw(st.lists(names, min_size=len(lengths), max_size=len(lengths)), label="rows")
    with ph.attach(model, prompts) as att, torch.no_grad():
        with att.use(rows):
            together = logits_of(_call(model, fam, ids, mask))
        for r, name in enumerate(rows):
            alone_ids = ids[r : r + 1, mask[r].bool()]
            with att.use(name):
                alone = logits_of(model(input_ids=alone_ids, **_row_extra(fam, len(rows), r)))
            got = together[r : r + 1]
            if fam.token_level():
                got = got[:, mask[r].bool()]
            torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)


# -- files ----------------------------------------------------------------------------


def _trained(method: str) -> Any:
    """A prompt with its reparameterisation: the file must carry it."""
    torch.manual_seed(3)
    if method == "prompt":
        return ph.PromptTuning(3)
    return ph.PrefixTuning(3, hidden_size=16)


def _scramble(module: nn.Module, seed: int) -> None:
    """Every parameter far from its initialisation, so equality means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


@pytest.mark.workflow
@pytest.mark.parametrize(("family", "method", "attn"), _params("save_load"))
def test_save_load_round_trip(family: str, method: str, attn: str, tmp_path: Path) -> None:
    fam = FAMILIES[family]
    model = fam.build(attn)
    ids, mask = fam.make_batch([6, 3, 5], 4)
    path = tmp_path / "prompt.safetensors"
    with torch.no_grad():
        plain = logits_of(_call(model, fam, ids, mask))
    with ph.attach(model, _trained(method)) as att:
        _scramble(att.prompts, seed=2)
        with torch.no_grad():
            before = logits_of(_call(model, fam, ids, mask))
        att.save(path)
    (loaded,) = ph.load(path).values()
    with ph.attach(model, loaded), torch.no_grad():
        after = logits_of(_call(model, fam, ids, mask))
    assert torch.equal(after, before)
    assert not torch.equal(before, plain)


@pytest.mark.workflow
@pytest.mark.parametrize(("family", "method", "attn"), _params("peft"))
def test_peft_round_trip(family: str, method: str, attn: str, tmp_path: Path) -> None:
    """prompthooks -> PEFT -> prompthooks on unpadded rows (where PEFT's layout
    is correct): PEFT's own model is the oracle for the saved adapter."""
    fam = FAMILIES[family]
    model = fam.build(attn)
    ids, _ = fam.make_batch([7, 7], 5)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        plain = logits_of(_call(model, fam, ids, mask))
    with ph.attach(model, _trained(method)) as att:
        _scramble(att.prompts, seed=2)
        with torch.no_grad():
            ours = logits_of(_call(model, fam, ids, mask))
        att.save_peft(tmp_path)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    with torch.no_grad():
        theirs = logits_of(_call(peft_model, fam, ids, mask))
    if method == "prompt" and fam.token_level():
        theirs = theirs[:, 3:]  # PEFT returns the virtual positions too
    assert (ours - plain).abs().max() > 1e-3
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    with ph.attach(model, ph.load_peft(tmp_path)), torch.no_grad():
        again = logits_of(_call(model, fam, ids, mask))
    torch.testing.assert_close(again, ours, atol=1e-6, rtol=0)


# -- the README's architectures table ----------------------------------------------------

README = Path(__file__).resolve().parents[1] / "README.md"
SITE_WORDS = {"enc_self": "encoder self", "dec_self": "decoder self", "cross": "cross"}


def _architectures() -> dict[str, dict[str, str]]:
    """The README's "## Architectures" table: locator -> column -> cell text."""
    section = README.read_text().split("## Architectures", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split(" | ")]
    table = {}
    for line in lines[1:]:
        cells = dict(zip(header, (c.strip() for c in line.strip(" |").split(" | ")), strict=True))
        table[cells["locator"].split("`")[1]] = cells
    return table


def _collapsed(keys: set[str]) -> set[str]:
    """``prop[prompt]`` and ``prop[prefix]`` together read as ``prop``."""
    out = set()
    for key in keys:
        prop = key.split("[")[0]
        both = {f"{prop}[prompt]", f"{prop}[prefix]"} <= keys
        out.add(prop if both or "[" not in key else key)
    return out


def _named(text: str) -> set[str]:
    return _collapsed(set(re.findall(r"`([a-z_]+(?:\[\w+\])?)`", text)))


@pytest.mark.workflow
def test_readme_architectures_table_matches_the_registry() -> None:
    """One row per locator of the registry and no other; each row's prefix sites
    are the registry's, and its last column names exactly the registry's
    non-applicable properties and known failures of that locator's families."""
    table = _architectures()
    by_locator: dict[str, list[Family]] = {}
    for family in FAMILIES.values():
        by_locator.setdefault(family.locator, []).append(family)
    assert set(table) == set(by_locator)
    previous = ""
    for locator, families in by_locator.items():
        row = table[locator]
        sites = {s for f in families for s in f.sites}
        text = row["prefix sites"]
        if sites == {"self"}:
            assert "self-attention" in text and "cross" not in text, locator
        elif not text.startswith("every"):  # torch-mha: every nn.MultiheadAttention
            assert all(SITE_WORDS[s] in text for s in sites), locator
        cell = row["not applicable; fails"]
        cell = cell.replace("same", previous.split("; fails:")[0], 1) if "same" in cell else cell
        previous = cell
        not_applicable, _, fails = cell.partition("fails:")
        want_na = _collapsed({k for f in families for k in f.not_applicable})
        want_fails = _collapsed({k for f in families for k in f.known_failures})
        assert _named(not_applicable) == want_na, locator
        assert _named(fails) == want_fails, locator
