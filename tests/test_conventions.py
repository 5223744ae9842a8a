"""Call conventions: read from signatures, followed across a rename, loud when they drift.

transformers 5.24 renamed the cache argument of every attention module and
stack from ``past_key_values`` to ``cache`` and kept the old name as an alias
that loses to the new one. These tests simulate such drift on tiny LLaMA
models, whatever release is installed:

* an attention module that takes its cache under an older name
  (``past_key_value``) gets the prefix under that name and computes exactly
  what the stock module computes (a family works on both sides of a rename);
* a cache argument under a name prompthooks does not know, or a locator that
  names an argument the module does not take, is refused at attach, with the
  module, the library versions and the expected name in the message, and the
  model left as it was;
* a module whose signature promises the cache but ignores it (a decorator
  that drops it) never returns outputs computed without the prefix: where the
  module's own arithmetic would not notice (bidirectional attention without a
  mask) the call raises ``PromptNotAppliedError``; where the widened causal
  mask no longer fits its keys the module fails first;
* virtual ids that never reach the located embedding raise the same error.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import transformers
from packaging.version import Version
from torch import nn
from transformers.models.bert.modeling_bert import BertSelfAttention
from transformers.models.llama.modeling_llama import LlamaAttention

import prompthooks as ph
from prompthooks.locators.conventions import CACHE_NAMES
from tests.support.models import batch, same_snapshot, snapshot, tiny

pytestmark = pytest.mark.oldest_release  # both sides of the 5.24 rename


def _layer_cache(kwargs: dict[str, Any]) -> Any:
    """The cache the decoder layer handed over, under whichever name this release uses."""
    found = None
    for name in CACHE_NAMES:
        given = kwargs.pop(name, None)
        found = given if found is None else found
    return found


class OldStyleAttention(LlamaAttention):
    """LLaMA attention that takes its cache as ``past_key_value`` (an older convention)."""

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Any = None,
        attention_mask: torch.Tensor | None = None,
        past_key_value: Any = None,
        **kwargs: Any,
    ) -> Any:
        layer_cache = _layer_cache(kwargs)
        cache = past_key_value if past_key_value is not None else layer_cache
        # The stock forward's fourth parameter is its cache in every 5.x release.
        return super().forward(hidden_states, position_embeddings, attention_mask, cache, **kwargs)


class UnknownNameAttention(LlamaAttention):
    """LLaMA attention whose cache argument has a name prompthooks has never seen."""

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        position_embeddings: Any = None,
        attention_mask: torch.Tensor | None = None,
        kv_store: Any = None,
        **kwargs: Any,
    ) -> Any:
        cache = kv_store if kv_store is not None else _layer_cache(kwargs)
        return super().forward(hidden_states, position_embeddings, attention_mask, cache, **kwargs)


def ignoring_its_cache(cls: type[nn.Module]) -> type[nn.Module]:
    """``cls`` with a forward that keeps its signature (``functools.wraps``) but
    drops the cache on the way in, as a deprecation shim pointing the wrong way
    would."""
    forward = cls.forward

    @functools.wraps(forward)
    def dropping(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        _layer_cache(kwargs)
        return forward(self, *args, **kwargs)

    return type(f"CacheIgnoring{cls.__name__}", (cls,), {"forward": dropping})


@contextmanager
def attention_class(
    model: nn.Module, cls: type[nn.Module], stock: type[nn.Module] = LlamaAttention
) -> Iterator[nn.Module]:
    """``model`` with every ``stock`` attention module's class swapped for ``cls``."""
    modules = [m for m in model.modules() if type(m) is stock]
    assert modules
    for m in modules:
        m.__class__ = cls
    try:
        yield model
    finally:
        for m in modules:
            m.__class__ = stock


def _llama(attn: str = "sdpa") -> nn.Module:
    return tiny("llama", attn)


def _prefix_outputs(model: nn.Module, prompt: ph.SoftPrompt) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = batch("llama", [5, 3])
    with ph.attach(model, prompt), torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        tokens = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4)
    return logits, tokens


def test_names_are_read_from_the_signature_and_shown() -> None:
    model = _llama()
    located = ph.locate(model)
    # transformers renamed the argument in 5.24.
    new = Version(transformers.__version__).release >= (5, 24)
    release = "cache" if new else "past_key_values"
    assert all(site.cache_arg == release for site in located.sites)
    assert all(site.mask_arg == "attention_mask" for site in located.sites)
    assert located.call_names(model.model).cache == release
    assert located.call_names(model.model).positions == "position_ids"
    shown = str(located)
    assert f"cache={release} mask=attention_mask" in shown
    assert "call names" in shown
    t5 = ph.locate(tiny("t5"))
    assert {site.mask_arg for site in t5.sites} == {"mask"}  # T5Attention(mask=...)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_an_older_cache_name_gets_the_prefix_under_that_name(attn: str) -> None:
    prompt = ph.attach(_llama(attn), ph.PrefixTuning(3, projection=False)).prompts["default"]
    stock_logits, stock_tokens = _prefix_outputs(_llama(attn), prompt)
    with attention_class(_llama(attn), OldStyleAttention) as model:
        assert {s.cache_arg for s in ph.locate(model).sites} == {"past_key_value"}
        logits, tokens = _prefix_outputs(model, prompt)
    torch.testing.assert_close(logits, stock_logits, rtol=0, atol=1e-6)
    assert torch.equal(tokens, stock_tokens)


def test_an_unknown_cache_name_is_refused_at_attach() -> None:
    with attention_class(_llama(), UnknownNameAttention) as model:
        before = snapshot(model)
        with pytest.raises(ph.UnsupportedModelError) as info:
            ph.attach(model, ph.PrefixTuning(3))
        assert same_snapshot(before, snapshot(model))
    message = str(info.value)
    assert "model.layers.0.self_attn" in message
    assert "found no cache argument" in message
    assert "kv_store" in message  # what the module does take
    assert f"transformers {transformers.__version__}" in message
    # Prompt Tuning never hands attention modules anything: it still attaches.
    with attention_class(_llama(), UnknownNameAttention) as model:
        ph.attach(model, ph.PromptTuning(3)).detach()


def test_a_locator_naming_an_argument_the_module_lacks_is_refused() -> None:
    model = _llama()
    located = ph.locate(model)
    taken = located.sites[0].cache_arg
    stale = "past_key_values" if taken == "cache" else "cache"

    @ph.register_locator
    class StaleLocator(ph.Locator):
        name = "stale-llama"

        def matches(self, model: nn.Module) -> bool:
            return model is target

        def locate(self, model: nn.Module) -> ph.Located:
            sites = tuple(
                ph.AttentionSite(
                    s.module, s.role, s.layer, s.num_kv_heads, s.head_dim, cache_arg=stale
                )
                for s in located.sites
            )
            return ph.Located(
                locator=self.name,
                model=model,
                embedding=located.embedding,
                input_stack=located.input_stack,
                encoder_mask_readers=(),
                sites=sites,
                max_positions=located.max_positions,
                shifted_labels=True,
            )

    target = model
    try:
        before = snapshot(model)
        with pytest.raises(ph.UnsupportedModelError, match=f"as '{stale}', which it does not take"):
            ph.attach(model, ph.PrefixTuning(3))
        assert same_snapshot(before, snapshot(model))
    finally:
        ph.unregister_locator("stale-llama")


def test_a_module_that_ignores_the_cache_stand_in_stops_the_call() -> None:
    # Bidirectional attention without a mask: nothing in the module's own
    # arithmetic notices the missing prefix, so without the check this call
    # would return outputs computed without it.
    model = tiny("bert", "eager", head="base")
    ids, _ = batch("bert", [5, 5])
    with attention_class(model, ignoring_its_cache(BertSelfAttention), BertSelfAttention):
        with ph.attach(model, ph.PrefixTuning(3)):
            with pytest.raises(ph.PromptNotAppliedError) as info:
                model(input_ids=ids)
    message = str(info.value)
    assert "CacheIgnoringBertSelfAttention (encoder.layer.0.attention.self)" in message
    assert "never asked for its keys" in message
    assert f"transformers {transformers.__version__}" in message
    assert "to take its key/value cache as" in message  # what prompthooks expected


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("call", ["forward", "generate"])
def test_a_causal_module_that_ignores_the_prefix_never_returns_outputs(
    attn: str, call: str
) -> None:
    """Where the widened causal mask no longer fits the module's keys, the
    module itself fails first: loudly, if less clearly. Either way no output."""
    ids, mask = batch("llama", [5, 3])
    with attention_class(_llama(attn), ignoring_its_cache(LlamaAttention)) as model:
        with ph.attach(model, ph.PrefixTuning(3)), pytest.raises(RuntimeError):
            if call == "forward":
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            else:
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2)


def test_virtual_ids_that_never_reach_the_embedding_stop_the_call() -> None:
    """A stack that looks its ids up in another table than the located one."""
    model = _llama()
    att = ph.attach(model, ph.PromptTuning(3))
    located = att.located
    ids, mask = batch("llama", [4, 2])
    wide = nn.Embedding(located.vocab_size + 3, located.hidden_size)  # accepts virtual ids
    original = model.model.embed_tokens
    model.model.embed_tokens = wide
    try:
        with pytest.raises(ph.PromptNotAppliedError, match="never reached the token embedding"):
            model(input_ids=ids, attention_mask=mask)
    finally:
        model.model.embed_tokens = original
    model(input_ids=ids, attention_mask=mask)  # the located embedding serves again
    att.detach()


def test_layers_skipped_by_layerdrop_are_not_missing_a_prefix() -> None:
    """BART's LayerDrop skips whole layers while training: their attention never
    runs, so there is no output computed without the prefix, and no error."""
    torch.manual_seed(0)
    config = transformers.BartConfig(
        encoder_layers=4,
        decoder_layers=4,
        d_model=32,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        vocab_size=61,
        max_position_embeddings=64,
        encoder_layerdrop=0.5,
        decoder_layerdrop=0.5,
    )
    model = transformers.BartForConditionalGeneration(config).train()
    ids, mask = batch("t5", [5, 3])
    labels = ids[:, :4].contiguous()
    reached: list[int] = []
    with ph.attach(model, ph.PrefixTuning(2)):
        for module in model.modules():
            if type(module).__name__ == "BartAttention":
                module.register_forward_pre_hook(lambda *_: reached.append(1))
        for _ in range(6):
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    assert 0 < len(reached) < 6 * 12  # some layers were skipped, some ran
