"""Training-step overhead of prompthooks against a hand-written floor and PEFT.

What is measured: the wall time of one training step (zero the prompt's grad,
forward with labels, ``loss.backward()``; no optimizer step, for any contestant)
with P virtual tokens, on random-weight GPT-2 and LLaMA-shaped models, fp32 on
CPU, for three contestants per method.

Prompt tuning (``prompt``):

* ``floor``: the base model fed ``L + P`` positions by hand
  (``inputs_embeds = cat(prompt, embed(ids))``, a mask of ones, ``-100`` labels
  on the prompt). This is the unavoidable cost of running ``L + P`` tokens.
* ``prompthooks``: ``ph.attach(model, ph.PromptTuning(P))`` and the user's own,
  unchanged call ``model(input_ids=..., attention_mask=..., labels=...)``.
* ``peft``: ``get_peft_model(copy, PromptTuningConfig(...))`` on a deep copy of
  the same weights, called with the same batch.

Prefix tuning (``prefix``; ``prefix-proj`` with the MLP reparameterisation):

* ``floor``: the base model fed by hand what a prefix amounts to: a
  ``DynamicCache`` holding every layer's prefix keys and values, built each
  step from a ``requires_grad`` table (so ``backward`` reaches it), a mask
  with P leading ones and positions ``P..P+L-1``. This is the unavoidable cost
  of attending to P extra keys in every layer.
* ``prompthooks``: ``ph.attach(model, ph.PrefixTuning(P, projection=...))``
  and the user's unchanged call. The call brings no cache, so its attention
  pre-hooks splice the prefix into each layer's keys and values ("proxy
  mode"), or write it into the cache the model creates inside its forward.
* ``peft``: ``get_peft_model(copy, PrefixTuningConfig(...))``, which passes the
  prefix as ``past_key_values``.

Time above the floor is what the library costs. Steps are interleaved (one
step of each contestant per round, in rotating order) so that drift in machine
speed hits all contestants alike; medians and IQRs are reported, and the
paired ratio (median over rounds of step / floor step of the same round),
which is the more robust of the two on a machine whose speed drifts. All
contestants of a method start from the same prompt values (copied between
them), so their losses must agree: that is the sanity check. (Prompt tuning:
prompthooks' loss differs from the floor's by about 4e-4, as it should: it does
not score a row's first real token, which has no real token before it, while
the floor and PEFT score it from the last prompt slot; README, Labels.) The floor and
prompthooks share one model object, so prompthooks is attached right before
each of its timed steps and detached right after, outside the timer.

    python benchmarks/overhead.py [--repeats N] [--quick] [--json PATH]
                                  [--models gpt2 llama] [--methods prompt prefix prefix-proj]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import peft
import torch
import transformers as tf
from peft import PeftConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from torch import nn

import prompthooks as ph

BATCH = 8
LENGTH = 128
P = 20
PROJECTION_HIDDEN = 512  # MLP width of prefix-proj, for both libraries
WARMUP = 3
# Rounds: the default run (prompt + prefix on both models) then takes about 2.5 minutes
# on a 2-core CPU; 20 rounds took 3.3.
REPEATS = 15
CONTESTANTS = ("floor", "prompthooks", "peft")
METHODS = ("prompt", "prefix", "prefix-proj")

Step = Callable[[], torch.Tensor]


@dataclass
class Result:
    method: str
    model: str
    contestant: str
    median_ms: float
    q1_ms: float
    q3_ms: float
    x_floor: float  # ratio of medians
    x_floor_paired: float  # median over rounds of (this step / floor step, same round)
    times_ms: list[float]

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms


def versions() -> dict[str, str]:
    """The library versions a result was measured with."""
    return {"torch": torch.__version__, "transformers": tf.__version__, "peft": peft.__version__}


def report_load(total: float, load_before: float) -> float:
    """Print the run time and the machine's load before and after; return the latter."""
    load_after = os.getloadavg()[0]
    print(
        f"total {total:.1f} s; 1-min load average {load_before:.2f} before, {load_after:.2f} after"
    )
    if max(load_before, load_after) > torch.get_num_threads() + 0.5:
        print("warning: the machine looks busy; timings may be noisy")
    return load_after


def build_model(name: str) -> nn.Module:
    """A random-weight model in train mode with no dropout and sdpa attention."""
    torch.manual_seed(0)
    config: Any
    if name == "gpt2":
        config = tf.GPT2Config(
            n_layer=4,
            n_embd=256,
            n_head=4,
            vocab_size=50257,
            n_positions=1024,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        cls: Any = tf.GPT2LMHeadModel
    elif name == "llama":
        config = tf.LlamaConfig(
            num_hidden_layers=4,
            hidden_size=256,
            num_attention_heads=8,
            num_key_value_heads=2,
            intermediate_size=688,
            vocab_size=32000,
            attention_dropout=0.0,
        )
        cls = tf.LlamaForCausalLM
    else:
        raise ValueError(name)
    config._attn_implementation = "sdpa"
    model: nn.Module = cls(config)
    model.train()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(model: nn.Module, before: dict[str, torch.Tensor], cls: type) -> bool:
    """Same class, same module tree, same values, no PEFT attributes, base frozen."""
    now = model.state_dict()
    return (
        type(model) is cls
        and now.keys() == before.keys()
        and all(torch.equal(now[k], before[k]) for k in before)
        and not hasattr(model, "peft_config")
        and not any("prompt_encoder" in n or "lora" in n for n, _ in model.named_modules())
        and not any(p.requires_grad for p in model.parameters())
    )


def kv_shape(model: nn.Module) -> tuple[int, int, int]:
    """(layers, KV heads, head size) of a GPT-2 or LLaMA config."""
    c = model.config  # type: ignore[union-attr]
    layers = c.num_hidden_layers
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    return layers, kv_heads, c.hidden_size // c.num_attention_heads


def prefix_cache(table: torch.Tensor, model: nn.Module, batch: int) -> tf.DynamicCache:
    """A fresh cache holding a ``(P, layers * 2 * H_kv * D)`` prefix table, as a
    user would build it by hand. The table's layout is PEFT's and prompthooks':
    per virtual token, layer by layer, keys then values, ``(H_kv, D)`` each. The
    cache is rebuilt from the table every step, so gradients reach the table
    (and the model's own update appends this step's keys to a fresh cache)."""
    layers, heads, dim = kv_shape(model)
    count = table.shape[0]
    kv = table.view(count, layers, 2, heads, dim).permute(1, 2, 3, 0, 4)  # (L, 2, H, P, D)
    cache = tf.DynamicCache()
    for layer in range(layers):
        keys = kv[layer, 0].unsqueeze(0).expand(batch, -1, -1, -1)
        values = kv[layer, 1].unsqueeze(0).expand(batch, -1, -1, -1)
        cache.update(keys, values, layer)
    return cache


class PrefixMLP(nn.Module):
    """The floor's hand-written prefix reparameterisation (embedding -> Linear ->
    Tanh -> Linear), shaped like prompthooks' so its values can be copied over."""

    def __init__(self, count: int, embed_dim: int, hidden: int, width: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(count, embed_dim)
        self.transform = nn.Sequential(
            nn.Linear(embed_dim, hidden), nn.Tanh(), nn.Linear(hidden, width)
        )

    def forward(self) -> torch.Tensor:
        out: torch.Tensor = self.transform(self.embedding.weight)
        return out


def wrap_peft(model: nn.Module, config: PeftConfig) -> nn.Module:
    """PEFT's model in train mode (PEFT warns about things irrelevant here)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrapped = get_peft_model(model, config)
    wrapped.train()
    return wrapped


class Bench:
    """The three contestants for one model and one method, on one batch.

    Subclasses supply the floor's step, the prompthooks spec and the PEFT
    config; prompthooks' and PEFT's steps are the user's own call for every
    method, so they live here.
    """

    method = ""

    def __init__(self, name: str) -> None:
        self.name = name
        self.model = build_model(name)
        # Copy before anything is attached: PEFT wraps (and may edit) what it is given.
        self.peft_base = copy.deepcopy(self.model)
        self.cls = type(self.model)
        self.before = model_state(self.model)
        self.hidden = self.model.get_input_embeddings().weight.shape[1]
        vocab = self.model.get_input_embeddings().weight.shape[0]
        self.generator = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, vocab, (BATCH, LENGTH), generator=self.generator)
        self.mask = torch.ones_like(self.ids)
        self.att: ph.Attachment | None = None

    # -- what differs between methods --------------------------------------------

    def floor_step(self) -> torch.Tensor:
        raise NotImplementedError

    def spec(self) -> Any:
        """The prompthooks method object to attach."""
        raise NotImplementedError

    def load_values(self, prompt: ph.SoftPrompt) -> None:
        """Copy the floor's prompt values into a freshly attached prompt."""
        raise NotImplementedError

    def shares_values_with_peft(self) -> bool:
        """Whether PEFT got the floor's values (so its loss must equal the floor's)."""
        return True

    # -- one training step each --------------------------------------------------

    def prompthooks_step(self) -> torch.Tensor:
        assert self.att is not None
        for p in self.att.parameters():
            p.grad = None
        loss = self.model(input_ids=self.ids, attention_mask=self.mask, labels=self.ids).loss
        loss.backward()
        return loss.detach()

    def peft_step(self) -> torch.Tensor:
        for p in self.peft_params:
            p.grad = None
        loss = self.peft_model(input_ids=self.ids, attention_mask=self.mask, labels=self.ids).loss
        loss.backward()
        return loss.detach()

    def set_peft(self, config: PeftConfig) -> None:
        """Wrap the untouched copy of the base model with ``config``."""
        self.peft_model = wrap_peft(self.peft_base, config)
        self.peft_params = [p for p in self.peft_model.parameters() if p.requires_grad]

    # -- prompthooks on and off (untimed) ----------------------------------------

    def attach(self) -> None:
        self.att = ph.attach(self.model, self.spec())
        with torch.no_grad():
            self.load_values(self.att.prompts["default"])

    def detach(self) -> None:
        assert self.att is not None
        self.att.detach()
        self.att = None

    def run(self, contestant: str) -> tuple[float, torch.Tensor]:
        """Time one step of ``contestant``; seconds and the loss."""
        step: Step = getattr(self, f"{contestant}_step")
        hooked = contestant == "prompthooks"
        if hooked:
            self.attach()
        try:
            start = time.perf_counter()
            loss = step()
            elapsed = time.perf_counter() - start
        finally:
            if hooked:
                self.detach()
        return elapsed, loss


class PromptBench(Bench):
    """Prompt tuning: P soft tokens in front of the input embeddings."""

    method = "prompt"

    def __init__(self, name: str) -> None:
        super().__init__(name)
        init = torch.randn(P, self.hidden, generator=self.generator) * 0.02
        self.table = init.clone().requires_grad_(True)
        self.floor_mask = torch.ones(BATCH, LENGTH + P, dtype=torch.long)
        self.floor_labels = torch.cat(
            [torch.full((BATCH, P), -100, dtype=torch.long), self.ids], dim=1
        )
        self.set_peft(PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
        with torch.no_grad():
            self.peft_model.prompt_encoder["default"].embedding.weight.copy_(init)

    def floor_step(self) -> torch.Tensor:
        self.table.grad = None
        embeds = self.model.get_input_embeddings()(self.ids)
        prompt = self.table.unsqueeze(0).expand(BATCH, P, embeds.shape[-1])
        loss = self.model(
            inputs_embeds=torch.cat([prompt, embeds], dim=1),
            attention_mask=self.floor_mask,
            labels=self.floor_labels,
        ).loss
        loss.backward()
        return loss.detach()

    def spec(self) -> Any:
        return ph.PromptTuning(P)

    def load_values(self, prompt: ph.SoftPrompt) -> None:
        prompt.weight.copy_(self.table)


class PrefixBench(Bench):
    """Prefix tuning: P keys and values in front of every attention layer's, from
    a trained table or (``projection``) from an MLP over a small embedding."""

    def __init__(self, name: str, projection: bool = False) -> None:
        super().__init__(name)
        self.projection = projection
        self.method = "prefix-proj" if projection else "prefix"
        layers, heads, dim = kv_shape(self.model)
        width = layers * 2 * heads * dim
        self.mlp: PrefixMLP | None = None
        if projection:
            self.mlp = PrefixMLP(P, self.hidden, PROJECTION_HIDDEN, width)
            self.table = None
        else:  # N(0, 1), as both libraries initialise a prefix table
            self.table = torch.randn(P, width, generator=self.generator).requires_grad_(True)
        self.floor_mask = torch.ones(BATCH, P + LENGTH, dtype=torch.long)
        self.floor_positions = (torch.arange(LENGTH) + P).unsqueeze(0).expand(BATCH, -1)
        self.set_peft(
            PrefixTuningConfig(
                task_type="CAUSAL_LM",
                num_virtual_tokens=P,
                prefix_projection=projection,
                encoder_hidden_size=PROJECTION_HIDDEN if projection else None,
            )
        )
        self.peft_shared = self.copy_to_peft()

    def copy_to_peft(self) -> bool:
        """Give PEFT the floor's values where its parameters have the same shapes.
        PEFT's MLP embeds P tokens in ``H_kv * D`` dimensions, prompthooks' in the
        model's hidden size: for GQA models (LLaMA here) they cannot share values,
        which does not matter for timing."""
        encoder = self.peft_model.prompt_encoder["default"]
        with torch.no_grad():
            if self.mlp is None:
                assert self.table is not None
                encoder.embedding.weight.copy_(self.table)
                return True
            ours, theirs = self.mlp.state_dict(), encoder.state_dict()
            if any(theirs[k].shape != v.shape for k, v in ours.items()):
                return False
            encoder.load_state_dict(ours)
            return True

    def shares_values_with_peft(self) -> bool:
        return self.peft_shared

    def prefix_table(self) -> torch.Tensor:
        if self.mlp is not None:
            return self.mlp()
        assert self.table is not None
        return self.table

    def floor_step(self) -> torch.Tensor:
        if self.mlp is not None:
            self.mlp.zero_grad(set_to_none=True)
        else:
            assert self.table is not None
            self.table.grad = None
        loss = self.model(
            input_ids=self.ids,
            attention_mask=self.floor_mask,
            position_ids=self.floor_positions,
            past_key_values=prefix_cache(self.prefix_table(), self.model, BATCH),
            labels=self.ids,
        ).loss
        loss.backward()
        return loss.detach()

    def spec(self) -> Any:
        return ph.PrefixTuning(P, projection=self.projection, hidden_size=PROJECTION_HIDDEN)

    def load_values(self, prompt: ph.SoftPrompt) -> None:
        if self.mlp is not None:
            prompt.projection.load_state_dict(self.mlp.state_dict())
        else:
            prompt.weight.copy_(self.table)


def make_bench(method: str, name: str) -> Bench:
    if method == "prompt":
        return PromptBench(name)
    if method in ("prefix", "prefix-proj"):
        return PrefixBench(name, projection=method == "prefix-proj")
    raise ValueError(method)


def summarize(method: str, name: str, times: dict[str, list[float]]) -> list[Result]:
    floor = times["floor"]
    out = []
    for c in CONTESTANTS:
        ms = [t * 1e3 for t in times[c]]
        q1, _, q3 = statistics.quantiles(ms, n=4) if len(ms) > 1 else (ms[0], 0.0, ms[0])
        paired = statistics.median(t / f for t, f in zip(times[c], floor, strict=True))
        out.append(
            Result(
                method=method,
                model=name,
                contestant=c,
                median_ms=statistics.median(ms),
                q1_ms=q1,
                q3_ms=q3,
                x_floor=statistics.median(times[c]) / statistics.median(floor),
                x_floor_paired=paired,
                times_ms=ms,
            )
        )
    return out


def bench_model(
    method: str, name: str, repeats: int, warmup: int
) -> tuple[list[Result], dict[str, Any]]:
    bench = make_bench(method, name)
    # Warm-up. No optimizer step, so every step of every contestant sees the same
    # prompt values: the last warm-up losses double as the sanity check.
    losses = {c: [bench.run(c)[1] for _ in range(warmup)][-1] for c in CONTESTANTS}
    diffs: dict[str, float | None] = {
        c: float((losses[c] - losses["floor"]).abs()) for c in CONTESTANTS[1:]
    }
    if not bench.shares_values_with_peft():
        diffs["peft"] = None  # different prompt values: nothing to compare
    times: dict[str, list[float]] = {c: [] for c in CONTESTANTS}
    for r in range(repeats):
        k = r % len(CONTESTANTS)
        for c in CONTESTANTS[k:] + CONTESTANTS[:k]:
            times[c].append(bench.run(c)[0])
    intact = unchanged(bench.model, bench.before, bench.cls)
    check = {"loss_max_abs_diff_vs_floor": diffs, "model_untouched_by_peft": intact}
    return summarize(method, name, times), check


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=int, default=REPEATS, help=f"timed rounds (default {REPEATS})"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, 1 warm-up")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument("--models", nargs="+", default=["gpt2", "llama"], choices=["gpt2", "llama"])
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["prompt", "prefix"],
        choices=METHODS,
        help="prompt tuning, prefix tuning, prefix tuning with its MLP (default: prompt prefix)",
    )
    args = parser.parse_args(argv)
    repeats, warmup = (3, 1) if args.quick else (args.repeats, WARMUP)
    if repeats < 1:
        parser.error("--repeats must be >= 1")

    header = (
        f"torch {torch.__version__}, transformers {tf.__version__}, peft {peft.__version__}, "
        f"prompthooks {getattr(ph, '__version__', 'dev')}; "
        f"threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}); "
        f"fp32 CPU, train mode, dropout 0, sdpa; batch {BATCH}, length {LENGTH}, P {P}; "
        f"methods {' '.join(args.methods)}; "
        f"step = zero prompt grad + forward + backward (no optimizer); "
        f"{warmup} warm-up, {repeats} interleaved rounds"
    )
    tf.logging.set_verbosity_error()
    print(header, flush=True)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    results: list[Result] = []
    checks: dict[str, Any] = {}
    for method in args.methods:
        for name in args.models:
            t0 = time.perf_counter()
            res, check = bench_model(method, name, repeats, warmup)
            results += res
            checks[f"{method}/{name}"] = check
            diffs = ", ".join(
                f"{c} {'n/a (values not shared)' if d is None else f'{d:.2e}'}"
                for c, d in check["loss_max_abs_diff_vs_floor"].items()
            )
            print(
                f"[{method} / {name}] loss |diff| vs floor with equal prompts: {diffs}; "
                f"prompthooks model untouched by PEFT: {check['model_untouched_by_peft']}; "
                f"{time.perf_counter() - t0:.1f} s",
                flush=True,
            )
    total = time.perf_counter() - started

    print()
    print("| method | model | contestant | median ms/step | IQR ms | x floor | x floor (paired) |")
    print("|---|---|---|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r.method} | {r.model} | {r.contestant} | {r.median_ms:.1f} | {r.iqr_ms:.1f} "
            f"| {r.x_floor:.3f} | {r.x_floor_paired:.3f} |"
        )
    print()
    for method in args.methods:
        for name in args.models:
            by = {r.contestant: r for r in results if r.model == name and r.method == method}
            ours, theirs = by["prompthooks"].times_ms, by["peft"].times_ms
            ratio = statistics.median(ours) / statistics.median(theirs)
            paired = statistics.median(a / b for a, b in zip(ours, theirs, strict=True))
            print(f"{method} / {name}: prompthooks / peft = {ratio:.3f} (paired {paired:.3f})")
    load_after = report_load(total, load_before)

    if args.json is not None:
        payload = {
            "header": header,
            "versions": versions(),
            "threads": torch.get_num_threads(),
            "shapes": {"batch": BATCH, "length": LENGTH, "num_virtual_tokens": P},
            "methods": args.methods,
            "repeats": repeats,
            "warmup": warmup,
            "checks": checks,
            "results": [asdict(r) | {"iqr_ms": r.iqr_ms} for r in results],
            "total_s": total,
            "load_average": [load_before, load_after],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
