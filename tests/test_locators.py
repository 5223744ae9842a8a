"""Locators find the right modules and never change the model."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import torch
import transformers as tf
from torch import nn

import prompthooks as ph
from prompthooks.locators.classes import KNOWN
from tests.support.models import batch, same_snapshot, snapshot, tiny


@pytest.mark.parametrize(
    ("arch", "head", "roles", "kv_heads"),
    [
        ("gpt2", "lm", {"self": 2}, 4),
        ("gpt2", "base", {"self": 2}, 4),
        ("llama", "lm", {"self": 2}, 2),  # grouped-query attention: 2 KV heads for 4 query heads
        ("llama", "base", {"self": 2}, 2),
        ("t5", "lm", {"enc_self": 2, "dec_self": 2, "cross": 2}, 4),
        ("t5", "base", {"enc_self": 2}, 4),
        ("bert", "lm", {"self": 2}, 4),
        ("bert", "base", {"self": 2}, 4),
        ("bert", "cls", {"self": 2}, 4),
        ("bert", "tok", {"self": 2}, 4),
    ],
)
def test_sites(arch: str, head: str, roles: dict[str, int], kv_heads: int) -> None:
    model = tiny(arch, head=head)
    before = snapshot(model)
    found = ph.locate(model)
    assert same_snapshot(before, snapshot(model))
    counts: dict[str, int] = {}
    for site in found.sites:
        counts[site.role] = counts.get(site.role, 0) + 1
        assert site.num_kv_heads == kv_heads
        assert site.head_dim == 8
    assert counts == roles
    # T5 in transformers 5.x: encoder.embed_tokens and shared are two modules, one weight
    assert found.embedding.weight is model.get_input_embeddings().weight
    assert found.cls_first == (arch == "bert")
    assert [s.layer for s in found.sites if s.role in ("self", "enc_self")] == [0, 1]
    summary = str(found)
    assert type(model).__name__ in summary and "kv_heads" in summary


def test_registered_locator_for_a_new_architecture() -> None:
    """A user's locator makes an unknown model attachable, without library changes."""

    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(20, 8)
            self.body = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.out = nn.Linear(8, 20)

        def forward(
            self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
        ) -> torch.Tensor:
            pad = None if attention_mask is None else attention_mask == 0
            return self.out(self.body(self.tok(input_ids), src_key_padding_mask=pad))

    @ph.register_locator
    class TinyLocator(ph.Locator):
        name = "tiny-test"

        def matches(self, model: nn.Module) -> bool:
            return isinstance(model, Tiny)

        def locate(self, model: nn.Module) -> ph.Located:
            return ph.Located(
                locator=self.name,
                model=model,
                embedding=model.tok,
                input_stack=model,
                encoder_mask_readers=(),
                sites=(),
                max_positions=None,
            )

    assert ph.registered_locators()[0] == "tiny-test"
    model = Tiny().eval()
    ids = torch.randint(0, 20, (2, 5))
    with ph.attach(model, ph.PromptTuning(3)) as att, torch.no_grad():
        out = model(ids)
        table = att.prompts["default"].weight
        ref = model.out(model.body(torch.cat([table.expand(2, 3, 8), model.tok(ids)], 1)))[:, 3:]
    assert out.shape == (2, 5, 20)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_register_locator_rejects_non_locators() -> None:
    with pytest.raises(TypeError, match="Locator"):
        ph.register_locator(int)  # type: ignore[type-var]


def test_batch_helper_is_sane() -> None:
    ids, mask = batch("gpt2", [3, 5])
    assert mask.tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert (ids[mask == 0] == 0).all()


@pytest.mark.oldest_release
def test_class_names_the_locators_match_by_are_real_classes() -> None:
    """The built-in locators recognise classes by module and name, without importing
    them. Each name must still be a class defined in that module on this release: one
    that moved, or became an alias of another family's class, would never match."""
    pairs = sorted({pair for names in KNOWN for pair in names.names})
    assert len({module for module, _ in pairs}) >= 11  # ten modeling modules, modeling_utils
    for module, qualname in pairs:
        found: Any = importlib.import_module(module)
        for part in qualname.split("."):
            found = getattr(found, part)
        assert isinstance(found, type), (module, qualname)
        assert (found.__module__, found.__qualname__) == (module, qualname)


def test_a_subclass_of_a_supported_class_is_located_and_attached_like_it() -> None:
    """Matching reads the model's whole MRO, so a user's subclass is claimed, as
    ``isinstance`` would claim it."""

    class MyGPT2(tf.GPT2LMHeadModel):  # type: ignore[misc]
        pass

    model = MyGPT2(tiny("gpt2").config).eval()
    found = ph.locate(model)
    assert found.locator == "gpt2" and found.shifted_labels
    assert [s.module for s in found.sites] == [block.attn for block in model.transformer.h]
    ids, mask = batch("gpt2", [3, 5])
    with ph.attach(model, ph.PromptTuning(4)), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    assert out.logits.shape == (*ids.shape, model.config.vocab_size)


def test_a_class_named_like_a_supported_one_elsewhere_is_not_claimed() -> None:
    """A name counts only with its module: a class of this test module that is merely
    called ``GPT2PreTrainedModel`` is not given to the GPT-2 locator."""
    impostor = type("GPT2PreTrainedModel", (nn.Module,), {"__qualname__": "GPT2PreTrainedModel"})
    assert impostor.__module__ == __name__
    with pytest.raises(ph.UnsupportedModelError):
        ph.locate(impostor())
