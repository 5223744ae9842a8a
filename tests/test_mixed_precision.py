"""Mixed precision: bf16 and fp16 models with fp32 prompt parameters, and ``torch.autocast``.

The prompt parameters stay fp32 and are cast to the model's dtype where they enter
it (the token splice, the prefix concat, the cache). Every check compares against
an independent oracle run on the same low-precision model (or the same fp32 model
under the same autocast), with the base parameters frozen as they are while a
prompt is attached:

* token prompts (Prompt Tuning, P-tuning): ``inputs_embeds`` built by hand
  (``tests/support/oracle.py``), the fp32 table cast to the model's dtype row by row;
* prefixes (Prefix Tuning, P-tuning v2): a ``DynamicCache`` filled by hand
  (GPT-2, LLaMA, BERT), and on T5 the encoder run block by block, each block
  given a hand-filled cache, and the decoder given a hand-filled
  ``EncoderDecoderCache``; keys and values cast to the model's dtype row by row.

The oracle's leaf is the fp32 table (for P-tuning and projected prefixes: the
encoder's output, upcast once), so its gradient reaches the parameters through
the cast by autograd.

Tolerances. Forward outputs are compared exactly: the oracle feeds the same model
the same numbers in the same dtype. Gradients of fp32 parameters are sums over
rows (and over virtual positions) accumulated in fp32 by both, possibly in another
order: rtol 1e-5 and atol 1e-5 x max|grad| (fp32 rounding of a few additions).
Two autocast cases round one partial sum to bf16 in one and not the other, so
they get atol 2**-6 x max|grad| (a few bf16 roundings of 2**-8 each; measured
up to 0.8%):
* LLaMA's prefixes: the oracle's ``DynamicCache`` concatenates the fp32 prefix
  with the model's bf16 values and so holds fp32 values, whose grouped-query head
  repeat is summed in fp32 in the backward; the library's values are bf16 (as the
  base model's own are), summed in bf16. Where the sum is taken is all that differs.
* T5 with a projected prefix: the projection runs once for the encoder and once
  for the decoder, and autocast casts its weights to bf16 once per region, so the
  two runs' weight gradients add up in bf16 (torch's autocast semantics for any
  module called twice); the oracle runs it once.

fp16 on CPU: every op these tiny models use runs in fp16 with torch 2.13
(forward and backward on all four families, generate on GPT-2, LLaMA and T5), so
nothing is left out. (Uncached generation, which costs seconds per step under
Triton's interpreter, is compared with cached generation in bf16 only.)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache

import prompthooks as ph
from prompthooks.methods import SoftPrompt
from tests.support.models import ARCHS, batch, decoder_ids, same_snapshot, snapshot, tiny
from tests.support.oracle import first_real, oracle_logits
from tests.support.prefix_oracle import positions, site_kv

MODES = ("bf16", "fp16", "autocast")
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
METHODS = ("prompt", "ptuning", "prefix", "ptv2")
GEN_ARCHS = ("gpt2", "llama", "t5")  # BERT does not generate


def model_dtype(mode: str) -> torch.dtype:
    return LOW.get(mode, torch.float32)


@contextlib.contextmanager
def precision(mode: str) -> Iterator[None]:
    if mode == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    else:
        yield


def spec(method: str, n: int) -> Any:
    if method == "prompt":
        return ph.PromptTuning(n)
    if method == "ptuning":
        return ph.PTuning(n, encoder="mlp", hidden_size=16)
    return ph.PrefixTuning(n, projection=method == "prefix", hidden_size=16)


def low_model(arch: str, mode: str, seed: int = 0) -> nn.Module:
    """A tiny model converted to the mode's dtype *before* anything is attached."""
    return tiny(arch, seed=seed).to(model_dtype(mode))


def inputs(arch: str, lengths: list[int], seed: int, pad_to: int | None = None) -> dict[str, Any]:
    ids, mask = batch(arch, lengths, seed=seed, pad_to=pad_to)
    kw: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if arch == "t5":
        kw["decoder_input_ids"] = decoder_ids(len(lengths), 4, seed=seed + 1)
    return kw


def real_positions(arch: str, kw: dict[str, Any]) -> torch.Tensor:
    """Output positions that hold real tokens (T5's decoder positions all do)."""
    if arch == "t5":
        return torch.ones_like(kw["decoder_input_ids"], dtype=torch.bool)
    mask: torch.Tensor = kw["attention_mask"].bool()
    return mask


def objective(logits: torch.Tensor, real: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Cross-entropy at real positions against fixed random targets (fp32)."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, logits.shape[-1], logits.shape[:2], generator=g)
    return nn.functional.cross_entropy(logits[real].float(), targets[real])


# -- the oracle ----------------------------------------------------------------------


def rows(x: torch.Tensor, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``(1, H, P, D)`` keys for every row, cast row by row from fp32."""
    return x.float().expand(batch_size, -1, -1, -1).to(dtype)


def prefix_kv(model: nn.Module, prompt: SoftPrompt) -> list[tuple[torch.Tensor, ...]]:
    located = ph.locate(model)
    site = located.sites[0]
    flat = prompt.flat()  # type: ignore[operator]
    return site_kv(flat.float(), len(located.sites), site.num_kv_heads, site.head_dim)


def cache_oracle(
    model: nn.Module, arch: str, kw: dict[str, Any], kv: list[Any], dtype: torch.dtype, steps: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GPT-2 / LLaMA / BERT given the prefix as a hand-filled past, positions shifted
    by P; then ``steps`` greedy tokens by hand, one forward call per token."""
    ids, mask = kw["input_ids"], kw["attention_mask"]
    b, p = ids.shape[0], kv[0][0].shape[2]
    cache = DynamicCache()
    for layer, (k, v) in enumerate(kv):
        cache.update(rows(k, b, dtype), rows(v, b, dtype), layer)
    full = torch.cat([torch.ones(b, p, dtype=mask.dtype), mask], dim=1)
    pos = positions(mask, p)
    call = {"attention_mask": full, "position_ids": pos, "past_key_values": cache}
    if arch == "bert":  # BertForMaskedLM takes no cache: its encoder does
        hidden = model.bert(input_ids=ids, **call).last_hidden_state
        scores: torch.Tensor = model.cls(hidden)
        return scores, None
    out = model(input_ids=ids, use_cache=True, **call)
    logits, tokens = out.logits, []
    for _ in range(steps):
        nxt = out.logits[:, -1:].argmax(-1)
        tokens.append(nxt)
        full = torch.cat([full, torch.ones(b, 1, dtype=full.dtype)], dim=1)
        pos = pos[:, -1:] + 1
        out = model(
            input_ids=nxt,
            attention_mask=full,
            position_ids=pos,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    return logits, torch.cat(tokens, dim=1) if tokens else None


def t5_oracle(
    model: Any, kw: dict[str, Any], kv: list[Any], dtype: torch.dtype, steps: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """T5 with a prefix in every encoder self-attention, decoder self-attention and
    cross-attention. Encoder: the model's own blocks, one by one, each given a cache
    that holds its prefix (T5's relative positions then see it as P earlier tokens).
    Decoder: a hand-filled ``EncoderDecoderCache`` (cross keys: prefix + encoder keys
    computed by hand). Then ``steps`` greedy decoder tokens by hand."""
    ids, mask = kw["input_ids"], kw["attention_mask"]
    layers, h, d = model.config.num_layers, model.config.num_heads, model.config.d_kv
    b, p = ids.shape[0], kv[0][0].shape[2]
    enc_kv, dec_kv = kv[:layers], kv[layers:]
    own = DynamicCache()
    for i, (k, v) in enumerate(enc_kv):
        own.update(rows(k, b, dtype), rows(v, b, dtype), i)
    x = model.encoder.embed_tokens(ids)
    keep = torch.cat([torch.ones(b, p, dtype=torch.bool), mask.bool()], dim=1)[:, None, None, :]
    additive = torch.zeros(keep.shape, dtype=x.dtype).masked_fill(~keep, torch.finfo(x.dtype).min)
    bias = None
    for block in model.encoder.block:
        x, bias, _ = block(x, attention_mask=additive, position_bias=bias, past_key_values=own)
    encoded = model.encoder.final_layer_norm(x)
    self_cache, cross_cache = DynamicCache(), DynamicCache()
    cache = EncoderDecoderCache(self_cache, cross_cache)
    for i, block in enumerate(model.decoder.block):
        (self_k, self_v), (cross_k, cross_v) = dec_kv[2 * i], dec_kv[2 * i + 1]
        self_cache.update(rows(self_k, b, dtype), rows(self_v, b, dtype), i)
        cross = block.layer[1].EncDecAttention
        k = cross.k(encoded).view(b, -1, h, d).transpose(1, 2)
        v = cross.v(encoded).view(b, -1, h, d).transpose(1, 2)
        cross_cache.update(
            torch.cat([rows(cross_k, b, dtype), k], dim=2),
            torch.cat([rows(cross_v, b, dtype), v], dim=2),
            i,
        )
        cache.is_updated[i] = True  # the decoder reuses these cross keys as they are
    # The encoder output only sizes the cross mask here: its keys come from the cache.
    padded = torch.cat([encoded.new_zeros(b, p, encoded.shape[-1]), encoded], dim=1)
    call = {
        "encoder_outputs": (padded,),
        "attention_mask": torch.cat([torch.ones(b, p, dtype=mask.dtype), mask], dim=1),
        "use_cache": True,
    }
    if steps == 0:
        out = model(decoder_input_ids=kw["decoder_input_ids"], past_key_values=cache, **call)
        return out.logits, None
    nxt = torch.full((b, 1), model.config.decoder_start_token_id, dtype=torch.long)
    tokens = [nxt]
    for _ in range(steps):
        out = model(decoder_input_ids=nxt, past_key_values=cache, **call)
        cache = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        tokens.append(nxt)
    return out.logits, torch.cat(tokens, dim=1)


def spliced_by_hand(
    model: nn.Module, arch: str, kw: dict[str, Any], table: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``inputs_embeds`` with the fp32 table cast into each row by hand, and the mask."""
    ids, mask = kw["input_ids"], kw["attention_mask"]
    embed = model.get_input_embeddings()
    p = table.shape[0]
    embeds, masks = [], []
    for b in range(ids.shape[0]):
        at = first_real(mask[b]) + (1 if arch == "bert" else 0)
        e = embed(ids[b])
        embeds.append(torch.cat([e[:at], table.float().to(e.dtype), e[at:]]))
        masks.append(torch.cat([mask[b, :at], torch.ones(p, dtype=mask.dtype), mask[b, at:]]))
    return torch.stack(embeds), torch.stack(masks)


def oracle(
    model: nn.Module, arch: str, prompt: SoftPrompt, kw: dict[str, Any], mode: str, steps: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits (the user's positions) and, with ``steps``, greedy tokens of the
    prompted model, computed without prompthooks. Call it detached."""
    model.requires_grad_(False)  # frozen, as while attached (T5's sdpa picks its kernel by it)
    with precision(mode):
        if prompt.kind == "tokens":
            table = prompt.table().float()
            extra = {"decoder_input_ids": kw["decoder_input_ids"]} if arch == "t5" else {}
            logits, _ = oracle_logits(
                model, arch, kw["input_ids"], kw["attention_mask"], table, **extra
            )
            if not steps:
                return logits, None
            embeds, mask = spliced_by_hand(model, arch, kw, table)
            tokens = model.generate(  # type: ignore[operator]
                inputs_embeds=embeds, attention_mask=mask, max_new_tokens=steps, do_sample=False
            )
            return logits, tokens
        kv = prefix_kv(model, prompt)
        if arch == "t5":
            return t5_oracle(model, kw, kv, model_dtype(mode), steps)
        return cache_oracle(model, arch, kw, kv, model_dtype(mode), steps)


def gradients(prompt: SoftPrompt) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in prompt.named_parameters():
        assert p.grad is not None, name
        out[name] = p.grad.detach().clone()
        p.grad = None
    return out


def bf16_sums(mode: str, arch: str, method: str) -> bool:
    """The autocast cases where a partial sum is rounded to bf16 on one side only
    (see the module docstring)."""
    return mode == "autocast" and (
        (arch == "llama" and method in ("prefix", "ptv2")) or (arch == "t5" and method == "prefix")
    )


def assert_gradients_close(
    got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], loose: bool = False
) -> None:
    assert got.keys() == expected.keys()
    for name, grad in got.items():
        ref = expected[name]
        assert grad.dtype == torch.float32, name
        assert ref.abs().max() > 0, name  # the comparison means something
        atol = float(ref.abs().max()) * (2**-6 if loose else 1e-5)
        torch.testing.assert_close(grad, ref, atol=atol, rtol=1e-5, msg=name)


# -- forward and gradients against the oracle -----------------------------------------


def check_against_oracle(
    arch: str,
    method: str,
    mode: str,
    lengths: list[int],
    n: int,
    seed: int,
    pad_to: int | None = None,
    use_cache: bool | None = None,
) -> None:
    model = low_model(arch, mode, seed)
    base_dtypes = {name: p.dtype for name, p in model.named_parameters()}
    kw = inputs(arch, lengths, seed, pad_to)
    call = dict(kw) if use_cache is None else {**kw, "use_cache": use_cache}
    real = real_positions(arch, kw)
    torch.manual_seed(seed)
    with ph.attach(model, spec(method, n)) as att:
        prompt = att.prompts["default"]
        assert isinstance(prompt, SoftPrompt)
        assert all(p.dtype == torch.float32 for p in att.parameters())
        with precision(mode):
            logits = model(**call).logits
            loss = objective(logits, real, seed)
        loss.backward()
        assert all(p.dtype == torch.float32 for p in att.parameters())
    got = gradients(prompt)
    assert {name: p.dtype for name, p in model.named_parameters()} == base_dtypes
    if mode != "autocast":
        assert logits.dtype == model_dtype(mode)

    expected, _ = oracle(model, arch, prompt, kw, mode)
    assert expected.shape == logits.shape
    assert torch.equal(logits[real], expected[real])
    with precision(mode):
        ref_loss = objective(expected, real, seed)
    ref_loss.backward()
    assert torch.equal(loss, ref_loss)
    assert_gradients_close(got, gradients(prompt), bf16_sums(mode, arch, method))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", MODES)
def test_outputs_and_gradients_equal_the_oracle(mode: str, arch: str, method: str) -> None:
    """bf16 / fp16 model (cast before attaching) or autocast on the fp32 model: the
    prompt stays fp32, outputs equal the oracle exactly, and its fp32 gradients
    equal the oracle's (a left-padded row on GPT-2/LLaMA, right-padded on T5/BERT).
    Prefixes reach the decoders' attention through the concat (``use_cache=False``,
    the training path) in bf16 and under autocast, and through the cache the model
    creates in its forward (the default) in fp16; BERT and the T5 encoder always
    take the concat."""
    use_cache = False if method in ("prefix", "ptv2") and mode != "fp16" else None
    check_against_oracle(arch, method, mode, [5, 3], 2, seed=1, use_cache=use_cache)


cases = st.fixed_dictionaries(
    {
        "arch": st.sampled_from(ARCHS),
        "method": st.sampled_from(METHODS),
        "mode": st.sampled_from(MODES),
        "lengths": st.lists(st.integers(1, 7), min_size=1, max_size=3),
        "extra_pad": st.integers(0, 2),
        "prompt": st.integers(1, 5),
        "seed": st.integers(0, 3),
        "use_cache": st.sampled_from([None, False]),
    }
)


@settings(max_examples=10)
@given(case=cases)
def test_property_any_padding_and_prompt_length(case: dict[str, Any]) -> None:
    """dtype x architecture x method x padding x prompt length x cache, against the oracle."""
    lengths = case["lengths"]
    if case["arch"] == "bert":
        lengths = [max(n, 2) for n in lengths]  # [CLS] and at least one token
    check_against_oracle(
        case["arch"],
        case["method"],
        case["mode"],
        lengths,
        case["prompt"],
        case["seed"],
        pad_to=max(lengths) + case["extra_pad"],
        use_cache=None if case["arch"] == "bert" else case["use_cache"],
    )


# -- training --------------------------------------------------------------------------


def fp32_loss(arch: str, logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The model's loss recomputed in fp32 from its logits (BERT's own loss is
    computed in the model's dtype, too coarse in bf16 to see a few small steps)."""
    if arch in ("gpt2", "llama"):
        logits, labels = logits[:, :-1], labels[:, 1:]
    flat = logits.float().reshape(-1, logits.shape[-1])
    return float(nn.functional.cross_entropy(flat, labels.reshape(-1), ignore_index=-100))


#: The architecture each (mode, method) trains on: every architecture three times,
#: every mode on all four. Prefixes train on GPT-2, LLaMA and T5, whose forward
#: creates a cache (the prefix is written into it): BERT's prefix path, the concat,
#: costs seconds per call under Triton's interpreter, and its gradients are checked
#: against the oracle above.
TRAINED_ON = {
    "bf16": {"prompt": "bert", "ptuning": "t5", "prefix": "llama", "ptv2": "gpt2"},
    "fp16": {"prompt": "t5", "ptuning": "bert", "prefix": "gpt2", "ptv2": "llama"},
    "autocast": {"prompt": "bert", "ptuning": "llama", "prefix": "t5", "ptv2": "gpt2"},
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("mode", MODES)
def test_training_steps_move_the_fp32_prompt_only(mode: str, method: str) -> None:
    """The user's loop: AdamW over ``model.parameters()``, the model's own loss with
    labels, three steps. The prompt stays fp32 and every parameter of it moves, the
    loss goes down (recomputed in fp32 from the logits: BERT's own loss is computed
    in bf16, coarser than what a few steps change), and the low-precision base
    model is bit-identical afterwards."""
    arch = TRAINED_ON[mode][method]
    model = low_model(arch, mode)
    model.train()
    for module in model.modules():  # no dropout: the loss must only move with the prompt
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "dropout", None), float):
            module.dropout = 0.0  # T5 attention's own dropout rate
    kw = inputs(arch, [6, 4], seed=2)
    if arch == "t5":
        labels = decoder_ids(2, 4, seed=9)
    else:
        labels = kw["input_ids"].masked_fill(kw["attention_mask"] == 0, -100)
    before = snapshot(model)
    torch.manual_seed(0)
    with ph.attach(model, spec(method, 4)) as att:
        start = [p.detach().clone() for p in att.parameters()]
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2)
        losses = []
        for _ in range(3):
            optimizer.zero_grad()
            with precision(mode):
                out = model(**kw, labels=labels)
            out.loss.backward()
            assert all(
                p.grad is not None and p.grad.dtype == torch.float32 for p in att.parameters()
            )
            optimizer.step()
            losses.append(fp32_loss(arch, out.logits.detach(), labels))
        after = list(att.parameters())
        assert all(p.dtype == torch.float32 for p in after)
        assert all(not torch.equal(a, b) for a, b in zip(start, after, strict=True))
    assert losses[-1] < losses[0]
    assert same_snapshot(before, snapshot(model))


# -- model.to() after attaching ----------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_model_to_after_attaching_casts_the_prompt_too(method: str) -> None:
    """Documented behaviour: the prompt is registered on the model while attached, so
    ``model.to(torch.bfloat16)`` after attaching casts it as well (the API promises
    that ``model.to`` reaches the prompt); a P-tuning encoder or prefix MLP then
    computes in bf16. ``att.prompts.float()`` makes it fp32 again (its values now
    bf16-rounded). Either way the outputs equal the oracle fed the prompt as it is."""
    arch = "llama"
    model = tiny(arch)
    kw = inputs(arch, [6, 3], seed=4)
    real = real_positions(arch, kw)
    torch.manual_seed(0)
    with ph.attach(model, spec(method, 3)) as att:
        prompt = att.prompts["default"]
        assert isinstance(prompt, SoftPrompt)
        model.to(torch.bfloat16)
        assert all(p.dtype == torch.bfloat16 for p in model.parameters())  # the prompt too
        with torch.no_grad():
            cast_along = model(**kw).logits
    with torch.no_grad():
        expected, _ = oracle(model, arch, prompt, kw, "bf16")
    assert torch.equal(cast_along[real], expected[real])

    with ph.attach(model, prompt) as att:
        att.prompts.float()
        assert all(p.dtype == torch.float32 for p in att.parameters())
        assert {p.dtype for n, p in model.named_parameters() if "prompthooks" not in n} == {
            torch.bfloat16
        }
        with torch.no_grad():
            restored = model(**kw).logits
    with torch.no_grad():
        expected, _ = oracle(model, arch, prompt, kw, "bf16")
    assert torch.equal(restored[real], expected[real])


# -- generation ------------------------------------------------------------------------


def generated(
    model: nn.Module, arch: str, kw: dict[str, Any], steps: int, **extra: Any
) -> torch.Tensor:
    call = {k: v for k, v in kw.items() if k != "decoder_input_ids"}
    out: torch.Tensor = model.generate(  # type: ignore[operator]
        **call, max_new_tokens=steps, do_sample=False, **extra
    )
    return out if arch == "t5" else out[:, kw["input_ids"].shape[1] :]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", GEN_ARCHS)
@pytest.mark.parametrize("mode", MODES)
def test_greedy_generate_equals_the_oracle(mode: str, arch: str, method: str) -> None:
    """Greedy ``generate`` (with cache) with an attached prompt on a bf16 or fp16
    model, or on the fp32 model under autocast, gives the oracle's tokens: token prompts,
    ``generate`` on hand-built ``inputs_embeds``; prefixes, a hand-filled cache and
    one forward call per token. The prompt stays fp32."""
    steps = 4
    model = low_model(arch, mode)
    kw = inputs(arch, [5, 3], seed=6)
    torch.manual_seed(3)
    with ph.attach(model, spec(method, 3)) as att:
        prompt = att.prompts["default"]
        assert isinstance(prompt, SoftPrompt)
        with torch.no_grad(), precision(mode):
            cached = generated(model, arch, kw, steps)
        assert all(p.dtype == torch.float32 for p in att.parameters())
    with torch.no_grad():
        _, expected = oracle(model, arch, prompt, kw, mode, steps)
    assert expected is not None
    assert torch.equal(cached, expected)


@pytest.mark.parametrize("method", ["prompt", "ptuning", "ptv2"])
@pytest.mark.parametrize("arch", GEN_ARCHS)
def test_bf16_greedy_generate_without_cache_equals_with_cache(arch: str, method: str) -> None:
    """On a bf16 model, ``generate(use_cache=False)`` (every step reruns the whole
    sequence: the prompt spliced again, the prefix concatenated in every layer)
    gives the tokens of ``generate`` with cache. (A projected prefix reaches the
    model as the same tables, so P-tuning v2 stands for both here: under Triton's
    interpreter each uncached step costs seconds.)"""
    steps = 2
    model = low_model(arch, "bf16")
    kw = inputs(arch, [3, 2], seed=6)
    torch.manual_seed(3)
    with ph.attach(model, spec(method, 2)), torch.no_grad():
        cached = generated(model, arch, kw, steps)
        uncached = generated(model, arch, kw, steps, use_cache=False)
    assert torch.equal(uncached, cached)


@pytest.mark.parametrize("method", ["prompt", "ptv2"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_static_cache_under_autocast_behaves_as_for_the_base_model(arch: str, method: str) -> None:
    """Under autocast the prefix is written into the cache in the dtype the model's
    own projections produce them (the autocast dtype), not fp32: GPT-2's static
    cache then works (it failed with ``index_copy_(): self and source expected to
    have the same dtype``) and the dynamic cache is no wider than the base model's
    (it was fp32, twice the base model's bf16). Up to transformers 5.23 LLaMA's
    static cache failed under autocast in transformers itself (RoPE made its keys
    fp32 while values stayed bf16, and the static cache takes one dtype); with a
    prompt it failed the same way. 5.25 serves it: so must the prompted model."""
    steps = 4
    model = tiny(arch)
    kw = inputs(arch, [6, 3], seed=8)
    call = {**kw, "max_new_tokens": steps, "do_sample": False}
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        base_error: str | None = None
        try:
            model.generate(**call, cache_implementation="static")
        except RuntimeError as error:
            base_error = str(error)
        base = model.generate(**call, return_dict_in_generate=True)
        torch.manual_seed(0)
        with ph.attach(model, spec(method, 3)):
            dynamic = model.generate(**call, return_dict_in_generate=True)
            if base_error is not None:
                with pytest.raises(RuntimeError, match="index_copy_.*same dtype"):
                    model.generate(**call, cache_implementation="static")
                assert "index_copy_" in base_error
            else:
                static = model.generate(**call, cache_implementation="static")
                assert torch.equal(static, dynamic.sequences)
    if arch == "gpt2":  # GPT-2's static cache works under autocast in every release
        assert base_error is None
    for ours, theirs in zip(
        dynamic.past_key_values.layers, base.past_key_values.layers, strict=True
    ):
        assert ours.keys.dtype.itemsize <= theirs.keys.dtype.itemsize
        assert ours.values.dtype.itemsize <= theirs.values.dtype.itemsize


# -- sums over rows are taken in fp32 ----------------------------------------------------


@pytest.mark.parametrize("mixed", [False, True])
def test_inputs_embeds_gradient_adds_up_in_fp32_like_input_ids(mixed: bool) -> None:
    """A bf16 model called with ``inputs_embeds`` instead of ``input_ids``: the
    prompt table is inserted by the stack hook instead of the embedding splice, and
    its gradient must add up over the rows in fp32 as the splice's does (it was
    summed in bf16, rounding after every row). Also for a mixed batch
    (``att.use([...])``: rows alternate between a Prompt Tuning and a P-tuning
    prompt of different lengths)."""
    model = low_model("gpt2", "bf16")
    kw = inputs("gpt2", [7, 5, 6, 4, 7, 3, 6, 5], seed=5)
    real = real_positions("gpt2", kw)
    torch.manual_seed(0)
    located = ph.locate(model)
    prompts = {"a": spec("prompt", 4).build(located), "b": spec("ptuning", 2).build(located)}
    if not mixed:
        del prompts["b"]
    results = []
    with ph.attach(model, prompts) as att, att.use(["a", "b"] if mixed else "a"):
        for by in ("ids", "embeds"):
            call = dict(kw)
            if by == "embeds":
                call["inputs_embeds"] = model.get_input_embeddings()(call.pop("input_ids"))
            logits = model(**call).logits
            objective(logits, real).backward()
            grads = {
                f"{name}.{param}": grad
                for name, prompt in prompts.items()
                for param, grad in gradients(prompt).items()
            }
            results.append((logits.detach(), grads))
    (ids_logits, ids_grads), (embeds_logits, embeds_grads) = results
    assert torch.equal(embeds_logits, ids_logits)
    assert len(ids_grads) == (6 if mixed else 1)  # the table (+ the encoder: embedding, 2 linears)
    assert_gradients_close(embeds_grads, ids_grads)


FP16_MAX = torch.finfo(torch.float16).max


@pytest.mark.parametrize(
    ("method", "path", "rows_n"),
    [("prompt", "ids", 8), ("prompt", "embeds", 8), ("ptv2", "cache", 64)],
)
def test_fp16_gradient_sums_over_rows_do_not_overflow(method: str, path: str, rows_n: int) -> None:
    """fp16 model, scaled loss (as ``GradScaler`` does): each row's gradient fits in
    fp16, their sum over identical rows does not (it exceeds 65504). The fp32
    parameters get the finite fp32 sum, equal to the oracle's: through the embedding
    splice (``input_ids``), through the stack hook (``inputs_embeds``; it summed in
    fp16: inf) and through the prefix written into the cache the model creates (it
    summed in fp16: inf). The prefix concat (no cache) is checked the same way in
    ``test_fp16_prefix_concat_gradient_sum_does_not_overflow``. (64 rows for the
    prefix: its gradient is ~18x smaller than the largest activation gradient, which
    must stay finite in fp16.)"""
    arch = "gpt2"
    model = low_model(arch, "fp16")
    one = inputs(arch, [6], seed=3)
    kw = {k: v.expand(rows_n, -1).clone() for k, v in one.items()}
    real = real_positions(arch, kw)
    torch.manual_seed(0)
    prompt = spec(method, 3).build(ph.locate(model))

    def loss_of(logits: torch.Tensor, scale: float) -> torch.Tensor:
        return logits[real].float().sum() * scale

    def run(scale: float) -> dict[str, torch.Tensor]:
        call = dict(kw)
        if path == "embeds":
            call["inputs_embeds"] = model.get_input_embeddings()(call.pop("input_ids"))
        with ph.attach(model, prompt):
            loss_of(model(**call, use_cache=path == "cache").logits, scale).backward()
        return gradients(prompt)

    # A power of two (exact in every dtype) that lifts the largest gradient entry, a
    # sum of equal row terms, past fp16's largest finite number by at most 2x.
    largest = max(float(g.abs().max()) for g in run(1.0).values())
    scale = 2.0 ** math.ceil(math.log2(FP16_MAX / largest))
    got = run(scale)
    assert all(bool(torch.isfinite(g).all()) for g in got.values())
    assert max(float(g.abs().max()) for g in got.values()) > FP16_MAX
    expected_logits, _ = oracle(model, arch, prompt, kw, "fp16")
    loss_of(expected_logits, scale).backward()
    assert_gradients_close(got, gradients(prompt))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp16_prefix_concat_gradient_sum_does_not_overflow(backend: str) -> None:
    """The prefix concat on both paths (the torch reference runs under autograd, the
    Triton kernel's backward is the custom op's): fp16 keys, a shared fp32 prefix;
    each row's gradient is 0.4x fp16's largest number, the sum over 8 rows 3.2x. The
    prefix gets the exact fp32 sum (it was inf: the sum was taken in fp16)."""
    from prompthooks.kernels import prefix_concat

    rows_n, heads, count, length, dim = 8, 2, 3, 4, 5
    prefix = torch.randn(heads, count, dim, requires_grad=True)
    states = torch.randn(rows_n, heads, length, dim).half().requires_grad_(True)
    out = prefix_concat(prefix, states, backend=backend)  # type: ignore[arg-type]
    assert out.dtype == torch.float16
    assert torch.equal(out[:, :, :count], prefix.detach().half().expand(rows_n, -1, -1, -1))
    g = torch.Generator().manual_seed(0)
    row = (torch.rand(heads, count + length, dim, generator=g) * 0.4 * FP16_MAX).half()
    out.backward(row.expand(rows_n, -1, -1, -1))
    assert prefix.grad is not None and prefix.grad.dtype == torch.float32
    expected = row[:, :count].float() * rows_n  # exact: a sum of 8 equal fp16 values
    assert torch.equal(prefix.grad, expected)
    assert float(prefix.grad.abs().max()) > FP16_MAX
    assert states.grad is not None and torch.equal(states.grad, row[:, count:].expand_as(states))
