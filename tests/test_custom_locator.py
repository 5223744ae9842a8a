"""A user's own locator, and the registry it goes into.

* ``integrations/custom_locator.py`` (the worked example of the locator guide in
  ``integrations/README.md``) teaches
  prompthooks GPT-J, which no built-in locator knows, and checks Prompt Tuning
  and Prefix Tuning on it against references that do not use prompthooks
  (``inputs_embeds`` built by hand, a hand-filled ``DynamicCache``, a
  hand-written decoding loop), training, and a bit-for-bit detach;
* the guide quotes that script's locator verbatim;
* an unknown architecture gets an error that lists the registered locators and
  shows ``ph.register_locator``;
* registering under a taken name replaces; ``ph.unregister_locator`` undoes a
  registration; a class-based locator wins over a structural guess, whatever
  the registration order, and a structural match is logged at INFO.

Every test leaves the global registry as it found it.
"""

from __future__ import annotations

import inspect
import logging
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from torch import nn
from transformers import DynamicCache
from transformers.models.gptj.modeling_gptj import GPTJAttention

import prompthooks as ph
from prompthooks.methods import Prefix
from tests.support.models import batch, same_snapshot, snapshot, tiny
from tests.support.prefix_oracle import decoder_only_logits

# The same on every kernel path: runs in the torch pass, deselected in the Triton pass.
pytestmark = pytest.mark.workflow

ROOT = Path(__file__).resolve().parents[1]
GUIDE = "integrations/README.md"  # the locator guide, beside its worked example
sys.path.insert(0, str(ROOT / "integrations"))
import custom_locator  # noqa: E402


@contextmanager
def registered(*locators: type[ph.Locator]) -> Iterator[None]:
    """Register ``locators`` (in this order) for the block, then remove them."""
    try:
        for cls in locators:
            ph.register_locator(cls)
        yield
    finally:
        for cls in locators:
            if cls.name in ph.registered_locators():
                ph.unregister_locator(cls.name)


@pytest.fixture(autouse=True)
def registry_unchanged() -> Iterator[None]:
    before = ph.registered_locators()
    yield
    assert ph.registered_locators() == before


class Unknown(nn.Module):
    """No locator knows it: no transformers class, no attention module."""

    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(20, 8)
        self.out = nn.Linear(8, 20)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.out(self.tok(input_ids))
        return out


def _located(locator: ph.Locator, model: Unknown) -> ph.Located:
    return ph.Located(
        locator=locator.name,
        model=model,
        embedding=model.tok,
        input_stack=model,
        encoder_mask_readers=(),
        sites=(),
        max_positions=None,
    )


# -- the worked example -------------------------------------------------------------------


def test_worked_example_runs_and_holds() -> None:
    report = custom_locator.main([])
    # 1. refused before registration, with the way out
    assert "GPTJForCausalLM" in report.error
    assert "ph.register_locator" in report.error and "Registered locators:" in report.error
    # 2. the summary names the modules, layers, KV heads and head size
    lines = report.summary.splitlines()
    assert lines[0] == "GPTJForCausalLM (located by 'gptj')"
    assert "  token embedding : transformer.wte (61 x 32)" in lines
    assert "  input stack     : transformer" in lines
    # the name this transformers release gives the cache (5.24 renamed it)
    taken = inspect.signature(GPTJAttention.forward).parameters
    cache = "cache" if "cache" in taken else "layer_past"
    for layer in (0, 1):
        site = (
            f"layer  {layer}  transformer.h.{layer}.attn  kv_heads=4 head_dim=8  "
            f"cache={cache} mask=attention_mask"
        )
        assert any(line.endswith(site) for line in lines), report.summary
    # 3.-4. the oracles, and prompts that matter
    assert report.prompt_logits_diff < 1e-5 and report.prompt_loss_diff < 1e-5
    assert report.prompt_effect > 1e-3
    assert set(report.prefix_logits_diff) == {True, False}
    assert all(d < 1e-5 for d in report.prefix_logits_diff.values())
    assert all(e > 1e-3 for e in report.prefix_effect.values())
    # 5. training moved the prompt and nothing else
    for name in ("prompt", "prefix"):
        first, last = report.losses[name]
        assert last < first
        assert report.prompt_moved[name] and report.base_untouched[name]
        # 6. generate == the hand-written loop
        assert report.generated[name].shape == (3, custom_locator.NEW_TOKENS)
        assert torch.equal(report.generated[name], report.reference_generated[name])
    # 7. detached bit for bit
    assert report.restored
    # main() unregistered its locator, so a second run starts from step 1 again
    assert "gptj" not in ph.registered_locators()
    with pytest.raises(ph.UnsupportedModelError):
        ph.locate(custom_locator.tiny_gptj())


def test_gptj_locator_on_the_base_model() -> None:
    """The example locator also takes the bare ``GPTJModel``: no LM head, no label shift."""
    model = custom_locator.tiny_gptj().transformer
    with registered(custom_locator.GPTJLocator):
        found = ph.locate(model)
    assert found.input_stack is model and found.embedding is model.wte
    assert not found.shifted_labels
    assert [s.module for s in found.sites] == [b.attn for b in model.h]


def test_guide_quotes_the_script() -> None:
    """The guide's code blocks that show the GPT-J locator are copied from the script."""
    guide = (ROOT / GUIDE).read_text()
    script = (ROOT / "integrations" / "custom_locator.py").read_text()
    blocks = re.findall(r"```python\n(.*?)```", guide, flags=re.S)
    quoted = [b for b in blocks if "GPTJLocator" in b]
    assert quoted, f"the locator guide in {GUIDE} shows no GPTJLocator code"
    for block in quoted:
        for chunk in block.split("\n...\n"):  # an elided stretch of the script
            assert chunk.strip("\n") in script, chunk


# -- the registry ---------------------------------------------------------------------------


def test_unknown_architecture_error_names_locators_and_the_fix() -> None:
    model = Unknown()
    before = snapshot(model)
    with pytest.raises(ph.UnsupportedModelError) as error:
        ph.locate(model)
    message = str(error.value)
    assert "Unknown" in message
    listed = re.search(r"Registered locators: (.*)\.", message)
    assert listed is not None and listed.group(1).split(", ") == ph.registered_locators()
    assert "@ph.register_locator" in message and "class MyLocator(ph.Locator)" in message
    section = "Teaching prompthooks a new architecture"  # the message points to the guide
    assert GUIDE in message and section in message.replace("\n", " ")
    assert f"## {section}\n" in (ROOT / GUIDE).read_text()
    with pytest.raises(ph.UnsupportedModelError):
        ph.attach(model, ph.PromptTuning(2))  # attach goes through the same lookup
    assert same_snapshot(before, snapshot(model))


def test_registering_a_name_twice_replaces_it() -> None:
    class First(ph.Locator):
        name = "twice-test"

        def matches(self, model: nn.Module) -> bool:
            return isinstance(model, Unknown)

        def locate(self, model: nn.Module) -> ph.Located:
            raise AssertionError("replaced locators are never asked")

    class Second(First):
        def locate(self, model: nn.Module) -> ph.Located:
            assert isinstance(model, Unknown)
            return _located(self, model)

    with registered(First, Second):
        assert ph.registered_locators().count("twice-test") == 1
        assert ph.registered_locators()[0] == "twice-test"
        assert ph.locate(Unknown()).locator == "twice-test"  # Second's, or First raised
    assert "twice-test" not in ph.registered_locators()


def test_unregister_removes_and_names_what_is_registered() -> None:
    class Temporary(ph.Locator):
        name = "temporary-test"

        def matches(self, model: nn.Module) -> bool:
            return isinstance(model, Unknown)

        def locate(self, model: nn.Module) -> ph.Located:
            assert isinstance(model, Unknown)
            return _located(self, model)

    ph.register_locator(Temporary)
    assert ph.locate(Unknown()).locator == "temporary-test"
    ph.unregister_locator("temporary-test")
    with pytest.raises(ph.UnsupportedModelError):
        ph.locate(Unknown())
    with pytest.raises(KeyError, match="no locator named 'temporary-test'"):
        ph.unregister_locator("temporary-test")


def test_class_based_locator_wins_over_a_structural_one(caplog: pytest.LogCaptureFixture) -> None:
    """Order of registration does not matter: the structural guess, registered
    last (so first in the list), still comes after the class-based locator."""

    class ByClass(ph.Locator):
        name = "by-class-test"

        def matches(self, model: nn.Module) -> bool:
            return isinstance(model, Unknown)

        def locate(self, model: nn.Module) -> ph.Located:
            assert isinstance(model, Unknown)
            return _located(self, model)

    class ByStructure(ByClass):
        name = "by-structure-test"
        structural = True

        def matches(self, model: nn.Module) -> bool:
            return isinstance(getattr(model, "tok", None), nn.Embedding)

    caplog.set_level(logging.INFO, logger="prompthooks")
    with registered(ByClass, ByStructure):
        order = ph.registered_locators()
        assert order.index("by-class-test") < order.index("by-structure-test")
        assert ph.locate(Unknown()).locator == "by-class-test"
        assert not [r for r in caplog.records if "by-structure-test" in r.getMessage()]
        ph.unregister_locator("by-class-test")
        assert ph.locate(Unknown()).locator == "by-structure-test"
    (record,) = [r for r in caplog.records if "by-structure-test" in r.getMessage()]
    assert record.name == "prompthooks" and record.levelno == logging.INFO
    assert "Unknown recognised by its structure" in record.getMessage()


def _tiny_mistral() -> nn.Module:
    torch.manual_seed(0)
    config = tf.MistralConfig(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=61,
        max_position_embeddings=64,
    )
    return tf.MistralForCausalLM(config).eval()


def test_user_locator_for_a_class_beats_the_built_in_structural_guess(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Mistral is taken by the built-in ``llama-like`` guess (logged at INFO) until
    the user registers a locator that names its class."""
    model = _tiny_mistral()
    caplog.set_level(logging.INFO, logger="prompthooks")
    guessed = ph.locate(model)
    assert guessed.locator == "llama-like"
    (record,) = [r for r in caplog.records if r.name == "prompthooks"]
    assert record.levelno == logging.INFO and "MistralForCausalLM" in record.getMessage()

    class MistralLocator(ph.Locator):
        name = "my-mistral-test"

        def matches(self, model: nn.Module) -> bool:
            return isinstance(model, tf.MistralPreTrainedModel)

        def locate(self, model: nn.Module) -> ph.Located:
            stack: Any = model.model
            sites = tuple(
                ph.AttentionSite(
                    layer.self_attn,
                    "self",
                    i,
                    layer.self_attn.k_proj.out_features // layer.self_attn.head_dim,
                    layer.self_attn.head_dim,
                )
                for i, layer in enumerate(stack.layers)
            )
            return ph.Located(
                locator=self.name,
                model=model,
                embedding=stack.embed_tokens,
                input_stack=stack,
                encoder_mask_readers=(),
                sites=sites,
                max_positions=64,
                shifted_labels=True,
            )

    caplog.clear()
    with registered(MistralLocator):
        assert ph.registered_locators().index("my-mistral-test") < ph.registered_locators().index(
            "llama-like"
        )
        mine = ph.locate(model)

    def shapes(found: ph.Located) -> list[tuple[nn.Module, int, int, int]]:
        return [(s.module, s.layer, s.num_kv_heads, s.head_dim) for s in found.sites]

    assert mine.locator == "my-mistral-test" and shapes(mine) == shapes(guessed)
    assert not [r for r in caplog.records if r.name == "prompthooks"]  # no guess taken


# -- found while writing the example -------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prefix_without_shift_from_an_empty_cache_on_left_padded_rows(arch: str) -> None:
    """A call that brings an empty cache (a user's own decoding loop) with
    ``shift_positions=False``: left pads used to get position -1, which GPT-2's
    and GPT-J's position lookups reject. Real tokens equal the hand-filled cache."""
    model = tiny(arch)
    ids, mask = batch(arch, [7, 3, 5], seed=4)
    located = ph.locate(model)
    heads, dim = located.sites[0].num_kv_heads, located.sites[0].head_dim
    width = sum(2 * s.num_kv_heads * s.head_dim for s in located.sites)
    table = torch.randn(4, width, generator=torch.Generator().manual_seed(7))
    prefix = Prefix([(heads, dim)] * len(located.sites), table=table, shift_positions=False)
    with ph.attach(model, prefix), torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache()).logits
    with torch.no_grad():
        expected = decoder_only_logits(model, ids, mask, table, heads, dim, shift=False)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
