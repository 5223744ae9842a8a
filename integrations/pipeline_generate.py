"""``transformers.pipeline("text-generation")`` generates with a soft prompt attached.

The pipeline is built the usual way, ``pipeline("text-generation", model=model,
tokenizer=tokenizer)``, on a model with a prompt attached: its own tokenization,
left padding for batches, ``model.generate`` call and decoding are untouched,
and the hooks put the prompt's virtual tokens in front of each row's first real
token.

The check is an oracle that does not use prompthooks at all: the model without
hooks, fed ``inputs_embeds = cat(prompt_table, token_embeddings)`` through
``model.generate(inputs_embeds=..., do_sample=False)``. Greedy text from the
pipeline (batched, so left-padded) must equal the oracle's for every input,
equal ``model.generate`` on the attached model, and differ from the pipeline's
text once the prompt is detached.

    python integrations/pipeline_generate.py --tiny             # seconds, random weights
    python integrations/pipeline_generate.py --model smollm2    # SmolLM2-135M-Instruct

``--prompt FILE`` attaches a trained prompt (``att.save`` / ``ph.tune`` output)
instead of a text-initialised one. The SmolLM2 path needs the demo's install
command (README).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, pipeline

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_assets import tiny_llama, word_tokenizer  # noqa: E402

import prompthooks as ph  # noqa: E402

TINY_TEXTS = ["w3 w4 w5 w6 w7", "w30", "w5 w17 w33 w50"]
SMOLLM2_TEXTS = [
    "The movie was",
    "My favourite thing about this city is",
    "Review: A tedious, overlong mess.\nSentiment:",
]
STEER = "Answer in French, like an enthusiastic film critic."


@torch.no_grad()
def oracle_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    table: torch.Tensor,
    text: str,
    max_new_tokens: int,
) -> str:
    """Greedy text of the model *without hooks*, with the prompt fed by hand.

    The prompt goes in front of the text's token embeddings; positions and the
    all-ones mask then follow as for any ``inputs_embeds`` input. ``generate``
    returns only the new tokens for an ``inputs_embeds`` input.
    """
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    embeddings = model.get_input_embeddings()(ids)
    inputs_embeds = torch.cat([table[None].to(embeddings.dtype), embeddings], dim=1)
    mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long)
    new = model.generate(  # type: ignore[operator]  # GenerationMixin, untyped
        inputs_embeds=inputs_embeds,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=False,
    )
    return str(tokenizer.decode(new[0], skip_special_tokens=True))


@torch.no_grad()
def generate_new_text(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, text: str, max_new_tokens: int
) -> str:
    """``model.generate`` on the model as it is (prompt attached or not): new text only."""
    inputs = tokenizer(text, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)  # type: ignore[operator]
    return str(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))


@dataclass
class PipelineReport:
    """Greedy continuations of each input, four ways."""

    texts: list[str]
    pipeline: list[str]  # pipeline, prompt attached, inputs batched (left-padded)
    generate: list[str]  # model.generate on the attached model, one input at a time
    oracle: list[str]  # model without hooks fed inputs_embeds = cat(table, embeddings)
    without_prompt: list[str]  # the same pipeline after att.detach()
    unchanged: bool  # state_dict after detach == before attach
    model: PreTrainedModel  # detached again


def run(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompt: ph.PromptTuning | ph.SoftPrompt,
    texts: list[str],
    max_new_tokens: int,
    batch_size: int = 2,
) -> PipelineReport:
    """Attach, build the pipeline, generate four ways, detach."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    att = ph.attach(model, prompt)
    pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)  # type: ignore[call-overload]
    settings = dict(max_new_tokens=max_new_tokens, do_sample=False, return_full_text=False)
    with_prompt = [r[0]["generated_text"] for r in pipe(texts, batch_size=batch_size, **settings)]
    attached = [generate_new_text(model, tokenizer, t, max_new_tokens) for t in texts]
    prompt_module = att.prompts["default"]
    assert isinstance(prompt_module, ph.SoftPrompt)
    table = prompt_module.table().detach().clone()
    att.detach()

    oracle = [oracle_generate(model, tokenizer, table, t, max_new_tokens) for t in texts]
    bare = [r[0]["generated_text"] for r in pipe(texts, batch_size=batch_size, **settings)]
    unchanged = all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    return PipelineReport(texts, with_prompt, attached, oracle, bare, unchanged, model)


def main(argv: list[str] | None = None) -> PipelineReport:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    parser.add_argument("--tiny", action="store_true", help="same as --model tiny")
    parser.add_argument("--prompt", type=Path, default=None, help="a file from att.save")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="tiny: 8, smollm2: 16")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    tiny = args.tiny or args.model == "tiny"
    start = time.perf_counter()

    torch.manual_seed(args.seed)
    prompt: ph.PromptTuning | ph.SoftPrompt
    if tiny:
        model: PreTrainedModel = tiny_llama(args.seed)
        tokenizer = word_tokenizer()
        texts = TINY_TEXTS
        prompt = ph.PromptTuning(8)
    else:
        from assets import load_smollm2

        model, tokenizer = load_smollm2()
        texts = SMOLLM2_TEXTS
        prompt = ph.PromptTuning(16, init="text", init_text=STEER, tokenizer=tokenizer)
    if args.prompt is not None:
        (prompt,) = ph.load(args.prompt).values()
    max_new_tokens = args.max_new_tokens or (8 if tiny else 16)

    report = run(model, tokenizer, prompt, texts, max_new_tokens)
    for i, text in enumerate(report.texts):
        print(f"\n{text!r}")
        print(f"  pipeline, prompt attached: {report.pipeline[i]!r}")
        print(f"  oracle (inputs_embeds):    {report.oracle[i]!r}")
        print(f"  pipeline, no prompt:       {report.without_prompt[i]!r}")
    print(f"\npipeline == oracle for every input:          {report.pipeline == report.oracle}")
    print(f"pipeline == generate on the attached model:  {report.pipeline == report.generate}")
    differs = sum(a != b for a, b in zip(report.pipeline, report.without_prompt, strict=True))
    print(f"inputs whose text the prompt changes:        {differs} of {len(report.texts)}")
    print(f"detached; model bit-identical to before:     {report.unchanged}")
    print(f"({time.perf_counter() - start:.1f} s)")
    return report


if __name__ == "__main__":
    main()
