"""Teaching prompthooks a new architecture: a locator for GPT-J, checked end to end.

prompthooks knows an architecture through a *locator*: a small class that says
which models it handles (``matches``) and where their token embedding, input
stack and attention modules are (``locate``). GPT-J has no built-in locator, so
``ph.locate`` refuses it; this script writes one (``GPTJLocator`` below), registers
it, and then checks, against references that do not use prompthooks at all:

1. Prompt Tuning on a left-padded batch gives the logits and loss of the same
   model fed ``inputs_embeds`` built by hand (prompt rows in front of each row's
   first real token, mask and positions extended by hand);
2. Prefix Tuning gives the logits of the same model given the prefix as a
   ``DynamicCache`` filled by hand, with ``shift_positions`` True and False;
3. AdamW over ``model.parameters()`` trains the prompt and nothing else;
4. greedy ``model.generate`` with each prompt attached equals a hand-written
   decoding loop over the references of 1. and 2.;
5. detaching restores weights, ``requires_grad`` flags, hooks, submodules and
   outputs bit for bit.

    python integrations/custom_locator.py          # a tiny random GPT-J, a few seconds

Every check is an ``assert``; ``tests/test_custom_locator.py`` runs ``main()``.
The guide in ``integrations/README.md`` ("Teaching prompthooks a new architecture")
quotes this file.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, GPTJConfig, GPTJForCausalLM
from transformers.models.gptj.modeling_gptj import GPTJModel, GPTJPreTrainedModel

import prompthooks as ph
from prompthooks.methods import Prefix

VOCAB, PAD = 61, 0
P = 4  # virtual tokens of every prompt here
NEW_TOKENS = 5


# -- the locator -------------------------------------------------------------------------


class GPTJLocator(ph.Locator):
    """GPT-J: ``GPTJModel`` and every head built on it (``model.transformer``).

    Found with ``print(model)`` and the attention module's ``forward`` signature:
    ``transformer.wte`` embeds the ids, ``transformer`` takes ``input_ids`` and
    ``attention_mask``, and each ``transformer.h[i].attn`` receives a cache
    (``layer_past`` up to transformers 5.23, ``cache`` from 5.24), calls its
    ``update(k, v, self.layer_idx)`` and adds the 4-D ``attention_mask`` to its
    scores. The argument names are left out of ``AttentionSite``: prompthooks
    reads them from the forward signature, so the locator works on both sides
    of that rename.
    """

    name = "gptj"

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, GPTJPreTrainedModel)

    def locate(self, model: nn.Module) -> ph.Located:
        stack: Any = model if isinstance(model, GPTJModel) else model.transformer
        sites = []
        for block in stack.h:
            attn = block.attn
            head_dim = int(attn.head_dim)
            # Key heads from the key projection's width: right under grouped-query
            # attention too, where it is narrower than the query projection.
            kv_heads = int(attn.k_proj.out_features) // head_dim
            sites.append(
                ph.AttentionSite(
                    module=attn,
                    role="self",
                    layer=int(attn.layer_idx),  # the cache slot it updates
                    num_kv_heads=kv_heads,
                    head_dim=head_dim,
                    causal=True,
                )
            )
        return ph.Located(
            locator=self.name,
            model=model,
            embedding=stack.wte,
            input_stack=stack,
            encoder_mask_readers=(),
            sites=tuple(sites),
            max_positions=int(stack.config.n_positions),  # its rotary table's length
            shifted_labels=hasattr(model, "lm_head"),  # a causal LM's loss shifts labels
        )


# -- a model and a batch -------------------------------------------------------------------


def tiny_gptj(seed: int = 0) -> GPTJForCausalLM:
    """A 2-layer GPT-J with seeded random weights (no download), in eval mode.

    Rotary embeddings on half of each 8-wide head, as GPT-J does on a part of
    its heads. Generation never stops early, so outputs compare position by position.
    """
    torch.manual_seed(seed)
    config = GPTJConfig(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        rotary_dim=4,
        n_inner=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=PAD,
    )
    model = GPTJForCausalLM(config).eval()
    model.generation_config.pad_token_id = PAD
    model.generation_config.eos_token_id = None
    return model


def left_padded(lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (never 0-2) left-padded to the longest row, and their mask."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), PAD)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[row, width - n :] = 1
    return ids, mask


# -- references that do not use prompthooks -----------------------------------------------


def first_real(mask_row: torch.Tensor) -> int:
    return mask_row.tolist().index(1)


def positions(mask: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """Position ids counted over each row's attended tokens (pads get 0), plus ``offset``."""
    rows = []
    for row in mask.tolist():
        count, out = 0, []
        for m in row:
            out.append(count + offset if m else 0)
            count += m
        rows.append(out)
    return torch.tensor(rows)


def prompt_reference(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, table: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The first call of a prompted row, by hand: the prompt rows go right before
    each row's first real token, the mask gets P ones there, positions count them."""
    embed = model.get_input_embeddings()
    rows, masks = [], []
    for b in range(ids.shape[0]):
        at = first_real(mask[b])
        e = embed(ids[b])
        rows.append(torch.cat([e[:at], table, e[at:]]))
        masks.append(torch.cat([mask[b, :at], torch.ones(P, dtype=mask.dtype), mask[b, at:]]))
    extended = torch.stack(masks)
    return {
        "inputs_embeds": torch.stack(rows),
        "attention_mask": extended,
        "position_ids": positions(extended),
    }


def reference_labels(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The user's labels with -100 at the P virtual positions. Each row's first
    real token loses its label too: no real token comes before it, so it is no
    target (as for the row alone, unpadded)."""
    labels = ids.masked_fill(mask == 0, -100)
    rows = []
    for b in range(ids.shape[0]):
        at, row = first_real(mask[b]), labels[b].clone()
        row[at] = -100
        rows.append(torch.cat([row[:at], torch.full((P,), -100), row[at:]]))
    return torch.stack(rows)


def prefix_reference(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, table: torch.Tensor, shift: bool
) -> dict[str, Any]:
    """The first call of a prefixed batch, by hand: the prefix as the model's own
    past (a ``DynamicCache`` filled layer by layer from the documented table layout
    ``(P, layers, 2, kv_heads, head_dim)``), P attended columns in front of the mask."""
    config = model.config
    heads, dim = config.n_head, config.n_embd // config.n_head
    view = table.view(P, config.n_layer, 2, heads, dim)
    cache = DynamicCache()
    for layer in range(config.n_layer):
        keys = view[:, layer, 0].permute(1, 0, 2)[None].expand(ids.shape[0], -1, -1, -1)
        values = view[:, layer, 1].permute(1, 0, 2)[None].expand(ids.shape[0], -1, -1, -1)
        cache.update(keys, values, layer)
    return {
        "input_ids": ids,
        "attention_mask": torch.cat([torch.ones(ids.shape[0], P, dtype=mask.dtype), mask], 1),
        "position_ids": positions(mask, P if shift else 0),
        "past_key_values": cache,
    }


@torch.no_grad()
def greedy_loop(model: nn.Module, first: dict[str, Any], steps: int) -> torch.Tensor:
    """Greedy decoding written out: the first call, then one token per call through
    the model's own cache, the mask growing by one and positions counting on."""
    out = model(**first, use_cache=True)
    mask, last = first["attention_mask"], first["position_ids"][:, -1:]
    tokens = []
    for _ in range(steps):
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
        mask = torch.cat([mask, torch.ones_like(token)], 1)
        last = last + 1
        out = model(
            input_ids=token,
            attention_mask=mask,
            position_ids=last,
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    return torch.cat(tokens, 1)


# -- checks ---------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """Everything a detach must restore, and the model's logits on one batch."""

    state: dict[str, torch.Tensor]
    flags: dict[str, bool]
    hooks: int
    modules: list[str]
    logits: torch.Tensor

    @classmethod
    def of(cls, model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> Snapshot:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
        return cls(
            state={k: v.clone() for k, v in model.state_dict().items()},
            flags={k: p.requires_grad for k, p in model.named_parameters()},
            hooks=sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()),
            modules=[n for n, _ in model.named_modules()],
            logits=logits,
        )

    def same_as(self, other: Snapshot) -> bool:
        return (
            self.state.keys() == other.state.keys()
            and all(torch.equal(v, other.state[k]) for k, v in self.state.items())
            and self.flags == other.flags
            and self.hooks == other.hooks
            and self.modules == other.modules
            and torch.equal(self.logits, other.logits)
        )


@dataclass
class Report:
    """What ``main`` measured; every field is also asserted in ``main``."""

    error: str  # UnsupportedModelError's message before the locator is registered
    summary: str  # str(ph.locate(model)) after
    prompt_logits_diff: float  # max |hooked - inputs_embeds reference| at real tokens
    prompt_loss_diff: float
    prompt_effect: float  # max |hooked - model without the prompt| at real tokens
    prefix_logits_diff: dict[bool, float] = field(default_factory=dict)  # by shift_positions
    prefix_effect: dict[bool, float] = field(default_factory=dict)
    losses: dict[str, tuple[float, float]] = field(default_factory=dict)  # first, last step
    prompt_moved: dict[str, bool] = field(default_factory=dict)
    base_untouched: dict[str, bool] = field(default_factory=dict)  # weights, no grads
    generated: dict[str, torch.Tensor] = field(default_factory=dict)  # generate's new tokens
    reference_generated: dict[str, torch.Tensor] = field(default_factory=dict)
    restored: bool = False


def check_sites(model: GPTJForCausalLM, located: ph.Located) -> None:
    """The locator found what ``print(model)`` shows: one self-attention per block."""
    config = model.config
    assert located.embedding is model.get_input_embeddings()
    assert located.input_stack is model.transformer
    assert [s.layer for s in located.sites] == list(range(config.n_layer))
    assert [s.module for s in located.sites] == [b.attn for b in model.transformer.h]
    for site in located.sites:
        assert (site.role, site.num_kv_heads, site.head_dim) == (
            "self",
            config.n_head,
            config.n_embd // config.n_head,
        )
        # read from the signature: the name this transformers release uses
        assert site.cache_arg in ("layer_past", "cache") and site.mask_arg == "attention_mask"


def check_prompt_tuning(
    model: GPTJForCausalLM, ids: torch.Tensor, mask: torch.Tensor
) -> tuple[float, float, float]:
    """Prompt Tuning equals the model fed the prompt in ``inputs_embeds`` by hand.

    Returns the largest logit and loss differences, and how much the prompt
    changes the logits (so an equality is not one of two unprompted models)."""
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        bare = model(input_ids=ids, attention_mask=mask).logits
    with ph.attach(model, ph.PromptTuning(P)) as att, torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        table = att.prompts["default"].table().detach().clone()
    with torch.no_grad():  # detached: the bare model
        ref = model(**prompt_reference(model, ids, mask, table), labels=reference_labels(ids, mask))
    keep = [[i for i in range(ref.logits.shape[1]) if i < a or i >= a + P] for a in _starts(mask)]
    ref_logits = torch.stack([ref.logits[b, k] for b, k in enumerate(keep)])
    real = mask.bool()
    logits_diff = float((out.logits[real] - ref_logits[real]).abs().max())
    loss_diff = float((out.loss - ref.loss).abs())
    effect = float((out.logits[real] - bare[real]).abs().max())
    assert out.logits.shape == ids.shape + (VOCAB,), "virtual positions are stripped"
    assert logits_diff < 1e-5 and loss_diff < 1e-5, (logits_diff, loss_diff)
    assert effect > 1e-3, effect  # the prompt does change the logits
    return logits_diff, loss_diff, effect


def _starts(mask: torch.Tensor) -> list[int]:
    return [first_real(row) for row in mask]


def check_prefix_tuning(
    model: GPTJForCausalLM, ids: torch.Tensor, mask: torch.Tensor, shift: bool
) -> tuple[float, float]:
    """Prefix Tuning equals the model given the prefix as a hand-filled cache.

    Three calls, three ways in: no cache (the stand-in cache each attention module
    gets), a cache the model makes inside its forward, and an empty cache passed in
    (the prefix written into it first, as in ``generate``). The last two put the
    prefix into cache slot ``AttentionSite.layer``, so they catch a wrong ``layer``.
    """
    with torch.no_grad():
        bare = model(input_ids=ids, attention_mask=mask).logits
    with ph.attach(model, ph.PrefixTuning(P, shift_positions=shift)) as att, torch.no_grad():
        outs = [
            model(input_ids=ids, attention_mask=mask, use_cache=False).logits,
            model(input_ids=ids, attention_mask=mask, use_cache=True).logits,
            model(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache()).logits,
        ]
        prefix = att.prompts["default"]
        assert isinstance(prefix, Prefix)
        table = prefix.flat().detach().clone()  # (P, sum of 2 * kv_heads * head_dim)
    with torch.no_grad():
        ref = model(**prefix_reference(model, ids, mask, table, shift))
    real = mask.bool()
    diff = max(float((out[real] - ref.logits[real]).abs().max()) for out in outs)
    effect = float((outs[0][real] - bare[real]).abs().max())
    assert diff < 1e-5, diff
    assert effect > 1e-3, effect
    return diff, effect


def train(
    model: GPTJForCausalLM, spec: Any, ids: torch.Tensor, mask: torch.Tensor, steps: int
) -> tuple[tuple[float, float], bool, bool]:
    """Ordinary training code over ``model.parameters()``: only the prompt may move."""
    base = {k: v.clone() for k, v in model.state_dict().items()}
    labels = ids.masked_fill(mask == 0, -100)
    with ph.attach(model, spec) as att:
        initial = [p.detach().clone() for p in att.parameters()]
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
        losses = []
        for _ in range(steps):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        moved = any(not torch.equal(a, b) for a, b in zip(initial, att.parameters(), strict=True))
        no_grads = all(
            p.grad is None for n, p in model.named_parameters() if not n.startswith("prompthooks.")
        )
    untouched = no_grads and all(torch.equal(base[k], v) for k, v in model.state_dict().items())
    assert losses[-1] < losses[0], losses
    assert moved and untouched
    return (losses[0], losses[-1]), moved, untouched


def check_generation(
    model: GPTJForCausalLM,
    spec: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    reference: Callable[[torch.Tensor], dict[str, Any]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ``generate`` with the prompt attached equals the hand-written loop."""
    with ph.attach(model, spec) as att, torch.no_grad():
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False
        )
        prompt = att.prompts["default"]
        table = (prompt.flat() if isinstance(prompt, Prefix) else prompt.table()).detach().clone()
    new = out[:, ids.shape[1] :]
    expected = greedy_loop(model, reference(table), NEW_TOKENS)
    assert torch.equal(new, expected), (new, expected)
    return new, expected


# -- the walk-through -----------------------------------------------------------------------


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="AdamW steps per method")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()

    model = tiny_gptj(args.seed)
    ids, mask = left_padded([7, 3, 5], seed=args.seed + 1)
    before = Snapshot.of(model, ids, mask)

    # 1. An architecture no locator knows is refused, with the way out in the message.
    try:
        ph.locate(model)
    except ph.UnsupportedModelError as error:
        message = str(error)
    else:
        raise AssertionError("GPT-J was located before its locator was registered")
    assert "ph.register_locator" in message and "Registered locators:" in message
    print("1. before registering a locator, ph.locate(model) raises UnsupportedModelError:")
    print("   " + "\n   ".join(message.splitlines()[:2]))

    ph.register_locator(GPTJLocator)  # the same as decorating the class with @ph.register_locator
    try:
        located = ph.locate(model)
        check_sites(model, located)
        summary = str(located)
        print("\n2. after ph.register_locator(GPTJLocator), print(ph.locate(model)):")
        print("   " + "\n   ".join(summary.splitlines()))

        report = Report(message, summary, *check_prompt_tuning(model, ids, mask))
        print(
            f"\n3. Prompt Tuning ({P} tokens), left-padded batch, vs inputs_embeds built by hand:"
            f"\n   max |logit diff| {report.prompt_logits_diff:.1e}, "
            f"|loss diff| {report.prompt_loss_diff:.1e} "
            f"(the prompt moves logits by up to {report.prompt_effect:.2f})"
        )
        print(f"4. Prefix Tuning ({P} tokens), left-padded batch, vs a hand-filled DynamicCache")
        print("   (worst of: no cache, use_cache=True, an empty cache passed in):")
        for shift in (True, False):
            diff, effect = check_prefix_tuning(model, ids, mask, shift)
            report.prefix_logits_diff[shift], report.prefix_effect[shift] = diff, effect
            print(
                f"   shift_positions={shift}: max |logit diff| {diff:.1e} "
                f"(the prefix moves logits by up to {effect:.2f})"
            )

        specs: dict[str, Callable[[], Any]] = {
            "prompt": lambda: ph.PromptTuning(P),
            "prefix": lambda: ph.PrefixTuning(P, hidden_size=64),
        }
        references: dict[str, Callable[[torch.Tensor], dict[str, Any]]] = {
            "prompt": lambda table: prompt_reference(model, ids, mask, table),
            "prefix": lambda table: prefix_reference(model, ids, mask, table, shift=True),
        }
        for name, spec in specs.items():
            losses, moved, untouched = train(model, spec(), ids, mask, args.steps)
            report.losses[name], report.prompt_moved[name] = losses, moved
            report.base_untouched[name] = untouched
            new, expected = check_generation(model, spec(), ids, mask, references[name])
            report.generated[name], report.reference_generated[name] = new, expected
        print(f"5. {args.steps} AdamW steps over model.parameters(), loss first -> last step:")
        for name, (first, last) in report.losses.items():
            print(
                f"   {name}: {first:.3f} -> {last:.3f}; prompt moved: {report.prompt_moved[name]}; "
                f"base weights bit-identical, no base gradients: {report.base_untouched[name]}"
            )
        print("6. greedy generate == the hand-written decoding loop over the reference:")
        for name, new in report.generated.items():
            same = torch.equal(new, report.reference_generated[name])
            print(f"   {name}: {new.tolist()} equal: {same}")
    finally:
        # Leave the global registry as it was, so main() shows the same in a second run.
        ph.unregister_locator(GPTJLocator.name)

    report.restored = Snapshot.of(model, ids, mask).same_as(before)
    assert report.restored
    print(
        "7. detached: weights, requires_grad flags, hooks, submodules and logits "
        f"bit-identical to before: {report.restored}"
    )
    print(f"({time.perf_counter() - start:.1f} s)")
    return report


if __name__ == "__main__":
    main()
