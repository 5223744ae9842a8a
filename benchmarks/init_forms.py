"""Which form of a task's instruction to start a text init from (issue 19).

A text-initialised prefix starts exactly as the text typed in front of every
row (decoder-only models), so its step-0 accuracy is the accuracy of the frozen
model with that text in front. This prints it for each form of the instruction,
on the training rows that no step of ``quality.py``'s batch plan reads (never
the test set), for SmolLM2-135M-Instruct:

* ``none``: the question alone (what zero-shot reads);
* ``raw``: the instruction typed in front of the question;
* ``raw + newline``: the same on a line of its own;
* ``chat``: the instruction as the model's chat template presents one (a system
  message), the form PEFT's ``initialize_kv_prefix_from_text`` prefills and
  ``quality_cells.instruction`` gives the text-init cells.

    python benchmarks/init_forms.py
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402
import quality_cells as qc  # noqa: E402


def step0_accuracy(model: torch.nn.Module, tokenizer: object, task: qc.Task, front: str) -> float:
    """Accuracy on the held-out training rows with ``front`` typed before each question."""
    settings = quality.SETTINGS["full"]
    plan = qc.batches(task.train, settings.lm_batch, settings.lm_steps, settings.seed)
    rows = qc.held_out_rows(len(task.train), plan, qc.SELECT_ROWS)
    words = qc.label_token_ids(tokenizer, task)
    right = 0
    with torch.no_grad():
        for i in range(0, len(rows), settings.eval_batch):
            part = rows[i : i + settings.eval_batch]
            texts = [front + task.question(task.train[j][0]) for j in part]
            batch = qc.encode(tokenizer, texts, special_tokens=True)
            pred = qc.last_logits(model, batch)[:, words].argmax(-1).tolist()
            right += sum(p == task.train[j][1] for p, j in zip(pred, part, strict=True))
    return right / len(rows)


def main() -> None:
    model, tokenizer = qc.load_lm(False)
    model.eval()
    print(f"step-0 accuracy on {qc.SELECT_ROWS} held-out training rows, SmolLM2-135M-Instruct\n")
    print("| task | none | raw | raw + newline | chat (system message) |")
    print("|---|---|---|---|---|")
    for name, task in quality.make_tasks("full", "lm").items():
        forms = ["", task.init_text, task.init_text + "\n", qc.instruction(task, tokenizer)]
        scores = [step0_accuracy(model, tokenizer, task, f) for f in forms]
        print(f"| {name} | " + " | ".join(f"{100 * s:.1f}" for s in scores) + " |")


if __name__ == "__main__":
    main()
