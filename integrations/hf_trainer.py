"""Hugging Face ``Trainer`` trains a soft prompt: attach first, then the usual Trainer code.

The Trainer set-up in :func:`build_trainer` is what a user already has
(``TrainingArguments`` + ``Trainer(model=..., args=..., train_dataset=...,
data_collator=...)``); nothing in it knows about prompthooks. It trains only the
prompt because ``ph.attach`` registers the prompt as ``model.prompthooks`` and
freezes every base parameter, and the Trainer builds its optimizer from the
parameters that require gradients.

Checkpoints need nothing extra: ``save_pretrained`` writes the whole
``model.state_dict()``, so ``model.safetensors`` of each checkpoint holds the
prompt as ``prompthooks.<name>.<param>`` next to the (unchanged) base weights,
and ``optimizer.pt`` holds the prompt's optimizer state. On
``train(resume_from_checkpoint=...)`` the Trainer loads ``model.safetensors``
with ``load_state_dict(strict=False)`` into the model it was given; with the
prompt attached (same spec), the keys match and the prompt, optimizer,
scheduler, RNG state and data order all continue from the checkpoint.

Known library issue (an xfail test in ``tests/test_integrations.py``): for a
causal LM the Trainer divides the summed loss by ``num_items_in_batch``, which it
counts over the user's ``labels[..., 1:]``, but with the prompt in front each
row's first label is a target too. The logged loss (and the gradient) of rows
that start at column 0 is therefore too large by a factor of about
``L / (L - 1)`` for L labels per row: 11% on the tiny 10-word rows, ~2% on SmolLM2.

The script trains once without interruption (checkpoints half way and at the
end), resumes a second run from the half-way checkpoint, and checks that both
end at the same prompt. It then saves the prompt with ``att.save``.

    python integrations/hf_trainer.py --tiny               # seconds, random-weight LLaMA
    python integrations/hf_trainer.py --model smollm2      # SmolLM2-135M on Rotten Tomatoes

Needs ``accelerate`` (the Trainer imports it). The SmolLM2 path needs the demo's
install command (README). Each of its checkpoints is a full 540 MB model file;
without ``--output-dir`` they go to a temp dir and are deleted at the end.
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import (
    DataCollatorForLanguageModeling,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_assets import counting_texts, tiny_llama, word_tokenizer  # noqa: E402

import prompthooks as ph  # noqa: E402

#: Where the Trainer's checkpoints keep the prompt: the attribute ``ph.attach`` registers.
PREFIX = "prompthooks."
EVAL_BATCH = 16
INSTRUCTION = "Classify the sentiment of this movie review as positive or negative."

Tensors = dict[str, torch.Tensor]


def build_trainer(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: Sequence[dict[str, list[int]]],
    output_dir: Path,
    *,
    max_steps: int,
    save_steps: int,
    learning_rate: float,
    batch_size: int,
    seed: int = 0,
) -> Trainer:
    """The user's own Trainer set-up, unchanged: it does not mention prompthooks."""
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        save_steps=save_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        logging_steps=1,
        seed=seed,
        use_cpu=True,
        report_to=[],
        dataloader_num_workers=0,
    )
    return Trainer(
        model=model,
        args=args,
        train_dataset=train_dataset,  # a list of dicts is a map-style dataset
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )


def prompt_state(model: torch.nn.Module) -> Tensors:
    """The prompt entries of ``model.state_dict()``: what a checkpoint stores for it."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(PREFIX)}


def checkpoint_prompt(checkpoint: Path) -> Tensors:
    """The prompt tensors inside a Trainer checkpoint's ``model.safetensors``."""
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys() if k.startswith(PREFIX)}


def attach_from_checkpoint(
    model: torch.nn.Module, spec: ph.PromptTuning, checkpoint: Path
) -> ph.Attachment:
    """Attach ``spec`` and load a Trainer checkpoint's prompt into it, without a Trainer.

    This is what ``Trainer`` does on resume, restricted to the prompt's keys, so
    any checkpoint (the best one, say) can be used directly.
    """
    att = ph.attach(model, spec)
    tensors = checkpoint_prompt(checkpoint)
    result = model.load_state_dict(tensors, strict=False)
    missing = [k for k in result.missing_keys if k.startswith(PREFIX)]
    if missing or result.unexpected_keys or not tensors:
        att.detach()
        raise ValueError(f"{checkpoint} does not hold this prompt: missing {missing}")
    return att


class PromptProbe(TrainerCallback):
    """Records the prompt (and the optimizer state at the start) while the Trainer runs.

    Instrumentation for this script's checks only: training works without it.
    """

    def __init__(self) -> None:
        self.start: Tensors = {}
        self.start_optimizer: dict[str, Any] = {}
        self.steps: dict[int, Tensors] = {}

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        # Runs after a resumed Trainer has loaded the checkpoint's weights and optimizer.
        self.start = prompt_state(kwargs["model"])
        self.start_optimizer = copy.deepcopy(kwargs["optimizer"].state_dict())

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        self.steps[state.global_step] = prompt_state(kwargs["model"])


@torch.no_grad()
def heldout_loss(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, texts: list[str], batch_size: int
) -> float:
    """Language-model loss over ``texts`` in eval mode: the mean of per-batch mean losses
    (padding excluded), with a fixed batching so runs compare exactly."""
    was_training = model.training
    model.eval()
    losses = []
    for i in range(0, len(texts), batch_size):
        batch = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        losses.append(float(model(**batch, labels=labels).loss))
    model.train(was_training)
    return sum(losses) / len(losses)


@dataclass
class TrainerReport:
    """What happened in the uninterrupted run and in the run resumed half way."""

    checkpoint: Path  # the half-way checkpoint the second run resumed from
    final_checkpoint: Path
    prompt_file: Path
    initial: Tensors  # run 1, when training began
    steps: dict[int, Tensors]  # run 1, after each optimizer step
    final: Tensors  # run 1, uninterrupted
    logged: list[dict[str, float]]  # run 1's Trainer log history
    loss_before: float  # held-out loss with the untrained prompt
    loss_after: float  # ... with the trained prompt
    loss_from_checkpoint: float  # ... with the final checkpoint's prompt, attached again
    fresh: Tensors  # run 2's own new prompt, before the Trainer loaded the checkpoint
    resumed_start: Tensors  # run 2, when training began (after loading the checkpoint)
    resumed_optimizer: dict[str, Any]  # run 2's optimizer state when training began
    resumed_final: Tensors
    model: torch.nn.Module  # detached again
    timings: dict[str, float] = field(default_factory=dict)


def run(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    make_spec: Callable[[], ph.PromptTuning],
    train_texts: list[str],
    eval_texts: list[str],
    output_dir: Path,
    *,
    max_steps: int,
    learning_rate: float,
    batch_size: int,
    max_length: int = 96,
    seed: int = 0,
) -> TrainerReport:
    """Train uninterrupted, then resume a second run from the half-way checkpoint."""
    if max_steps < 2:
        raise ValueError("max_steps must be at least 2 (a checkpoint half way, then more steps)")
    save_steps = max_steps // 2
    dataset = [dict(tokenizer(t, truncation=True, max_length=max_length)) for t in train_texts]

    def trainer_for(folder: str) -> Trainer:
        return build_trainer(
            model,
            tokenizer,
            dataset,
            output_dir / folder,
            max_steps=max_steps,
            save_steps=save_steps,
            learning_rate=learning_rate,
            batch_size=batch_size,
            seed=seed,
        )

    timings: dict[str, float] = {}
    start = time.perf_counter()
    torch.manual_seed(seed)
    att = ph.attach(model, make_spec())  # before the Trainer is built: it sees the prompt
    loss_before = heldout_loss(model, tokenizer, eval_texts, EVAL_BATCH)
    trainer = trainer_for("uninterrupted")
    probe = PromptProbe()
    trainer.add_callback(probe)
    trainer.train()
    loss_after = heldout_loss(model, tokenizer, eval_texts, EVAL_BATCH)
    prompt_file = output_dir / "prompt.safetensors"
    att.save(prompt_file)
    final = prompt_state(model)
    logged = [dict(entry) for entry in trainer.state.log_history]
    att.detach()
    timings["uninterrupted"] = time.perf_counter() - start

    checkpoint = output_dir / "uninterrupted" / f"checkpoint-{save_steps}"
    final_checkpoint = output_dir / "uninterrupted" / f"checkpoint-{max_steps}"
    with attach_from_checkpoint(model, make_spec(), final_checkpoint):
        loss_from_checkpoint = heldout_loss(model, tokenizer, eval_texts, EVAL_BATCH)

    # A second run, as after a crash: a new prompt of the same spec (different
    # values: another seed), a new Trainer, resumed from the half-way checkpoint.
    start = time.perf_counter()
    torch.manual_seed(seed + 1)
    att = ph.attach(model, make_spec())
    fresh = prompt_state(model)
    trainer = trainer_for("resumed")
    resumed = PromptProbe()
    trainer.add_callback(resumed)
    trainer.train(resume_from_checkpoint=str(checkpoint))
    resumed_final = prompt_state(model)
    att.detach()
    timings["resumed"] = time.perf_counter() - start

    return TrainerReport(
        checkpoint=checkpoint,
        final_checkpoint=final_checkpoint,
        prompt_file=prompt_file,
        initial=probe.start,
        steps=probe.steps,
        final=final,
        logged=logged,
        loss_before=loss_before,
        loss_after=loss_after,
        loss_from_checkpoint=loss_from_checkpoint,
        fresh=fresh,
        resumed_start=resumed.start,
        resumed_optimizer=resumed.start_optimizer,
        resumed_final=resumed_final,
        model=model,
        timings=timings,
    )


def max_difference(a: Tensors, b: Tensors) -> float:
    """Largest absolute difference between two prompts with the same keys."""
    if a.keys() != b.keys():
        raise ValueError(f"different prompt keys: {sorted(a)} vs {sorted(b)}")
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def sentiment_texts(
    tokenizer: PreTrainedTokenizerBase, examples: list[tuple[str, int]], max_tokens: int = 48
) -> list[str]:
    """``Review: ...\\nSentiment: positive|negative``, each review cut to ``max_tokens``."""
    texts = []
    for review, label in examples:
        ids = tokenizer(review, add_special_tokens=False)["input_ids"][:max_tokens]
        word = "positive" if label else "negative"
        texts.append(f"Review: {str(tokenizer.decode(ids)).strip()}\nSentiment: {word}")
    return texts


def setup(
    model_name: str, n_train: int, n_eval: int, seed: int
) -> tuple[
    torch.nn.Module, PreTrainedTokenizerBase, Callable[[], ph.PromptTuning], list[str], list[str]
]:
    """Model, tokenizer, prompt spec factory and texts for ``tiny`` or ``smollm2``."""
    if model_name == "tiny":
        tokenizer = word_tokenizer()
        return (
            tiny_llama(seed),
            tokenizer,
            lambda: ph.PromptTuning(8),
            counting_texts(n_train, seed),
            counting_texts(n_eval, seed + 1000),
        )
    from assets import load_smollm2, rotten_tomatoes

    model: PreTrainedModel
    model, tokenizer = load_smollm2()
    train, test = rotten_tomatoes(n_train, n_eval, seed=seed)
    return (
        model,
        tokenizer,
        lambda: ph.PromptTuning(20, init="text", init_text=INSTRUCTION, tokenizer=tokenizer),
        sentiment_texts(tokenizer, train),
        sentiment_texts(tokenizer, test),
    )


def summarize(report: TrainerReport, name: str, base_unchanged: bool) -> None:
    """Print what the two runs showed."""
    losses = [e["loss"] for e in report.logged if "loss" in e]
    steps = max(report.steps)
    half = steps // 2
    in_checkpoint = checkpoint_prompt(report.checkpoint)
    print(f"\n{name}: {steps} Trainer steps, checkpoints at {half} and {steps}")
    print(f"  training loss (Trainer's log):     {losses[0]:.4f} -> {losses[-1]:.4f}")
    print(f"  held-out loss, untrained prompt:   {report.loss_before:.4f}")
    print(f"  held-out loss, trained prompt:     {report.loss_after:.4f}")
    print(f"  ... final checkpoint re-attached:  {report.loss_from_checkpoint:.4f}")
    print(
        f"  {report.checkpoint.name}/model.safetensors holds {sorted(in_checkpoint)}; "
        f"equal to the prompt after step {half}: "
        f"{max_difference(in_checkpoint, report.steps[half]) == 0.0}"
    )
    print(
        f"  resumed run started at the checkpoint's prompt: "
        f"{max_difference(report.resumed_start, in_checkpoint) == 0.0}"
    )
    diff = max_difference(report.resumed_final, report.final)
    print(f"  final prompt, resumed vs uninterrupted: max |difference| = {diff:.3g}")
    print(f"  detached; base model bit-identical to before: {base_unchanged}")
    print(f"  prompt saved with att.save to {report.prompt_file}")


def main(argv: list[str] | None = None) -> TrainerReport:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    parser.add_argument("--tiny", action="store_true", help="same as --model tiny")
    parser.add_argument("--output-dir", type=Path, default=None, help="default: a new temp dir")
    parser.add_argument("--max-steps", type=int, default=None, help="tiny: 4, smollm2: 16")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=None, help="tiny: 0.1, smollm2: 0.01")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    name = "tiny" if args.tiny else args.model
    tiny = name == "tiny"
    max_steps = args.max_steps or (4 if tiny else 16)
    lr = args.lr or (0.1 if tiny else 0.01)
    output_dir = args.output_dir or Path(tempfile.mkdtemp(prefix="prompthooks-hf-trainer-"))
    output_dir.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    model, tokenizer, make_spec, train_texts, eval_texts = setup(
        name, max_steps * args.batch_size, 16 if tiny else 32, args.seed
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = run(
        model,
        tokenizer,
        make_spec,
        train_texts,
        eval_texts,
        output_dir,
        max_steps=max_steps,
        learning_rate=lr,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    unchanged = model.state_dict().keys() == before.keys() and all(
        torch.equal(before[k], v) for k, v in model.state_dict().items()
    )
    summarize(report, name, unchanged)
    if args.output_dir is None:  # a full model per checkpoint: do not leave them in /tmp
        for folder in ("uninterrupted", "resumed"):
            shutil.rmtree(output_dir / folder, ignore_errors=True)
        print("  (checkpoints deleted; pass --output-dir to keep them)")
    print(f"  total {time.perf_counter() - start:.1f} s; output in {output_dir}")
    return report


if __name__ == "__main__":
    main()
