"""``benchmarks/quality.py --tiny``: the whole pipeline on random tiny models.

The numbers of a tiny random model mean nothing; what is checked is that every
cell runs for both libraries, the report and plots are written, a second run
resumes instead of recomputing, and the properties that hold whatever the
weights: prompthooks predictions never flip between batch size 1 and
left-padded batches, and where PEFT computes the same thing (P-tuning v2 from
the same initial values, positions passed explicitly) its training losses
equal ours step by step.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.workflow  # the result does not depend on the kernel path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"
TASKS = ("rotten_tomatoes", "bbc_news")
LM_TRAINED = (
    "prompt_tuning",
    "p_tuning_lstm",
    "p_tuning_mlp",
    "prefix_tuning",
    "p_tuning_v2",
    # Issue 19's initialisations that PEFT has too (its own init: the anchors).
    "p_tuning_v2_text",
    "p_tuning_v2_zero",
    "prefix_tuning_zero",
)
#: Issue 19's initialisations that PEFT lacks: prompthooks only.
LM_INITS = ("p_tuning_mlp_text", "prefix_tuning_text")
#: Issue 19: per task, the rate of each method with trainable layers or activation
#: tables is chosen by trials of its text init on held-out training rows.
LR_TRIALS = ("1e-02", "1e-03", "1e-04", "1e-05")
#: the trials' method -> the methods (every init) that train with the rate it chooses
LR_FOLLOWERS = {
    "prefix_tuning_text": ("prefix_tuning", "prefix_tuning_text", "prefix_tuning_zero"),
    "p_tuning_mlp_text": ("p_tuning_mlp", "p_tuning_mlp_text"),
    "p_tuning_v2_text": ("p_tuning_v2", "p_tuning_v2_text", "p_tuning_v2_zero"),
}


def run(out: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    out = tmp_path_factory.mktemp("quality")
    run(out)
    cells = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    return out, cells


def test_every_cell_runs_for_both_libraries(results: tuple[Path, dict[str, dict]]) -> None:
    _, cells = results
    expected = set()
    for task in TASKS:
        expected |= {f"{task}--lm--{m}--none" for m in ("zero_shot", "icl_4shot")}
        expected |= {
            f"{task}--lm--{m}--{lib}" for m in LM_TRAINED for lib in ("prompthooks", "peft")
        }
        expected |= {f"{task}--lm--{m}--prompthooks" for m in LM_INITS}
        expected.add(f"{task}--encoder--linear_probe--none")
        expected |= {f"{task}--encoder--p_tuning_v2--{lib}" for lib in ("prompthooks", "peft")}
    trial = "{}--lm--{}--prompthooks--lr{}"
    trials = {trial.format(t, m, lr) for t in TASKS for m in LR_FOLLOWERS for lr in LR_TRIALS}
    assert set(cells) == expected | trials
    for key, r in cells.items():
        if key in trials:
            continue
        assert r["n_test"] == len(r["predictions_batch1"]) == len(r["predictions_batched"]) > 0
        if "zero_shot" in key or "icl" in key:
            assert r["losses"] == [] and r["trainable_params"] == 0
        else:
            assert len(r["losses"]) == r["steps"] > 0 and r["trainable_params"] > 0
            assert r["step_seconds_median"] > 0


def test_learning_rates_are_chosen_on_held_out_training_rows_only(
    results: tuple[Path, dict[str, dict]],
) -> None:
    """Each trial trains once and scores training rows that no step read (never a test
    row); every init of the method (both libraries) trains with the rate of the best
    trial (ties: the lower held-out loss), and the text-init cell is that trial's run."""
    _, cells = results
    for task in TASKS:
        for chooser, followers in LR_FOLLOWERS.items():
            runs = [cells[f"{task}--lm--{chooser}--prompthooks--lr{lr}"] for lr in LR_TRIALS]
            for r, lr in zip(runs, LR_TRIALS, strict=True):
                assert r["lr"] == float(lr) and len(r["losses"]) > 0 and r["select_rows"] > 0
                assert "predictions_batched" not in r and "gold" not in r  # no test rows
            best = max(runs, key=lambda r: (r["select_accuracy"], -r["select_loss"]))
            for method in followers:
                for lib in ("prompthooks", "peft"):
                    cell = cells.get(f"{task}--lm--{method}--{lib}")
                    assert cell is not None or lib == "peft", method
                    assert cell is None or cell["lr"] == best["lr"], (task, method, lib)
            # the trial at the chosen rate and the text-init cell are the same training run
            assert cells[f"{task}--lm--{chooser}--prompthooks"]["losses"] == best["losses"]


def test_text_inits_are_as_long_as_their_text(results: tuple[Path, dict[str, dict]]) -> None:
    """A text init covers its whole text (cut to the other cells' 10 or 20 tokens, a
    task's instruction can end on one class's name); the other cells keep their size."""
    _, cells = results
    text_tokens = 11  # the tiny tasks' init text: 11 words of the word tokenizer
    for task in TASKS:
        for method in LR_FOLLOWERS:
            assert cells[f"{task}--lm--{method}--prompthooks"]["virtual_tokens"] == text_tokens
        # PEFT's own text init (no chat template in the tiny tokenizer: the plain text)
        assert cells[f"{task}--lm--p_tuning_v2_text--peft"]["virtual_tokens"] == text_tokens
        for method, size in (("p_tuning_mlp", 20), ("prefix_tuning", 10), ("p_tuning_v2", 10)):
            for lib in ("prompthooks", "peft"):
                assert cells[f"{task}--lm--{method}--{lib}"]["virtual_tokens"] == size


def test_prompthooks_predictions_never_flip_with_padding(
    results: tuple[Path, dict[str, dict]],
) -> None:
    _, cells = results
    ours = {k: r for k, r in cells.items() if k.endswith("--prompthooks")}
    assert all(r["flips"] == 0 for r in ours.values()), {k: r["flips"] for k, r in ours.items()}
    for r in ours.values():
        assert r["predictions_batch1"] == r["predictions_batched"]


def test_peft_starts_from_our_values_where_the_networks_agree(
    results: tuple[Path, dict[str, dict]],
) -> None:
    _, cells = results
    for task in TASKS:
        for method in ("prompt_tuning", "p_tuning_lstm", "p_tuning_v2"):
            assert cells[f"{task}--lm--{method}--peft"]["same_init"] is True
        for method in ("p_tuning_mlp", "prefix_tuning"):  # different networks in PEFT
            assert cells[f"{task}--lm--{method}--peft"]["same_init"] is False
        assert cells[f"{task}--encoder--p_tuning_v2--peft"]["same_init"] is True
        # PEFT's own inits: zeros are zeros; its text init, with no chat template to wrap
        # the text in (the tiny tokenizer has none), reads the same keys and values as ours.
        for method in ("p_tuning_v2_text", "p_tuning_v2_zero"):
            assert cells[f"{task}--lm--{method}--peft"]["same_init"] is True
        assert cells[f"{task}--lm--prefix_tuning_zero--peft"]["same_init"] is False


def test_p_tuning_v2_trains_exactly_like_peft(results: tuple[Path, dict[str, dict]]) -> None:
    """Same initial prefix, batches and positions: PEFT is the oracle for every step,
    from a random, a text and a zero start."""
    _, cells = results
    pairs = [(family, "p_tuning_v2") for family in ("lm", "encoder")]
    pairs += [("lm", "p_tuning_v2_text"), ("lm", "p_tuning_v2_zero")]
    for task in TASKS:
        for family, method in pairs:
            ours = cells[f"{task}--{family}--{method}--prompthooks"]["losses"]
            peft = cells[f"{task}--{family}--{method}--peft"]["losses"]
            assert len(ours) == len(peft)
            assert max(abs(a - b) for a, b in zip(ours, peft, strict=True)) < 1e-5


def test_trained_lm_cells_record_held_out_accuracy_against_step(
    results: tuple[Path, dict[str, dict]],
) -> None:
    """Issue 19's curves: held-out accuracy before the first step, every few steps and
    after the last; the same for PEFT where it starts from our values."""
    _, cells = results
    for key, r in cells.items():
        if "--lr" in key:  # a learning-rate trial: the same curve, held-out scores only
            assert r["curve"][0][0] == 0 and r["curve"][-1][0] == len(r["losses"])
            continue
        if "--lm--" not in key or r["steps"] == 0:
            assert r["curve"] == []
            continue
        steps = [s for s, _ in r["curve"]]
        assert steps[0] == 0 and steps[-1] == r["steps"] and steps == sorted(set(steps))
        assert all(0.0 <= a <= 1.0 for _, a in r["curve"]) and r["curve_rows"] > 0
    for task in TASKS:
        for method in ("p_tuning_v2", "p_tuning_v2_text"):
            ours = cells[f"{task}--lm--{method}--prompthooks"]["curve"]
            assert ours == cells[f"{task}--lm--{method}--peft"]["curve"]


def test_report_and_plots_are_written(results: tuple[Path, dict[str, dict]]) -> None:
    out, cells = results
    table = (out / "quality.md").read_text()
    assert "python benchmarks/quality.py --tiny" in table
    assert "not run" not in table
    for method in LM_TRAINED:
        assert f"| {method.replace('_', ' ')} | prompthooks |" in table
        assert f"| {method.replace('_', ' ')} | peft |" in table
    for method in LM_INITS:
        assert f"| {method.replace('_', ' ')} | prompthooks |" in table
        assert f"| {method.replace('_', ' ')} | peft |" not in table
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == set(cells)
    assert "Acceptance (issue 19)" in table
    for name in ("accuracy.png", "loss_curves.png", "init_curves.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_a_second_run_resumes_from_the_stored_cells(
    results: tuple[Path, dict[str, dict]],
) -> None:
    out, cells = results
    before = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    stdout = run(out)
    after = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert after == before  # nothing recomputed
    assert "flips," not in stdout  # no cell reported as run
    assert "total" in stdout
