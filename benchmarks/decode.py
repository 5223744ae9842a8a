"""Per-token decode cost of a prefix: prompthooks against the base model and PEFT.

What is measured: greedy ``generate`` of exactly ``NEW_TOKENS`` new tokens
(``min_new_tokens = max_new_tokens``, no EOS) after a ``PROMPT``-token input,
at batch 1 and 8, on random-weight GPT-2 and LLaMA-shaped models (the configs
of ``overhead.py``), fp32 on CPU, eval mode, sdpa, for these contestants:

* ``base``: the model without any prefix.
* ``base+P``: the same model fed P more prompt tokens. Its cache is as long as
  the prefix contestants' caches, with no machinery at all: the decode cost
  that is inherent to P extra cached keys.
* ``prompthooks``: the same model with ``ph.PrefixTuning(P, projection=False)``
  attached, and the user's unchanged ``model.generate(...)``. The prefix is
  written into the empty cache before the first forward; each decode step
  then only gets P ones in front of its 2-D mask and shifted positions.
* ``peft``: ``get_peft_model(copy, PrefixTuningConfig(...))`` on a deep copy of
  the same weights, with the same prefix table as prompthooks.

How per-token time is taken: a ``LogitsProcessor`` records
``time.perf_counter()`` each time ``generate`` asks it for scores, which
happens once per new token, right after the forward that produced them. The
first stamp comes after the prefill (the forward over the prompt, and for the
prefix contestants writing the prefix into the cache); each later interval is
exactly one decode step: ``generate``'s bookkeeping, input preparation, the
hooks, one forward of one token per row over the cache, and logit processing.
So ``(last stamp - first stamp) / (NEW_TOKENS - 1)`` is the mean cost of a
decode step with the prefill excluded, from a single run: no difference of two
noisy runs. Each run also yields a "fast step": the 10th percentile of its
``NEW_TOKENS - 1`` step times. Noise on a shared machine only ever adds time,
in bursts, so the fast step estimates the intrinsic cost of a step far more
stably than the mean (in the spirit of ``timeit``'s minimum); it is reported
beside the mean, not instead of it.

Runs are interleaved (one run of each contestant per round, in rotating order)
so that drift in machine speed hits all contestants alike; medians and IQRs
over rounds are reported, and paired ratios (median over rounds of this run /
base run of the same round) with a distribution-free 95% confidence interval
of that median: on a shared 2-core machine single runs vary by 10-20%, so
differences of a few percent need many rounds to resolve.

Sanity checks: prompthooks and PEFT, given the same prefix values, must
generate identical tokens; every contestant generates the same tokens in every
round (so detaching prompthooks restores the base model); every run generates
exactly ``NEW_TOKENS`` tokens after its unchanged prompt.

    python benchmarks/decode.py [--repeats N] [--quick] [--json PATH]
                                [--models gpt2 llama] [--batches 1 8]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import peft
import torch
import transformers as tf
from overhead import (  # same directory: the configs of the training benchmark
    build_model,
    kv_shape,
    report_load,
    versions,
)
from peft import PrefixTuningConfig, get_peft_model
from torch import nn

import prompthooks as ph

P = 20
PROMPT = 32
NEW_TOKENS = 128
PAD = 0
CONTESTANTS = ("base", "base+P", "prompthooks", "peft")
# About 12 s per round (both models, both batches) on a 2-core CPU: 15 rounds take ~3 minutes.
REPEATS = 15
FAST_QUANTILE = 0.1  # the "fast step" of a run

Inputs = dict[str, torch.Tensor]
Interval = tuple[float, float]


@dataclass
class Result:
    model: str
    batch: int
    contestant: str
    median_ms: float  # mean decode step of a run, median over rounds
    q1_ms: float
    q3_ms: float
    x_base: float  # ratio of medians
    x_base_paired: float  # median over rounds of (this run / base run, same round)
    x_base_paired_ci: Interval | None  # 95% distribution-free CI of that median
    fast_ms: float  # fast step of a run, median over rounds
    x_base_fast_paired: float  # paired ratio of fast steps
    x_base_fast_paired_ci: Interval | None
    prefill_ms: float  # median time from the generate call to the first token's scores
    per_token_ms: list[float]  # per round
    fast_step_ms: list[float]  # per round

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms


def median_ci(values: list[float], level: float = 0.95) -> Interval | None:
    """Distribution-free confidence interval of a median, from order statistics:
    ``[x_(j), x_(n+1-j)]`` with the largest ``j`` for which a Binomial(n, 1/2)
    falls below ``j`` with probability at most ``(1 - level) / 2``. Runs on this
    kind of machine are far from normal, hence no t-interval. ``None`` when
    there are too few values for the level (n < 6 at 95%)."""
    n = len(values)
    tail, cdf, j = (1 - level) / 2, 0.0, 0
    while j < n:
        cdf += math.comb(n, j) / 2**n
        if cdf > tail:
            break
        j += 1
    if j == 0:
        return None
    ordered = sorted(values)
    return ordered[j - 1], ordered[n - j]


def paired(ours: list[float], theirs: list[float]) -> list[float]:
    """Per-round ratios: both runs of a round saw about the same machine speed."""
    return [a / b for a, b in zip(ours, theirs, strict=True)]


def fmt_ratio(median: float, ci: Interval | None) -> str:
    """A median of paired ratios with its 95% CI, if there are enough rounds for one."""
    return f"{median:.3f}" + ("" if ci is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]")


def fmt_paired(ours: list[float], theirs: list[float]) -> str:
    ratios = paired(ours, theirs)
    return fmt_ratio(statistics.median(ratios), median_ci(ratios))


class StepClock(tf.LogitsProcessor):
    """Notes the time whenever ``generate`` asks for the next token's scores: once
    per new token, right after the forward that produced them. Leaves scores as
    they are, and costs every contestant the same ``perf_counter`` call."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.stamps.append(time.perf_counter())
        return scores


@dataclass
class Run:
    seconds_per_token: float  # mean decode step
    fast_step_seconds: float  # FAST_QUANTILE of the decode steps
    prefill_seconds: float
    tokens: torch.Tensor


class DecodeBench:
    """One model's contestants, sharing one prefix table."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.model = build_model(name).eval()
        # No EOS: every run generates exactly NEW_TOKENS tokens.
        self.model.generation_config.eos_token_id = None
        # Copy before anything is attached: PEFT wraps (and may edit) what it is given.
        peft_base = copy.deepcopy(self.model)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.peft_model = get_peft_model(
                peft_base, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
            )
        self.peft_model.eval()
        # The prefix values, N(0, 1) as both libraries initialise them, shared by both.
        layers, heads, dim = kv_shape(self.model)
        g = torch.Generator().manual_seed(2)
        self.table = torch.randn(P, layers * 2 * heads * dim, generator=g)
        with torch.no_grad():
            self.peft_model.prompt_encoder["default"].embedding.weight.copy_(self.table)
        self.att: ph.Attachment | None = None
        self.vocab = self.model.get_input_embeddings().weight.shape[0]

    def inputs(self, batch: int) -> dict[str, Inputs]:
        """Per contestant: a fixed random prompt of ``PROMPT`` tokens per row, no
        padding; ``base+P`` gets P more random tokens in front of the same prompt."""
        g = torch.Generator().manual_seed(1000 + batch)
        ids = torch.randint(1, self.vocab, (batch, PROMPT), generator=g)
        longer = torch.cat([torch.randint(1, self.vocab, (batch, P), generator=g), ids], dim=1)
        return {
            c: {"input_ids": x, "attention_mask": torch.ones_like(x)}
            for c, x in zip(CONTESTANTS, (ids, longer, ids, ids), strict=True)
        }

    # -- prompthooks on and off (untimed) ----------------------------------------

    def attach(self) -> None:
        self.att = ph.attach(self.model, ph.PrefixTuning(P, projection=False))
        with torch.no_grad():
            self.att.prompts["default"].weight.copy_(self.table)

    def detach(self) -> None:
        assert self.att is not None
        self.att.detach()
        self.att = None

    def run(self, contestant: str, inputs: Inputs) -> Run:
        """One greedy generate of exactly ``NEW_TOKENS`` tokens by ``contestant``."""
        model: nn.Module = self.peft_model if contestant == "peft" else self.model
        hooked = contestant == "prompthooks"
        if hooked:
            self.attach()
        clock = StepClock()
        try:
            start = time.perf_counter()
            tokens = model.generate(
                **inputs,
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=PAD,
                logits_processor=[clock],
            )
        finally:
            if hooked:
                self.detach()
        stamps, prompt = clock.stamps, inputs["input_ids"].shape[1]
        if len(stamps) != NEW_TOKENS or tokens.shape[1] != prompt + NEW_TOKENS:
            raise RuntimeError(
                f"{contestant} generated {tokens.shape[1] - prompt} tokens "
                f"({len(stamps)} steps), expected {NEW_TOKENS}"
            )
        per_token = (stamps[-1] - stamps[0]) / (NEW_TOKENS - 1)
        steps = [b - a for a, b in zip(stamps[:-1], stamps[1:], strict=True)]
        fast = statistics.quantiles(steps, n=round(1 / FAST_QUANTILE))[0]
        return Run(per_token, fast, stamps[0] - start, tokens)


def summarize(name: str, batch: int, runs: dict[str, list[Run]]) -> list[Result]:
    base = [r.seconds_per_token for r in runs["base"]]
    base_fast = [r.fast_step_seconds for r in runs["base"]]
    out = []
    for c in CONTESTANTS:
        secs = [r.seconds_per_token for r in runs[c]]
        fast = [r.fast_step_seconds for r in runs[c]]
        ratios, fast_ratios = paired(secs, base), paired(fast, base_fast)
        ms = [s * 1e3 for s in secs]
        q1, _, q3 = statistics.quantiles(ms, n=4) if len(ms) > 1 else (ms[0], 0.0, ms[0])
        out.append(
            Result(
                model=name,
                batch=batch,
                contestant=c,
                median_ms=statistics.median(ms),
                q1_ms=q1,
                q3_ms=q3,
                x_base=statistics.median(secs) / statistics.median(base),
                x_base_paired=statistics.median(ratios),
                x_base_paired_ci=median_ci(ratios),
                fast_ms=statistics.median(fast) * 1e3,
                x_base_fast_paired=statistics.median(fast_ratios),
                x_base_fast_paired_ci=median_ci(fast_ratios),
                prefill_ms=statistics.median(r.prefill_seconds * 1e3 for r in runs[c]),
                per_token_ms=ms,
                fast_step_ms=[f * 1e3 for f in fast],
            )
        )
    return out


def check(inputs: dict[str, Inputs], runs: dict[str, list[Run]]) -> dict[str, bool]:
    """Token-level sanity of one (model, batch) setting; see the module docstring."""
    first = {c: runs[c][0].tokens for c in CONTESTANTS}
    return {
        "prompthooks_equals_peft": torch.equal(first["prompthooks"], first["peft"]),
        "prefix_changes_output": not torch.equal(first["prompthooks"], first["base"]),
        "same_tokens_every_round": all(
            torch.equal(r.tokens, first[c]) for c in CONTESTANTS for r in runs[c]
        ),
        "prompt_kept": all(
            torch.equal(first[c][:, : inputs[c]["input_ids"].shape[1]], inputs[c]["input_ids"])
            for c in CONTESTANTS
        ),
    }


def bench_setting(
    bench: DecodeBench, batch: int, repeats: int, warmup: int
) -> tuple[list[Result], dict[str, bool]]:
    inputs = bench.inputs(batch)
    for _ in range(warmup):
        for c in CONTESTANTS:
            bench.run(c, inputs[c])
    runs: dict[str, list[Run]] = {c: [] for c in CONTESTANTS}
    for r in range(repeats):
        k = r % len(CONTESTANTS)
        for c in CONTESTANTS[k:] + CONTESTANTS[:k]:
            runs[c].append(bench.run(c, inputs[c]))
    return summarize(bench.name, batch, runs), check(inputs, runs)


def comparison(by: dict[str, Result], ours: str, theirs: str) -> str:
    """``ours / theirs``: ratio of medians, paired ratio [95% CI], fast-step paired."""
    a, b = by[ours], by[theirs]
    ratio = statistics.median(a.per_token_ms) / statistics.median(b.per_token_ms)
    return (
        f"{ours} / {theirs} = {ratio:.3f} (paired {fmt_paired(a.per_token_ms, b.per_token_ms)}; "
        f"fast step paired {fmt_paired(a.fast_step_ms, b.fast_step_ms)})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=int, default=REPEATS, help=f"timed rounds (default {REPEATS})"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 rounds, 1 warm-up")
    parser.add_argument("--json", type=Path, default=None, help="also write results here")
    parser.add_argument("--models", nargs="+", default=["gpt2", "llama"], choices=["gpt2", "llama"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    args = parser.parse_args(argv)
    repeats, warmup = (2, 1) if args.quick else (args.repeats, 1)
    if repeats < 1:
        parser.error("--repeats must be >= 1")

    header = (
        f"torch {torch.__version__}, transformers {tf.__version__}, peft {peft.__version__}, "
        f"prompthooks {getattr(ph, '__version__', 'dev')}; "
        f"threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()}); "
        f"fp32 CPU, eval mode, sdpa, DynamicCache; prompt {PROMPT} tokens, {NEW_TOKENS} new "
        f"tokens (greedy, no EOS), P {P} (projection=False); "
        f"per token = (last - first logits-processor stamp) / {NEW_TOKENS - 1}, "
        f"fast step = its {FAST_QUANTILE:.0%} quantile; "
        f"{warmup} warm-up, {repeats} interleaved rounds"
    )
    tf.logging.set_verbosity_error()
    print(header, flush=True)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    results: list[Result] = []
    checks: dict[str, dict[str, bool]] = {}
    for name in args.models:
        bench = DecodeBench(name)
        for batch in args.batches:
            t0 = time.perf_counter()
            res, ok = bench_setting(bench, batch, repeats, warmup)
            results += res
            checks[f"{name}/b{batch}"] = ok
            flags = ", ".join(f"{k} {v}" for k, v in ok.items())
            print(f"[{name} b{batch}] {flags}; {time.perf_counter() - t0:.1f} s", flush=True)
    total = time.perf_counter() - started

    print()
    print(
        "| model | batch | contestant | ms/token | IQR ms | x base | x base paired [95% CI] "
        "| fast step ms | x base fast step paired [95% CI] | to 1st token ms |"
    )
    print("|---|---:|---|---:|---:|---:|---|---:|---|---:|")
    for r in results:
        print(
            f"| {r.model} | {r.batch} | {r.contestant} | {r.median_ms:.2f} | {r.iqr_ms:.2f} "
            f"| {r.x_base:.3f} | {fmt_ratio(r.x_base_paired, r.x_base_paired_ci)} "
            f"| {r.fast_ms:.2f} | {fmt_ratio(r.x_base_fast_paired, r.x_base_fast_paired_ci)} "
            f"| {r.prefill_ms:.1f} |"
        )
    print()
    for name in args.models:
        for batch in args.batches:
            by = {r.contestant: r for r in results if r.model == name and r.batch == batch}
            same = checks[f"{name}/b{batch}"]["prompthooks_equals_peft"]
            print(f"{name} b{batch}: tokens prompthooks == peft: {same}")
            print(f"  {comparison(by, 'prompthooks', 'peft')}")
            print(f"  {comparison(by, 'prompthooks', 'base+P')}")
    load_after = report_load(total, load_before)

    if args.json is not None:
        payload = {
            "header": header,
            "versions": versions(),
            "threads": torch.get_num_threads(),
            "shapes": {
                "prompt": PROMPT,
                "new_tokens": NEW_TOKENS,
                "num_virtual_tokens": P,
                "batches": args.batches,
            },
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
