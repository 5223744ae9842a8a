"""LLaMA-like decoder-only families, recognised by structure ("llama-like").

Mistral, Qwen2, Qwen3, Gemma, Gemma 3, Phi-3 (fused ``qkv_proj``) and Granite
(named nowhere in prompthooks: it is found by its layout alone) against
independent references:

* Prompt Tuning: the same model fed ``inputs_embeds`` built by hand, left padded;
* Prefix: the model given a hand-filled ``DynamicCache`` and explicit positions
  (shifted by P or not), left padded;
* generation: a hand-written greedy loop over those references, for the
  dynamic cache and the static one (which comes with one prepared mask per
  layer type on Qwen2, Qwen3 and Gemma 3).

Sliding windows bite in these configs (window 5, prompts of 4, rows up to 7):
Mistral's layers all slide, Qwen2's second and Gemma 3's first layer do. The
prefix sits at the front of the cache, before a row's padding, as it does
when it is cached for ``generate``; the reference gives it the same place.
Models that look close but are laid out differently (latent attention, hybrid
recurrent stacks, chunked attention, encoder-decoders) are refused.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers as tf
from torch import nn

import prompthooks as ph
from prompthooks.hooks.masks import pad_mask
from prompthooks.hooks.prefix_rows import PrefixRows
from prompthooks.locators.llama_like import LlamaLikeLocator
from tests.support.builders import LLAMA_LIKE as FAMILIES
from tests.support.builders import LLAMA_LIKE_COMMON as COMMON
from tests.support.builders import MAX_POSITIONS, VOCAB, WINDOW
from tests.support.builders import prefix_of as _prefix
from tests.support.builders import prefix_table as _table
from tests.support.builders import tiny_llama_like as tiny_family
from tests.support.models import CACHE_ARG, batch, same_snapshot, snapshot, unpad
from tests.support.oracle import oracle_logits
from tests.support.prefix_oracle import decoder_only_logits

N = 4  # virtual tokens


#: config class, model class, config overrides, head_dim, per-layer windows
NAMES = tuple(FAMILIES)
GENERATE = ("gemma3", "mistral")  # a sliding layer and a full one; all sliding


def padded() -> tuple[torch.Tensor, torch.Tensor]:
    return batch("llama", [7, 3, 5], seed=4)  # left padded


def _prefix_oracle(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, table: torch.Tensor, shift: bool
) -> torch.Tensor:
    site = ph.locate(model).sites[0]
    return decoder_only_logits(model, ids, mask, table, site.num_kv_heads, site.head_dim, shift)


# -- sites ----------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_sites(name: str) -> None:
    model = tiny_family(name)
    before = snapshot(model)
    found = ph.locate(model)
    assert same_snapshot(before, snapshot(model))
    _, _, _, head_dim, windows = FAMILIES[name]
    assert found.locator == "llama-like"
    assert found.input_stack is model.model
    assert found.embedding is model.get_input_embeddings()
    assert found.max_positions == MAX_POSITIONS and found.shifted_labels
    assert [s.module for s in found.sites] == [layer.self_attn for layer in model.model.layers]
    assert [s.layer for s in found.sites] == [0, 1]
    assert all(s.role == "self" and s.causal for s in found.sites)
    assert [(s.num_kv_heads, s.head_dim) for s in found.sites] == [(2, head_dim)] * 2
    assert [s.window for s in found.sites] == windows
    summary = str(found)
    assert type(model).__name__ in summary and "'llama-like'" in summary
    assert "model.layers.1.self_attn" in summary and f"head_dim={head_dim}" in summary
    assert ("window=5" in summary) == any(windows)
    # the bare stack is recognised too
    assert ph.locate(model.model).input_stack is model.model


# -- Prompt Tuning ------------------------------------------------------------------


# -- Prefix -----------------------------------------------------------------------------


@pytest.mark.kernel_paths  # also run on the Triton path (tests/conftest.py)
@pytest.mark.parametrize(("attn", "shift"), [("sdpa", True), ("sdpa", False), ("eager", True)])
@pytest.mark.parametrize("name", NAMES)
def test_prefix_short_row_without_a_mask_matches_the_oracle(
    name: str, attn: str, shift: bool
) -> None:
    """A short unpadded row without a mask: sdpa gets no mask at all in either
    layer type (it fits in the window without the prefix). Padded batches, with
    and without ``use_cache``: tests/test_conformance.py (oracle)."""
    model = tiny_family(name, attn)
    table = _table(model)
    ids, _ = padded()
    short = ids[1:2, -3:]
    with torch.no_grad():
        expected_short = _prefix_oracle(model, short, torch.ones_like(short), table, shift)
        plain = model(input_ids=short).logits
    assert (plain - expected_short).abs().max() > 1e-2  # the prefix matters
    with ph.attach(model, _prefix(model, table, shift)), torch.no_grad():
        got_short = model(input_ids=short).logits
    torch.testing.assert_close(got_short, expected_short, atol=1e-5, rtol=0)


def _expected_visibility(width: int, length: int, window: int | None) -> torch.Tensor:
    """(queries, prefix slots): query i, at cache index ``width + i``, sees slot s
    while ``width + i - s < window``. Written as loops."""
    rows = []
    for i in range(length):
        rows.append([window is None or width + i - s < window for s in range(width)])
    return torch.tensor(rows)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gemma3_sliding_and_full_layers_get_their_own_prefix_columns(attn: str) -> None:
    """The masks that reach Gemma 3's attention modules: the full layer sees
    the whole prefix from every query, the sliding layer loses prefix slots
    as its queries move past the window; real columns are the model's own."""
    model = tiny_family("gemma3", attn)
    ids, mask = padded()
    seen: dict[int, tuple[Any, Any]] = {}

    def spy(layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen[layer] = (kwargs["attention_mask"], kwargs[CACHE_ARG])

        return hook

    with ph.attach(model, ph.PrefixTuning(N, projection=False)), torch.no_grad():
        handles = [  # registered after the prefix hooks, so they see what the module sees
            layer.self_attn.register_forward_pre_hook(spy(i), with_kwargs=True)
            for i, layer in enumerate(model.model.layers)
        ]
        model(input_ids=ids, attention_mask=mask, use_cache=False)
        for handle in handles:
            handle.remove()
    length = ids.shape[1]
    for layer, window in ((0, WINDOW), (1, None)):
        padded_mask, _ = seen[layer]
        assert padded_mask.shape[-2:] == (length, N + length)
        if padded_mask.dtype == torch.bool:
            attend = padded_mask
        else:  # additive: 0 attends, the dtype's minimum blocks
            attend = padded_mask > torch.finfo(padded_mask.dtype).min / 2
        for row in range(ids.shape[0]):
            prefix_cols = attend[row if attend.shape[0] > 1 else 0, 0, :, :N]
            assert torch.equal(prefix_cols, _expected_visibility(N, length, window)), (layer, row)
            real = mask[row].bool()
            for i in range(length):  # real keys: causal, padding masked, the window's own
                for j in range(length):
                    want = bool(real[j]) and j <= i and (window is None or i - j < window)
                    if real[i]:
                        assert bool(attend[row if attend.shape[0] > 1 else 0, 0, i, N + j]) == want
    assert not _expected_visibility(N, length, WINDOW).all()  # the window bites here


def test_pad_mask_window_blocks_only_prefix_slots_outside_the_window() -> None:
    """``pad_mask`` on its own: every combination of given / missing mask and
    bool / float masks, against the loop-written visibility."""
    rows = PrefixRows(N, None, N, N, N)
    length = 6
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    for given in (None, causal[None, None], torch.zeros(1, 1, length, length)):
        out = pad_mask(given, rows, length, True, torch.float32, torch.device("cpu"), 3)
        assert out is not None and out.shape == (1, 1, length, N + length)
        attend = out if out.dtype == torch.bool else out == 0
        assert torch.equal(attend[0, 0, :, :N], _expected_visibility(N, length, 3))
        if given is None:  # the model left it out: causal among the real keys
            assert torch.equal(attend[0, 0, :, N:], causal)
        else:  # the model's own columns are untouched
            real = given[0, 0] if given.dtype == torch.bool else given[0, 0] == 0
            assert torch.equal(attend[0, 0, :, N:], real)


# -- padding, detach, gradients ---------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in NAMES if any(FAMILIES[n][4])])
def test_sliding_window_prefix_padded_rows_differ_from_rows_alone(name: str) -> None:
    """The prefix sits before the row's padding (as in the cache that generate
    fills), so a padded row's sliding window loses the prefix sooner than the
    row alone. Documented (README, Architectures); pinned here. The other
    cells of "padded == alone": tests/test_conformance.py (padded)."""
    model = tiny_family(name)
    ids, mask = padded()
    torch.manual_seed(1)
    with ph.attach(model, ph.PrefixTuning(N, projection=False)), torch.no_grad():
        together = model(input_ids=ids, attention_mask=mask).logits
        for row in range(ids.shape[0]):
            alone_ids = unpad("llama", ids, mask, row)
            alone = model(input_ids=alone_ids).logits[0]
            got = together[row, mask[row].bool()]
            if alone_ids.shape[1] < ids.shape[1]:
                assert (got - alone).abs().max() > 1e-3
            else:
                torch.testing.assert_close(got, alone, atol=1e-5, rtol=0)


# -- generation -------------------------------------------------------------------------


def _greedy(
    logits_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ids: torch.Tensor,
    mask: torch.Tensor,
    steps: int,
) -> torch.Tensor:
    """Greedy decoding written out: the whole sequence again at every step."""
    for _ in range(steps):
        with torch.no_grad():
            nxt = logits_of(ids, mask)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return ids


#: (family, cache, sliding window). A static cache comes with one prepared mask
#: per layer type on Qwen2, Qwen3 and Gemma 3 (a dict; Mistral's single sliding
#: mask is refused: tests/test_conformance.py, static). With a window of 14,
#: Gemma 3's static sliding layer is sized below the window (12 slots for the
#: user's tokens) until it gets the prompt's.
GREEDY = [
    *((name, "dynamic", WINDOW) for name in GENERATE),
    *((name, "static", WINDOW) for name in ("qwen2", "qwen3", "gemma3")),
    ("gemma3", "static", 14),
]


@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.parametrize(("name", "cache", "window"), GREEDY)
def test_greedy_generate_equals_the_oracle(name: str, cache: str, window: int, method: str) -> None:
    """Cached decoding (``generate``, dynamic or static cache) against the
    reference recomputed from scratch at every step; 6 new tokens carry every
    row past the window."""
    model = tiny_family(name, sliding_window=window)
    ids, mask = padded()
    steps = 6
    kw: dict[str, Any] = {"max_new_tokens": steps, "do_sample": False}
    if cache == "static":
        kw["cache_implementation"] = "static"
    if method == "prompt":
        with ph.attach(model, ph.PromptTuning(N)) as att:
            table = att.prompts["default"].table().detach().clone()
            got = model.generate(input_ids=ids, attention_mask=mask, **kw)

        def reference(i: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            return oracle_logits(model, "llama", i, m, table)[0]

    else:
        table = _table(model, seed=5)  # a table that changes every case's tokens
        with ph.attach(model, _prefix(model, table)):
            got = model.generate(input_ids=ids, attention_mask=mask, **kw)

        def reference(i: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            return _prefix_oracle(model, i, m, table, True)

    expected = _greedy(reference, ids, mask, steps)
    plain = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert not torch.equal(plain, expected)  # the prompt changes what is generated
    assert torch.equal(got, expected)


STATIC_METHODS: dict[str, Callable[[], Any]] = {
    "prompt": lambda: ph.PromptTuning(N),
    "ptuning": lambda: ph.PTuning(3, "mlp", hidden_size=16),
    "prefix": lambda: ph.PrefixTuning(N, projection=False),
    "prefix_mlp": lambda: ph.PrefixTuning(N, hidden_size=16),
    "mixed": lambda: {  # one row each, prompts of different lengths
        "a": ph.PTuning(5, "mlp", hidden_size=16),
        "b": ph.PrefixTuning(3, hidden_size=16),
        "c": ph.PrefixTuning(N, projection=False, shift_positions=False),
    },
}


@pytest.mark.parametrize("padding", ["padded", "unpadded"])
@pytest.mark.parametrize("method", list(STATIC_METHODS))
@pytest.mark.parametrize("name", ["qwen2", "qwen3", "gemma3"])
def test_static_cache_equals_dynamic_for_every_method(name: str, method: str, padding: str) -> None:
    """Every method (P-tuning, a prefix through its MLP and a batch mixing
    P-tuning with both prefixes, shifted and not, besides the conformance
    cell's two), greedy and beam search. Unpadded, generate prepares no
    full-attention mask (``None``: sdpa's causal shortcut) next to the sliding
    one. The dynamic cache is checked against the oracles
    (``test_greedy_generate_equals_the_oracle``, tests/test_conformance.py)."""
    model = tiny_family(name)
    ids, mask = padded() if padding == "padded" else batch("llama", [6, 6, 6], seed=4)
    torch.manual_seed(2)
    with ph.attach(model, STATIC_METHODS[method]()) as att, torch.no_grad():
        rows = ["a", "b", "c"] if method == "mixed" else ["default"] * 3
        with att.use(rows):
            for beams in (1, 2):
                kw: dict[str, Any] = {"max_new_tokens": 6, "do_sample": False, "num_beams": beams}
                dynamic = model.generate(input_ids=ids, attention_mask=mask, **kw)
                static = model.generate(
                    input_ids=ids, attention_mask=mask, cache_implementation="static", **kw
                )
                assert torch.equal(static, dynamic), beams


def test_static_cache_without_a_full_attention_mask_is_refused() -> None:
    """Every layer of this Qwen2 slides, so generate prepares only a
    sliding-window mask, which hides the padding outside the window: refused
    with the way out, never read back wrong."""
    model = tiny_family("qwen2", max_window_layers=0)
    ids, mask = padded()
    with ph.attach(model, ph.PromptTuning(N)), torch.no_grad():
        with pytest.raises(NotImplementedError, match="none for full attention.*dynamic cache"):
            model.generate(input_ids=ids, attention_mask=mask, cache_implementation="static")


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_a_custom_4d_mask_is_refused_not_read_as_padding(method: str) -> None:
    """Two sequences packed in each row (a block-diagonal causal mask), with a
    cache: its padding alone would let the second sequence see the first, so it
    is refused rather than read back like the masks generate prepares."""
    model = tiny_family("qwen3")  # full attention in every layer
    ids, _ = batch("llama", [6, 6], seed=1)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    blocks = torch.block_diag(torch.ones(3, 3), torch.ones(3, 3)).bool()
    packed = (causal & blocks)[None, None].expand(2, 1, 6, 6)
    spec = ph.PromptTuning(N) if method == "prompt" else ph.PrefixTuning(N, projection=False)
    cache = tf.DynamicCache(config=model.config)
    with ph.attach(model, spec), torch.no_grad():
        with pytest.raises(ValueError, match="not a causal mask over padding"):
            model(input_ids=ids, attention_mask=packed, past_key_values=cache)


@pytest.mark.parametrize("name", GENERATE)
def test_cache_made_inside_the_forward_continues_like_the_oracle(name: str) -> None:
    """``use_cache=True`` without a cache: the model makes one and the prefix
    is written into it; a user's own decode steps on that cache match the
    reference. The prefix is longer than a sliding layer keeps (window - 1
    keys), so that layer drops prefix keys from the first call on."""
    model = tiny_family(name)
    table = _table(model, n=WINDOW + 1)
    ids, mask = padded()
    steps = []
    with ph.attach(model, _prefix(model, table)), torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        cache, seq, seq_mask = out.past_key_values, ids, mask
        for _ in range(4):
            nxt = out.logits[:, -1:].argmax(-1)
            seq = torch.cat([seq, nxt], dim=1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(nxt)], dim=1)
            out = model(input_ids=nxt, attention_mask=seq_mask, past_key_values=cache)
            steps.append((seq, seq_mask, out.logits[:, -1]))
    for seq, seq_mask, logits in steps:
        with torch.no_grad():
            expected = _prefix_oracle(model, seq, seq_mask, table, True)[:, -1]
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


# -- scaled embeddings ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gemma", "gemma3", "granite"])
def test_text_init_reproduces_the_text_as_the_model_sees_it(name: str) -> None:
    """Gemma's embedding module scales its rows by sqrt(hidden) (Granite
    scales in the stack instead): a prompt initialised from a text must act
    exactly like that text in front of the input."""
    model = tiny_family(name)
    text = [5, 6, 7]

    def tokenizer(s: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": text}

    ids, _ = batch("llama", [5], seed=2)
    spec = ph.PromptTuning(3, init="text", init_text="abc", tokenizer=tokenizer)
    with ph.attach(model, spec), torch.no_grad():
        prompted = model(input_ids=ids).logits
    with torch.no_grad():
        spelled = model(input_ids=torch.cat([torch.tensor([text]), ids], dim=1)).logits[:, 3:]
    torch.testing.assert_close(prompted, spelled, atol=1e-5, rtol=0)


# -- recognition ------------------------------------------------------------------------


def test_structural_match_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    model = tiny_family("gemma3")
    with caplog.at_level(logging.INFO, logger="prompthooks"):
        ph.locate(model)
    infos = [r for r in caplog.records if r.levelno == logging.INFO and r.name == "prompthooks"]
    assert any(
        "llama-like" in r.getMessage() and "Gemma3ForCausalLM" in r.getMessage() for r in infos
    )


def _near_misses() -> dict[str, nn.Module]:
    """Decoder-only models with ``embed_tokens`` and ``layers`` that this
    locator cannot serve: latent attention (keys and values of different
    widths, no ``k_proj``), a hybrid stack whose first layer is a convolution,
    chunked attention (a mask the prefix columns cannot follow)."""
    small = {k: v for k, v in COMMON.items() if k != "initializer_range"}
    torch.manual_seed(0)
    return {
        "deepseek_v3": tf.DeepseekV3ForCausalLM(
            tf.DeepseekV3Config(
                **small,
                kv_lora_rank=16,
                q_lora_rank=16,
                qk_rope_head_dim=4,
                qk_nope_head_dim=4,
                v_head_dim=8,
                n_routed_experts=4,
                num_experts_per_tok=2,
                moe_intermediate_size=16,
                first_k_dense_replace=1,
            )
        ),
        "lfm2": tf.Lfm2ForCausalLM(
            tf.Lfm2Config(
                **{k: v for k, v in small.items() if k != "intermediate_size"},
                layer_types=["conv", "full_attention"],
            )
        ),
        "llama4": tf.Llama4ForCausalLM(
            tf.Llama4TextConfig(
                **small,
                head_dim=8,
                attention_chunk_size=8,
                num_local_experts=2,
                intermediate_size_mlp=64,
            )
        ),
    }


def test_near_misses_fall_through(caplog: pytest.LogCaptureFixture) -> None:
    locator = LlamaLikeLocator()
    with caplog.at_level(logging.INFO, logger="prompthooks"):
        for name, model in _near_misses().items():
            assert locator.matches(model) is False, name
            with pytest.raises(ph.UnsupportedModelError):
                ph.locate(model)
    assert not any("llama-like" in r.getMessage() for r in caplog.records)
    # the same checks accept the same layout with ordinary attention
    assert locator.matches(tiny_family("mistral"))


def test_encoder_decoders_are_not_claimed() -> None:
    locator = LlamaLikeLocator()
    bart = tf.BartForConditionalGeneration(
        tf.BartConfig(
            vocab_size=VOCAB,
            d_model=32,
            encoder_layers=1,
            decoder_layers=1,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            max_position_embeddings=MAX_POSITIONS,
        )
    )
    t5 = tf.T5ForConditionalGeneration(
        tf.T5Config(num_layers=1, d_model=32, d_kv=8, num_heads=4, d_ff=32, vocab_size=VOCAB)
    )
    for model in (bart, t5, bart.model, bart.model.decoder):
        assert not locator.matches(model), type(model).__name__
    assert ph.locate(bart).locator != "llama-like"


def test_a_user_subclass_with_an_unknown_cache_argument_is_refused() -> None:
    """The same modules, but attention that takes its cache under a name
    prompthooks does not know (``conventions.CACHE_NAMES``): the prefix hooks
    could not reach it, so the layout does not match. (A known older name,
    ``past_key_value``, is served: tests/test_conventions.py.)"""

    class UnknownNameAttention(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner
            self.head_dim = inner.head_dim
            self.k_proj, self.v_proj = inner.k_proj, inner.v_proj

        def forward(
            self,
            hidden_states: torch.Tensor,
            attention_mask: torch.Tensor | None = None,
            kv_store: Any = None,
            **kwargs: Any,
        ) -> Any:
            return self.inner(hidden_states, attention_mask=attention_mask, **kwargs)

    model = tiny_family("qwen3")
    for layer in model.model.layers:
        layer.self_attn = UnknownNameAttention(layer.self_attn)
    assert not LlamaLikeLocator().matches(model)
    with pytest.raises(ph.UnsupportedModelError):
        ph.locate(model)
