"""PEFT adapters in both directions, for PROMPT_TUNING, P_TUNING and PREFIX_TUNING.

* PEFT -> prompthooks -> PEFT: an adapter trained (here: filled with values far
  from any init) by PEFT and saved with ``save_pretrained`` is read by
  ``ph.load_peft``; prompthooks gives PEFT's outputs; ``att.save_peft`` writes
  it back and PEFT loads that to the same outputs.
* prompthooks -> PEFT -> prompthooks: a prompthooks prompt (with its P-tuning
  encoder or prefix MLP) written with ``att.save_peft`` is loaded by
  ``PeftModel.from_pretrained`` with the same outputs, under the adapter type
  of its method, and ``ph.load_peft`` reads it back to the same outputs.

PEFT is the oracle: it builds its own inputs (concatenated embeddings, a
filled cache). Inputs are unpadded, where PEFT's placement is correct.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import (
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    get_peft_model,
)

import prompthooks as ph
from tests.support.models import VOCAB, tiny

# File and workflow tests: the same on every kernel path; they run in the torch pass
# and the Triton pass deselects them (-m "not workflow").
pytestmark = pytest.mark.workflow

N = 4
TYPES = {"prompt": "PROMPT_TUNING", "p_tuning": "P_TUNING", "prefix": "PREFIX_TUNING"}


def inputs() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (3, 7), generator=torch.Generator().manual_seed(5))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def peft_logits(peft_model: Any, method: str) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = peft_model(**inputs()).logits
    return logits if method == "prefix" else logits[:, N:]  # PEFT keeps virtual positions


def our_logits(model: torch.nn.Module, prompt: Any) -> torch.Tensor:
    with ph.attach(model, prompt), torch.no_grad():
        logits: torch.Tensor = model(**inputs()).logits
    return logits


def scramble(module: torch.nn.Module, seed: int) -> None:
    """Move every parameter far from its initialisation, so equality means something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)


def peft_config(method: str) -> Any:
    if method == "prompt":
        return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)
    if method == "p_tuning":
        return PromptEncoderConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=N,
            encoder_hidden_size=16,
            encoder_reparameterization_type="LSTM",
        )
    return PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=16
    )


def our_spec(method: str) -> Any:
    if method == "prompt":
        return ph.PromptTuning(N)
    if method == "p_tuning":
        return ph.PTuning(N, encoder="lstm", hidden_size=16)
    return ph.PrefixTuning(N, projection=True, hidden_size=16)


def adapter_type(directory: Path) -> str:
    return str(json.loads((directory / "adapter_config.json").read_text())["peft_type"])


@pytest.mark.parametrize("method", ["prompt", "p_tuning", "prefix"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_peft_to_prompthooks_to_peft(arch: str, method: str, tmp_path: Path) -> None:
    model = tiny(arch)
    trained = get_peft_model(copy.deepcopy(model), peft_config(method))
    scramble(trained.prompt_encoder, seed=1)  # the LSTM/MLP too: PEFT saves their output
    trained.save_pretrained(tmp_path / "peft")
    theirs = peft_logits(trained.eval(), method)

    prompt = ph.load_peft(tmp_path / "peft")
    assert prompt.num_virtual_tokens == N
    torch.testing.assert_close(our_logits(model, prompt), theirs, atol=1e-5, rtol=0)

    with ph.attach(model, prompt) as att:
        att.save_peft(tmp_path / "back")
    assert adapter_type(tmp_path / "back") == TYPES["prompt" if method == "p_tuning" else method]
    again = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "back").eval()
    torch.testing.assert_close(peft_logits(again, method), theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["prompt", "p_tuning", "prefix"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_prompthooks_to_peft_to_prompthooks(arch: str, method: str, tmp_path: Path) -> None:
    model = tiny(arch)
    with ph.attach(model, our_spec(method)) as att:
        scramble(att.prompts, seed=2)  # the encoder / MLP too, not only a table
        with torch.no_grad():
            ours = model(**inputs()).logits
        att.save_peft(tmp_path)
    assert adapter_type(tmp_path) == TYPES[method]

    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path).eval()
    torch.testing.assert_close(peft_logits(peft_model, method), ours, atol=1e-5, rtol=0)

    torch.testing.assert_close(our_logits(model, ph.load_peft(tmp_path)), ours, atol=1e-6, rtol=0)
    # Loading PEFT's file left the model as it was.
    with torch.no_grad():
        assert torch.equal(model(**inputs()).logits, tiny(arch)(**inputs()).logits)
