"""A PEFT prompt-tuning adapter, loaded with ``ph.load_peft``, gives PEFT's logits.

A random PEFT ``PROMPT_TUNING`` adapter on GPT-2, LLaMA and T5 is the oracle: PEFT
builds its own inputs (the prompt concatenated in front of the embeddings).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import PromptTuningConfig, get_peft_model

import prompthooks as ph
from tests.support.models import batch, decoder_ids, tiny

TASKS = {"gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM", "t5": "SEQ_2_SEQ_LM"}


def peft_adapter(model: torch.nn.Module, arch: str, n: int, path: Path) -> torch.nn.Module:
    peft_model = get_peft_model(
        copy.deepcopy(model), PromptTuningConfig(task_type=TASKS[arch], num_virtual_tokens=n)
    )
    torch.manual_seed(11)
    with torch.no_grad():
        for p in peft_model.prompt_encoder.parameters():
            p.normal_(0, 1.0)  # values far from any init, so parity means something
    peft_model.save_pretrained(path)
    return peft_model.eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
def test_load_peft_gives_peft_logits(arch: str, tmp_path: Path) -> None:
    model = tiny(arch)
    n = 6
    peft_model = peft_adapter(model, arch, n, tmp_path)
    ids, _ = batch(arch, [7, 7], seed=12)
    extra = {"decoder_input_ids": decoder_ids(2)} if arch == "t5" else {}
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits
    if arch != "t5":
        expected = expected[:, n:]  # PEFT returns the virtual positions too
    prompt = ph.load_peft(tmp_path)
    assert prompt.num_virtual_tokens == n
    with ph.attach(model, prompt), torch.no_grad():
        got = model(input_ids=ids, attention_mask=torch.ones_like(ids), **extra).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
