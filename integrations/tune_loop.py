"""A plain PyTorch training loop, decorated with ``ph.tune``, trains and saves a prompt.

``train`` below is ordinary training code: an optimizer over
``model.parameters()``, ``loss.backward()``, ``optimizer.step()``, and an
evaluation at the end of each epoch. ``@ph.tune(spec, model="model",
save_to=path)`` attaches a fresh prompt to the ``model`` argument for the
duration of the call (so the optimizer sees the prompt and nothing else is
trainable), saves it to ``path`` when the call returns, and detaches. The
script then loads the file with ``ph.load``, attaches it again and evaluates.

    python integrations/tune_loop.py --tiny               # seconds, random-weight LLaMA
    python integrations/tune_loop.py --model smollm2      # SmolLM2-135M, Rotten Tomatoes

The SmolLM2 path needs the demo's install command (README).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_assets import counting_texts, tiny_llama, word_tokenizer  # noqa: E402

import prompthooks as ph  # noqa: E402

INSTRUCTION = "Classify the sentiment of this movie review as positive or negative."
Batch = dict[str, torch.Tensor]
Tensors = dict[str, torch.Tensor]


def train_loop(
    model: torch.nn.Module, batches: list[Batch], eval_batches: list[Batch], epochs: int, lr: float
) -> tuple[list[float], list[float]]:
    """Ordinary training code: it knows nothing about prompts.

    Returns the training loss of every step and the held-out loss after each epoch.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses, eval_losses = [], []
    for _ in range(epochs):
        model.train()
        for batch in batches:
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        eval_losses.append(evaluate(model, eval_batches))
    return losses, eval_losses


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[Batch]) -> float:
    """Mean loss over ``batches`` in eval mode."""
    model.eval()
    return sum(float(model(**b).loss) for b in batches) / len(batches)


@torch.no_grad()
def accuracy(
    model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, examples: list[tuple[str, int]]
) -> float:
    """Share of reviews whose " positive" / " negative" next-token score picks the label."""
    model.eval()
    words = [tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in LABEL_WORDS]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # the last position is every row's last real token
    correct = 0
    for i in range(0, len(examples), 16):
        chunk = examples[i : i + 16]
        batch = tokenizer([question(r) for r, _ in chunk], return_tensors="pt", padding=True)
        scores = model(**batch).logits[:, -1, words]
        correct += int((scores.argmax(-1) == torch.tensor([y for _, y in chunk])).sum())
    tokenizer.padding_side = side
    return correct / len(examples)


LABEL_WORDS = (" negative", " positive")


def question(review: str) -> str:
    return f"Review: {review}\nSentiment:"


def lm_batches(tokenizer: PreTrainedTokenizerBase, texts: list[str], size: int) -> list[Batch]:
    """Language-model batches: every real token is a target, padding is not."""
    out = []
    for i in range(0, len(texts), size):
        b = tokenizer(texts[i : i + size], return_tensors="pt", padding=True)
        out.append({**b, "labels": b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)})
    return out


def answer_batches(
    tokenizer: PreTrainedTokenizerBase, examples: list[tuple[str, int]], size: int
) -> list[Batch]:
    """``Review: ...\\nSentiment: <label word>`` with only the label word as a target."""
    out = []
    for i in range(0, len(examples), size):
        rows = []
        for review, label in examples[i : i + size]:
            q = tokenizer(question(review), add_special_tokens=False)["input_ids"]
            a = tokenizer(LABEL_WORDS[label], add_special_tokens=False)["input_ids"]
            rows.append((q + a, [-100] * len(q) + a))
        width = max(len(ids) for ids, _ in rows)
        pad = tokenizer.pad_token_id
        out.append(
            {  # right padding: the model's own positions come from the mask either way
                "input_ids": torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows]),
                "attention_mask": torch.tensor(
                    [[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows]
                ),
                "labels": torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows]),
            }
        )
    return out


def shorten(tokenizer: PreTrainedTokenizerBase, review: str, max_tokens: int = 48) -> str:
    ids = tokenizer(review, add_special_tokens=False)["input_ids"][:max_tokens]
    return str(tokenizer.decode(ids)).strip()


@dataclass
class TuneReport:
    """Training losses, the reloaded prompt and held-out results."""

    prompt_file: Path
    losses: list[float]  # every training step
    eval_losses: list[float]  # held-out loss after each epoch, inside the decorated call
    base_loss: float  # held-out loss of the model without a prompt
    reloaded_loss: float  # ... with the prompt from ph.load, attached again
    last_seen: Tensors  # prompt values in the decorated call's last forward pass
    reloaded: Tensors  # prompt values after ph.load
    model: torch.nn.Module  # detached again
    base_accuracy: float | None = None  # SmolLM2 only
    reloaded_accuracy: float | None = None


def run(
    model: torch.nn.Module,
    spec: ph.PromptTuning,
    batches: list[Batch],
    eval_batches: list[Batch],
    prompt_file: Path,
    *,
    epochs: int,
    lr: float,
    accuracy_of: Callable[[torch.nn.Module], float] | None = None,
) -> TuneReport:
    """Decorate :func:`train_loop` with ``ph.tune``, call it, reload and evaluate."""
    base_loss = evaluate(model, eval_batches)
    base_accuracy = accuracy_of(model) if accuracy_of else None

    # The decorator, exactly as on a user's own function.
    train = ph.tune(spec, model="model", save_to=prompt_file)(train_loop)

    # Observation only: the prompt values each forward call sees. The last call
    # is the held-out evaluation that ends training, so it sees the final prompt.
    seen: list[Tensors] = []

    def record(module: torch.nn.Module, args: object) -> None:
        prompts = getattr(module, "prompthooks", None)
        if prompts is not None:
            seen[:] = [{k: v.detach().clone() for k, v in prompts.state_dict().items()}]

    handle = model.register_forward_pre_hook(record)
    try:
        losses, eval_losses = train(model, batches, eval_batches, epochs, lr)
    finally:
        handle.remove()

    loaded = ph.load(prompt_file)  # {"default": trained prompt}
    reloaded = {f"{n}.{k}": v.clone() for n, p in loaded.items() for k, v in p.state_dict().items()}
    with ph.attach(model, loaded):
        reloaded_loss = evaluate(model, eval_batches)
        reloaded_accuracy = accuracy_of(model) if accuracy_of else None
    return TuneReport(
        prompt_file=prompt_file,
        losses=losses,
        eval_losses=eval_losses,
        base_loss=base_loss,
        reloaded_loss=reloaded_loss,
        last_seen=seen[0] if seen else {},
        reloaded=reloaded,
        model=model,
        base_accuracy=base_accuracy,
        reloaded_accuracy=reloaded_accuracy,
    )


def main(argv: list[str] | None = None) -> TuneReport:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    parser.add_argument("--tiny", action="store_true", help="same as --model tiny")
    parser.add_argument("--output", type=Path, default=None, help="prompt file (default: temp)")
    parser.add_argument("--train", type=int, default=None, help="tiny: 16 texts, smollm2: 160")
    parser.add_argument("--test", type=int, default=None, help="tiny: 16 texts, smollm2: 100")
    parser.add_argument("--epochs", type=int, default=None, help="tiny: 2, smollm2: 1")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="tiny: 0.1, smollm2: 0.01")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tiny = args.tiny or args.model == "tiny"
    prompt_file = args.output or (
        Path(tempfile.mkdtemp(prefix="prompthooks-tune-")) / "prompt.safetensors"
    )
    start = time.perf_counter()

    torch.manual_seed(args.seed)
    accuracy_of = None
    if tiny:
        model: torch.nn.Module = tiny_llama(args.seed)
        tokenizer = word_tokenizer()
        spec = ph.PromptTuning(8)
        batches = lm_batches(
            tokenizer, counting_texts(args.train or 16, args.seed), args.batch_size
        )
        eval_batches = lm_batches(tokenizer, counting_texts(args.test or 16, args.seed + 1000), 16)
    else:
        from assets import load_smollm2, rotten_tomatoes

        model, tokenizer = load_smollm2()
        train, test = rotten_tomatoes(args.train or 160, args.test or 100, seed=args.seed)
        train = [(shorten(tokenizer, r), y) for r, y in train]
        test = [(shorten(tokenizer, r), y) for r, y in test]
        spec = ph.PromptTuning(20, init="text", init_text=INSTRUCTION, tokenizer=tokenizer)
        batches = answer_batches(tokenizer, train, args.batch_size)
        eval_batches = answer_batches(tokenizer, test, 16)

        def accuracy_of(m: torch.nn.Module) -> float:
            return accuracy(m, tokenizer, test)

    epochs = args.epochs or (2 if tiny else 1)
    lr = args.lr or (0.1 if tiny else 0.01)
    report = run(
        model,
        spec,
        batches,
        eval_batches,
        prompt_file,
        epochs=epochs,
        lr=lr,
        accuracy_of=accuracy_of,
    )

    same = report.last_seen.keys() == report.reloaded.keys() and all(
        torch.equal(report.last_seen[k], report.reloaded[k]) for k in report.reloaded
    )
    k = max(1, len(report.losses) // 4)
    first, last = sum(report.losses[:k]) / k, sum(report.losses[-k:]) / k
    print(f"\n{'tiny' if tiny else 'smollm2'}: {len(report.losses)} steps, {epochs} epoch(s)")
    print(f"  training loss, first {k} / last {k} steps: {first:.4f} -> {last:.4f}")
    print(f"  held-out loss, no prompt:              {report.base_loss:.4f}")
    print(f"  held-out loss, end of training:        {report.eval_losses[-1]:.4f}")
    print(f"  held-out loss, ph.load + attach:       {report.reloaded_loss:.4f}")
    if report.base_accuracy is not None and report.reloaded_accuracy is not None:
        print(f"  held-out accuracy, no prompt:          {report.base_accuracy:.1%}")
        print(f"  held-out accuracy, reloaded prompt:    {report.reloaded_accuracy:.1%}")
    print(f"  reloaded values == trained values:     {same}")
    print(f"  saved by ph.tune to {report.prompt_file} ({time.perf_counter() - start:.1f} s)")
    return report


if __name__ == "__main__":
    main()
