"""A training job that can stop and resume, run as a separate process by
``test_checkpoints.py``: ``python resume_job.py PHASE DIR STEPS``.

PHASE is ``first`` (train STEPS steps, save the prompts with ``att.save`` and
the optimizer and scheduler with ``torch.save``, as a user would), ``second``
(a fresh process and model: ``ph.load``, restore the optimizer, train STEPS
more) or ``straight`` (train 2 * STEPS steps without stopping). Every method
of ``METHODS`` runs in each phase.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import prompthooks as ph
from tests.support.models import VOCAB, tiny

METHODS: dict[str, Callable[[], Any]] = {
    "prompt_tuning": lambda: ph.PromptTuning(4),
    "p_tuning_lstm": lambda: ph.PTuning(4, encoder="lstm", hidden_size=16),
    "prefix_mlp": lambda: ph.PrefixTuning(4, hidden_size=16),
}


def batch(step: int) -> torch.Tensor:
    """The batch of one step: the same in every process."""
    return torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(100 + step))


def train(method: str, steps: range, directory: Path, resume: bool, out: str) -> None:
    model = tiny("llama").train()
    torch.manual_seed(0)
    prompt = ph.load(directory / f"{method}.first.safetensors") if resume else METHODS[method]()
    with ph.attach(model, prompt) as att:
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (1 + step))
        if resume:
            state = torch.load(directory / f"{method}.pt", weights_only=True)
            optimizer.load_state_dict(state["optimizer"])
            schedule.load_state_dict(state["schedule"])
        for step in steps:
            ids = batch(step)
            optimizer.zero_grad()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            schedule.step()
        att.save(directory / f"{method}.{out}.safetensors")
        if out == "first":
            torch.save(
                {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()},
                directory / f"{method}.pt",
            )


def main(phase: str, directory: Path, steps: int) -> None:
    for method in METHODS:
        if phase == "first":
            train(method, range(0, steps), directory, resume=False, out=phase)
        elif phase == "second":
            train(method, range(steps, 2 * steps), directory, resume=True, out=phase)
        elif phase == "straight":
            train(method, range(0, 2 * steps), directory, resume=False, out=phase)
        else:
            raise SystemExit(f"unknown phase {phase!r}")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]))
