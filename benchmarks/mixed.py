"""Serving many prompts at once: one mixed batch (prompthooks) against one batch
per prompt (PEFT, which activates one prompt-learning adapter at a time).

What is measured: the wall time to serve ``ROWS`` rows that use ``PROMPTS``
different prompts (``ROWS / PROMPTS`` rows each, interleaved), on a
random-weight GPT-2 (the ``overhead.py`` config), fp32 on CPU, eval mode,
no gradient, in two workloads:

* ``score``: one forward pass over ``LENGTH`` tokens per row, keeping the
  last position's logits (``logits_to_keep=1``), as a verbalizer classifier
  or a reranker does;
* ``generate``: greedy generation of ``NEW_TOKENS`` tokens per row.

Contestants:

* ``prompthooks``: all prompts attached at once, ``with att.use(names):``
  with one name per row, a single call for all rows;
* ``peft``: a ``PeftModel`` holding every prompt as an adapter;
  ``set_adapter(name)`` then one call per prompt with that prompt's rows.

Both get the same prompt values and unpadded rows of equal length (so PEFT's
outputs are right too); the script checks that the two give the same logits
and the same generated tokens. Rounds are interleaved in rotating order;
medians and paired ratios over rounds are reported as rows per second.

A second table (``--attached``) asks what a serving process holding many
prompts pays per call: on a random-weight LLaMA-shaped model (4 layers, 256
wide), 1, 64, 512 and 4096 prompts of each method are attached, and one
forward call of ``MANY_ROWS`` rows that use 1 of them, or ``USED`` of them
(from ``USED`` attached up), is timed against the base model on the same
tokens, rounds interleaved. A call computes only the prompts it uses, so the ratio should not
move with the number attached. Memory per attached prompt is its parameters'
bytes. Encoders are kept small (``ENCODER_WIDTH``) so that 4096 of them fit.

    python benchmarks/mixed.py [--repeats N] [--quick] [--attached 1,64,512,4096]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from peft import PromptTuningConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import build_model  # noqa: E402

import prompthooks as ph  # noqa: E402

PROMPTS = 8
ROWS = 32
LENGTH = 64
NEW_TOKENS = 16
P = 20


def setup() -> tuple[torch.nn.Module, Any, Any, list[str], torch.Tensor, dict[str, torch.Tensor]]:
    model = build_model("gpt2").eval()
    model.generation_config.eos_token_id = None
    located = ph.locate(model)
    torch.manual_seed(1)
    names = [f"task{i}" for i in range(PROMPTS)]
    tables = {name: ph.PromptTuning(P).build(located).weight.detach() for name in names}
    peft_model = get_peft_model(
        copy.deepcopy(model),
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P),
        adapter_name=names[0],
    )
    for name in names[1:]:
        peft_model.add_adapter(
            name, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
        )
    with torch.no_grad():
        for name in names:
            peft_model.prompt_encoder[name].embedding.weight.copy_(tables[name])
    peft_model.eval()
    att = ph.attach(model, {n: ph.methods.PromptTable(t) for n, t in tables.items()})
    rows = [names[i % PROMPTS] for i in range(ROWS)]
    ids = torch.randint(
        0, model.config.vocab_size, (ROWS, LENGTH), generator=torch.Generator().manual_seed(2)
    )
    return model, att, peft_model, rows, ids, tables


MANY_ROWS, MANY_LENGTH, USED, MANY_P, ENCODER_WIDTH = 16, 32, 8, 10, 64

METHODS: dict[str, Callable[[], Any]] = {
    "Prompt Tuning": lambda: ph.PromptTuning(MANY_P),
    "P-tuning (LSTM)": lambda: ph.PTuning(MANY_P, encoder="lstm", hidden_size=ENCODER_WIDTH),
    "P-tuning (MLP)": lambda: ph.PTuning(MANY_P, encoder="mlp", hidden_size=ENCODER_WIDTH),
    "Prefix (MLP)": lambda: ph.PrefixTuning(MANY_P, hidden_size=ENCODER_WIDTH),
    "P-tuning v2": lambda: ph.PrefixTuning(MANY_P, projection=False),
}


def _cost_ratio(
    model: torch.nn.Module,
    bare: torch.nn.Module,
    att: ph.Attachment,
    rows: list[str],
    batch: dict[str, torch.Tensor],
    repeats: int,
) -> float:
    """Median over interleaved rounds of (prompted call time / base model call time)."""

    def prompted() -> None:
        with att.use(rows), torch.no_grad():
            model(**batch, logits_to_keep=1)

    def base() -> None:
        with torch.no_grad():
            bare(**batch, logits_to_keep=1)

    ratios = []
    for round_ in range(repeats + 1):  # the first round warms up
        cost = {}
        for name, function in (("p", prompted), ("b", base))[:: 1 if round_ % 2 else -1]:
            start = time.perf_counter()
            function()
            cost[name] = time.perf_counter() - start
        if round_:
            ratios.append(cost["p"] / cost["b"])
    return statistics.median(ratios)


def many_attached(counts: list[int], repeats: int) -> None:
    """Cost per call and memory per prompt with ``counts`` prompts attached."""
    model = build_model("llama").eval()
    bare = copy.deepcopy(model)
    ids = torch.randint(
        0, model.config.vocab_size, (MANY_ROWS, MANY_LENGTH), generator=torch.Generator()
    )
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    print(
        f"\nmany prompts attached: LLaMA 4x256 random weights, fp32, eval, no grad; one "
        f"forward of {MANY_ROWS} rows x {MANY_LENGTH} tokens using 1 or {USED} prompts "
        f"of {MANY_P} tokens; encoders {ENCODER_WIDTH} wide; "
        f"{repeats} rounds"
    )
    print("| method | used | attached | call / base | vs fewest attached | bytes per prompt |")
    print("|---|---:|---:|---:|---:|---:|")
    for method, spec in METHODS.items():
        for used_count in (1, USED):
            first: float | None = None
            for count in sorted({max(count, used_count) for count in counts}):
                torch.manual_seed(0)
                att = ph.attach(model, {f"p{i}": spec() for i in range(count)})
                used = [f"p{i * count // used_count}" for i in range(used_count)]
                rows = [used[i % used_count] for i in range(MANY_ROWS)]
                per_prompt = sum(p.numel() * p.element_size() for p in att.parameters()) / count
                ratio = _cost_ratio(model, bare, att, rows, batch, repeats)
                att.detach()
                first = ratio if first is None else first
                print(
                    f"| {method} | {used_count} | {count} | {ratio:.3f}x | {ratio / first:.3f} | "
                    f"{per_prompt:,.0f} |"
                )


def typed_in_front(
    model: torch.nn.Module,
    att: ph.Attachment,
    tables: dict[str, torch.Tensor],
    rows: list[str],
    ids: torch.Tensor,
) -> torch.Tensor:
    """Greedy tokens of the bare model given each row's prompt table in front of
    its token embeddings, step by step without a cache: the oracle."""
    bare = copy.deepcopy(model)
    ph.attachment(bare).detach()
    embed = bare.get_input_embeddings()
    out = []
    with torch.no_grad():
        for row, name in enumerate(rows):
            seq = ids[row : row + 1]
            for _ in range(NEW_TOKENS):
                embeds = torch.cat([tables[name][None], embed(seq)], dim=1)
                step = bare(inputs_embeds=embeds).logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, step], dim=1)
            out.append(seq[0])
    return torch.stack(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="3 rounds, for a smoke run")
    parser.add_argument(
        "--attached",
        default="1,64,512,4096",
        help="numbers of prompts attached for the second table ('' to skip it)",
    )
    args = parser.parse_args(argv)
    repeats = 3 if args.quick else args.repeats
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    model, att, peft_model, rows, ids, tables = setup()
    mask = torch.ones_like(ids)
    groups = {name: [i for i, r in enumerate(rows) if r == name] for name in dict.fromkeys(rows)}

    def ours(generate: bool) -> torch.Tensor:
        with att.use(rows), torch.no_grad():
            if generate:
                return model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS,
                    do_sample=False,
                    pad_token_id=0,
                )
            return model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits

    def theirs(generate: bool) -> torch.Tensor:
        out: list[torch.Tensor] = [torch.empty(0)] * ROWS
        with torch.no_grad():
            for name, members in groups.items():
                peft_model.set_adapter(name)
                sub = ids[members]
                if generate:
                    result = peft_model.generate(
                        input_ids=sub,
                        attention_mask=torch.ones_like(sub),
                        max_new_tokens=NEW_TOKENS,
                        min_new_tokens=NEW_TOKENS,
                        do_sample=False,
                        pad_token_id=0,
                    )
                else:
                    result = peft_model(
                        input_ids=sub, attention_mask=torch.ones_like(sub), logits_to_keep=1
                    ).logits
                for row, value in zip(members, result, strict=True):
                    out[row] = value
        return torch.stack(out)

    print(
        f"torch {torch.__version__}; 2 threads; GPT-2 4x256 random weights, fp32, eval; "
        f"{ROWS} rows x {LENGTH} tokens, {PROMPTS} prompts of {P} tokens; {repeats} rounds"
    )
    for workload, generate in (("score", False), ("generate", True)):
        a, b = ours(generate), theirs(generate)
        same = torch.equal(a, b) if generate else bool((a - b).abs().max() < 1e-4)
        if generate and not same:  # who is right: the prompt typed in front, by hand
            expected = typed_in_front(model, att, tables, rows[:4], ids[:4])
            print(
                f"\ngenerate: rows 0-3 equal the oracle (prompt table in front of the "
                f"embeddings, greedy, no cache): prompthooks {torch.equal(a[:4], expected)}, "
                f"PEFT {torch.equal(b[:4], expected)}"
            )
        contestants: dict[str, Callable[[], torch.Tensor]] = {
            "prompthooks": lambda g=generate: ours(g),
            "peft": lambda g=generate: theirs(g),
        }
        times: dict[str, list[float]] = {name: [] for name in contestants}
        for round_ in range(repeats):
            order = list(contestants)[round_ % 2 :] + list(contestants)[: round_ % 2]
            for name in order:
                start = time.perf_counter()
                contestants[name]()
                times[name].append(time.perf_counter() - start)
        paired = [p / o for o, p in zip(times["prompthooks"], times["peft"], strict=True)]
        print(f"\n{workload}: prompthooks and PEFT agree: {same}")
        print("| contestant | calls | median s | rows/s |")
        print("|---|---:|---:|---:|")
        for name, calls in (("prompthooks", 1), ("peft", PROMPTS)):
            median = statistics.median(times[name])
            print(f"| {name} | {calls} | {median:.3f} | {ROWS / median:.1f} |")
        speedup = statistics.median(times["peft"]) / statistics.median(times["prompthooks"])
        print(
            f"throughput prompthooks / PEFT: {speedup:.2f}x "
            f"(paired median {statistics.median(paired):.2f}x)"
        )
    att.detach()
    if args.attached:
        many_attached([int(n) for n in args.attached.split(",")], max(repeats, 10))
    return 0


if __name__ == "__main__":
    sys.exit(main())
