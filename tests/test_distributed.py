"""Distributed prompt training: ``integrations/distributed.py`` under torchrun, 2 CPU processes.

One launch (gloo backend) trains Prompt Tuning and Prefix Tuning on a tiny LLaMA, each
under DDP and under FSDP2 ``fully_shard``, every rank on its half of one global batch. Each
result is compared with an independent single-process run written here: the same model
and prompt initialisation, trained on the whole global batch by a plain loop. Each rank's
loss is a mean over the same number of label tokens (equal-length rows, no padding), so
the averaged gradient is exactly the whole batch's gradient and the prompts must agree to
fp32 rounding. Both use plain SGD: Adam would turn rounding noise in near-zero gradients
into full-size steps, and the comparison would say nothing.

Checked for each method and wrapper: the prompt equals 4 single-process steps (atol
1e-6, rtol 1e-5, while the prompt moves by far more); the mean of the ranks' losses
equals the single-process loss at every step (each rank saw its half); both ranks end
bit-identical; FSDP2 held half of each prompt parameter per rank; the saved file loads
and attaches.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import prompthooks as ph

# File and workflow tests: the same on every kernel path; they run in the torch pass
# and the Triton pass deselects them (-m "not workflow").
pytestmark = pytest.mark.workflow

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from integrations import distributed as script  # noqa: E402

WORLD = 2
WRAPPERS = ("ddp", "fsdp")
METHODS = ("prompt", "prefix")
STEPS = 4
LR = 10.0  # SGD; moves the prompt by ~1 and the prefix MLP by ~0.03-0.3 in 4 steps
ATOL, RTOL = 1e-6, 1e-5  # observed differences: under 1e-7
TIMEOUT = 300  # seconds; the launch takes about 20 s on 2 cores, nearly all of it imports


def torchrun(out: Path) -> Path:
    """Run the script on WORLD processes; fail with its output if it fails or hangs."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if env.get("PROMPTHOOKS_KERNELS") == "triton":
        env["TRITON_INTERPRET"] = "1"  # no GPU: the workers run Triton's interpreter too
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={WORLD}",
        str(ROOT / "integrations" / "distributed.py"),
        "--tiny",
        "--wrapper",
        *WRAPPERS,
        "--method",
        *METHODS,
        "--steps",
        str(STEPS),
        "--optimizer",
        "sgd",
        "--lr",
        str(LR),
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun passes SIGTERM on to its workers (their own sessions)
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {TIMEOUT} s:\n{stdout}\n{stderr[-6000:]}")
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{stdout}\n{stderr[-6000:]}"
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The launch's output folder, shared by every test here."""
    return torchrun(tmp_path_factory.mktemp("distributed"))


@dataclass
class Run:
    init: dict[str, torch.Tensor]
    final: dict[str, torch.Tensor]
    losses: list[float]


@functools.cache
def single_process(method: str, rows: tuple[int, int] | None = None) -> Run:
    """The oracle: one process, the whole global batch (or only ``rows`` of it)."""
    model = script.tiny_model()
    ids = script.tiny_batch()
    if rows is not None:
        ids = ids[rows[0] : rows[1]]
    torch.manual_seed(script.SEED)  # the script seeds the prompt's initialisation the same way
    att = ph.attach(model, script.make_spec(method, tiny=True))
    init = {k: v.detach().clone() for k, v in att.prompts.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    final = {k: v.detach().clone() for k, v in att.prompts.state_dict().items()}
    att.detach()
    return Run(init, final, losses)


def ranks(
    run: Path, wrapper: str, method: str
) -> list[tuple[dict[str, torch.Tensor], dict[str, Any]]]:
    """Each rank's prompt values and report."""
    folder = run / wrapper / method
    return [
        (
            load_file(str(folder / f"rank{r}.safetensors")),
            json.loads((folder / f"rank{r}.json").read_text()),
        )
        for r in range(WORLD)
    ]


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


RUNS = pytest.mark.parametrize("wrapper", WRAPPERS)
METHOD = pytest.mark.parametrize("method", METHODS)


@RUNS
@METHOD
def test_two_ranks_equal_one_process(run: Path, wrapper: str, method: str) -> None:
    """Rank 0's prompt after STEPS steps is the one-process prompt, which moved far more
    than the tolerance; a run that did not average gradients would not match."""
    (values, _), _ = ranks(run, wrapper, method)
    oracle = single_process(method)
    assert values.keys() == oracle.final.keys()
    for key, value in values.items():
        moved = float((oracle.final[key] - oracle.init[key]).abs().max())
        assert moved > 1e3 * ATOL, f"{key} barely trained ({moved:.2e}): the test would be empty"
        torch.testing.assert_close(value, oracle.final[key], atol=ATOL, rtol=RTOL, msg=key)
    # Training on one half alone gives another prompt: the ranks' gradients were averaged.
    alone = single_process(method, rows=(0, script.GLOBAL_BATCH // WORLD))
    assert max_diff(alone.final, oracle.final) > 1e3 * ATOL


@RUNS
@METHOD
def test_each_rank_trains_on_its_half(run: Path, wrapper: str, method: str) -> None:
    """The ranks saw different rows (their losses differ) that together make the batch:
    the mean of their losses is the one-process loss at every step."""
    reports = [report for _, report in ranks(run, wrapper, method)]
    oracle = single_process(method)
    kernels = os.environ.get("PROMPTHOOKS_KERNELS", "auto")  # the workers ran the same path
    assert [(r["wrapper"], r["method"], r["kernels"]) for r in reports] == [
        (wrapper, method, kernels)
    ] * WORLD
    assert [r["rows"] for r in reports] == [script.GLOBAL_BATCH // WORLD] * WORLD
    assert [r["world_size"] for r in reports] == [WORLD] * WORLD
    first, second = (torch.tensor(r["losses"]) for r in reports)
    assert (first - second).abs().min() > 1e-4  # different rows, different losses
    # Equal token counts: the mean of the ranks' losses is the whole batch's loss, step by step.
    torch.testing.assert_close((first + second) / 2, torch.tensor(oracle.losses), rtol=1e-5, atol=0)


@RUNS
@METHOD
def test_all_ranks_agree(run: Path, wrapper: str, method: str) -> None:
    """Every rank ends with bit-identical prompt values (under FSDP2: the gathered shards)."""
    (first, _), (second, _) = ranks(run, wrapper, method)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key


@RUNS
@METHOD
def test_saved_prompt_loads_back(run: Path, wrapper: str, method: str) -> None:
    """Rank 0's ``att.save`` (FSDP2: with the gathered values swapped in) holds the trained
    values, and ``ph.load`` gives a prompt that attaches to a fresh model."""
    (values, _), _ = ranks(run, wrapper, method)
    loaded = ph.load(run / wrapper / method / "prompt.safetensors")
    assert list(loaded) == ["default"]
    state = {f"default.{k}": v for k, v in loaded["default"].state_dict().items()}
    assert state.keys() == values.keys()
    for key in values:
        assert torch.equal(state[key], values[key]), key
    # and it attaches to a fresh model: the trained prompt, not the initial one
    model = script.tiny_model().eval()
    ids = script.tiny_batch()
    with ph.attach(model, loaded), torch.no_grad():
        trained = model(input_ids=ids, labels=ids).loss
    torch.manual_seed(script.SEED)
    with ph.attach(model, script.make_spec(method, tiny=True)), torch.no_grad():
        initial = model(input_ids=ids, labels=ids).loss
    assert abs(float(trained) - float(initial)) > 1e-3


def test_fsdp_shards_the_prompt(run: Path) -> None:
    """FSDP2 really ran sharded on CPU: each rank held half of every prompt parameter
    (dim 0), not a replicated copy."""
    for method in METHODS:
        full = single_process(method).final
        for _, report in ranks(run, "fsdp", method):
            for key, shape in report["local_shapes"].items():
                assert shape[0] == full[key].shape[0] // WORLD, (method, key, shape)
                assert shape[1:] == list(full[key].shape[1:]), (method, key, shape)


def test_ddp_replicates_the_prompt(run: Path) -> None:
    """Under DDP every rank holds the whole prompt (the counterpart of the test above)."""
    for method in METHODS:
        full = single_process(method).final
        for _, report in ranks(run, "ddp", method):
            assert report["local_shapes"] == {k: list(v.shape) for k, v in full.items()}
