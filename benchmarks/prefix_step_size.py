"""How far the first training steps move a text-initialised prefix (issue 19).

Why Prefix Tuning with its MLP ends at chance in ``quality.py`` from every init:
this replays the first steps of that benchmark's recipe (same task, batches,
AdamW, warm-up, clipping, learning rate) for P-tuning v2 (the key/value table
is trained) and Prefix Tuning (the table is an MLP's output), both started from
the same text-initialised table, and prints the table's change after each step.

    python benchmarks/prefix_step_size.py [rotten_tomatoes|bbc_news] [--steps 5]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import quality  # noqa: E402
import quality_cells as qc  # noqa: E402

import prompthooks as ph  # noqa: E402


def replay(task_name: str, steps: int) -> None:
    """Print loss, gradient norm and the table's relative change per step, per method."""
    settings = quality.SETTINGS["full"]
    task = quality.make_tasks("full", "lm")[task_name]
    model, tokenizer = qc.load_lm(False)
    model.requires_grad_(False)
    words = qc.label_token_ids(tokenizer, task)
    hidden = int(model.get_input_embeddings().weight.shape[1])
    questions = [task.question(t) for t, _ in task.train]
    targets = torch.tensor([words[y] for _, y in task.train])
    plan = qc.batches(task.train, settings.lm_batch, settings.lm_steps, settings.seed)
    warm = max(1, int(settings.warmup * len(plan)))

    def factor(step: int) -> float:  # as quality_cells.train
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (len(plan) - step) / max(1, len(plan) - warm))

    for method in ("p_tuning_v2_text", "prefix_tuning_text"):
        torch.manual_seed(1234 + settings.seed)
        spec = qc.our_spec(method, task, tokenizer, hidden)
        with ph.attach(model, spec) as att:
            prefix = att.prompts["default"]
            params = list(att.parameters())
            optimizer = torch.optim.AdamW(params, lr=qc.LM_METHODS[method][1], weight_decay=0.0)
            schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
            start = prefix.flat().detach().clone()
            count = sum(p.numel() for p in params)
            rms = float(start.pow(2).mean().sqrt())
            print(
                f"{method}: lr {qc.LM_METHODS[method][1]}, {count:,} numbers, table rms {rms:.3f}"
            )
            for step, rows in enumerate(plan[:steps], start=1):
                batch = qc.encode(tokenizer, [questions[i] for i in rows], special_tokens=True)
                loss = nn.functional.cross_entropy(qc.last_logits(model, batch), targets[rows])
                optimizer.zero_grad()
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                optimizer.step()
                schedule.step()
                moved = float((prefix.flat().detach() - start).norm() / start.norm())
                print(
                    f"  step {step}: loss {loss.item():.2f}, gradient norm {norm.item():.1f}, "
                    f"table change {moved:.1%} of its norm"
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", nargs="?", default="rotten_tomatoes", choices=quality.TASKS)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    replay(args.task, args.steps)


if __name__ == "__main__":
    main()
