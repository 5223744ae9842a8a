"""The two classification tasks of ``quality.py``, as text the models read.

A :class:`Task` holds a fixed, seeded split of ``(text, label)`` rows, the
template a causal LM reads (``question``), one verbalizer word per label (its
first token's next-token score is the class score), and the sentence that
starts a text-initialised prompt. Texts are cut to ``max_tokens`` tokens of
the tokenizer that will read them, once, here.

The real tasks read offline data packages (``integrations/assets.py``); the
tiny tasks are made of words of the tiny word tokenizer, so that the
``--tiny`` run needs no data package and no real weights.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integrations"))
from assets import BBC_TOPICS, bbc_news, rotten_tomatoes  # noqa: E402

Row = tuple[str, int]


@dataclass(frozen=True)
class Task:
    """A seeded split, its template and its verbalizer."""

    name: str
    train: list[Row]
    test: list[Row]
    label_words: tuple[str, ...]  # " negative", " positive": the first token of each is scored
    template: str  # "...{text}...": the question a causal LM answers with a label word
    init_text: str  # the start of a Prompt Tuning prompt with init="text"

    @property
    def num_labels(self) -> int:
        return len(self.label_words)

    def question(self, text: str) -> str:
        return self.template.format(text=text)

    def demonstration(self, text: str, label: int) -> str:
        """One solved example for in-context learning."""
        return self.question(text) + self.label_words[label] + "\n\n"

    def demonstrations(self, shots: int, seed: int) -> str:
        """``shots`` solved training examples, labels as balanced as ``shots`` allows."""
        rng = random.Random(seed)
        labels = list(range(self.num_labels))
        rng.shuffle(labels)
        wanted = [labels[i % self.num_labels] for i in range(shots)]
        pool = list(self.train)
        rng.shuffle(pool)
        chosen = []
        for label in wanted:
            row = next(r for r in pool if r[1] == label and r not in chosen)
            chosen.append(row)
        return "".join(self.demonstration(t, y) for t, y in chosen)


def cut(tokenizer: Any, text: str, max_tokens: int) -> str:
    """``text`` cut to its first ``max_tokens`` tokens (no special tokens counted)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    return str(tokenizer.decode(ids[:max_tokens])).strip()


def _cut_rows(tokenizer: Any, rows: list[Row], max_tokens: int) -> list[Row]:
    return [(cut(tokenizer, t, max_tokens), y) for t, y in rows]


def rotten_tomatoes_task(
    tokenizer: Any, n_train: int, n_test: int, seed: int, max_tokens: int
) -> Task:
    train, test = rotten_tomatoes(n_train, n_test, seed)
    return Task(
        name="rotten_tomatoes",
        train=_cut_rows(tokenizer, train, max_tokens),
        test=_cut_rows(tokenizer, test, max_tokens),
        label_words=(" negative", " positive"),
        template="Review: {text}\nSentiment:",  # the demo's template (README)
        init_text="Classify the sentiment of this movie review as positive or negative.",
    )


def bbc_news_task(tokenizer: Any, n_train: int, n_test: int, seed: int, max_tokens: int) -> Task:
    train, test = bbc_news(n_train, n_test, seed)
    options = ", ".join(BBC_TOPICS[:-1]) + " or " + BBC_TOPICS[-1]
    return Task(
        name="bbc_news",
        train=_cut_rows(tokenizer, train, max_tokens),
        test=_cut_rows(tokenizer, test, max_tokens),
        label_words=tuple(" " + t for t in BBC_TOPICS),
        template="Article: {text}\nTopic (" + options + "):",
        init_text=f"Classify the topic of this news article as {options}.",
    )


# --- tiny tasks: words of integrations/tiny_assets.word_tokenizer (w3 ... w63) ----------


def _tiny_rows(n: int, num_labels: int, seed: int) -> list[Row]:
    """Random word strings; the label is which of ``num_labels`` word groups dominates."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % num_labels
        words = [f"w{rng.randrange(20, 60)}" for _ in range(rng.randrange(3, 12))]
        words += [f"w{10 + label}"] * 2  # a learnable cue
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    rng.shuffle(rows)
    return rows


def tiny_task(name: str, num_labels: int, n_train: int, n_test: int, seed: int) -> Task:
    """A task over the tiny word tokenizer's vocabulary, for the ``--tiny`` pipeline check."""
    rows = _tiny_rows(n_train + n_test, num_labels, seed)
    return Task(
        name=name,
        train=rows[:n_train],
        test=rows[n_train:],
        label_words=tuple(f" w{3 + i}" for i in range(num_labels)),
        template="w60 {text} w61",
        # As long as the prefix (10): PEFT's text init takes no shorter text.
        init_text="w62 w63 w62 w61 w60 w62 w63 w62 w61 w60 w62",
    )
