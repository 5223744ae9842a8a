"""Reading and writing prompts: our own safetensors format and PEFT adapters.

Only safetensors and JSON are read: no pickle, no remote code.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .locators.base import Located
from .methods.base import SoftPrompt
from .methods.prompt_tuning import PromptTable

FORMAT = "prompthooks/1"


def save(prompts: dict[str, SoftPrompt], path: str | Path, located: Located | None = None) -> None:
    """Write prompts atomically: a crash mid-save leaves the old file intact."""
    path = Path(path)
    tensors = {
        f"{name}.{key}": value.detach().contiguous().cpu()
        for name, prompt in prompts.items()
        for key, value in prompt.state_dict().items()
    }
    meta: dict[str, Any] = {"prompts": {n: p.config() for n, p in prompts.items()}}
    if located is not None:
        meta["model"] = {"hidden_size": located.hidden_size, "vocab_size": located.vocab_size}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"format": FORMAT, "config": json.dumps(meta)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(path: str | Path) -> dict[str, SoftPrompt]:
    """Read prompts written by ``att.save``; attach the result with ``ph.attach``."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            found = metadata.get("format")
            raise ValueError(f"{path} is not a prompthooks file (format {found!r})")
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    meta = json.loads(metadata["config"])
    prompts: dict[str, SoftPrompt] = {}
    for name, config in meta["prompts"].items():
        if config["method"] != PromptTable.method:
            raise ValueError(f"{path}: prompt {name!r} has unknown method {config['method']!r}")
        prompts[name] = PromptTable(tensors[f"{name}.weight"])
    return prompts


def load_peft(directory: str | Path) -> SoftPrompt:
    """Read a PEFT prompt-learning adapter directory into an attachable prompt."""
    directory = Path(directory)
    config_file = directory / "adapter_config.json"
    weights_file = directory / "adapter_model.safetensors"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file} not found: is {directory} a PEFT adapter directory?"
        )
    if not weights_file.is_file():
        raise FileNotFoundError(
            f"{weights_file} not found (only safetensors adapters are read, never pickle files)"
        )
    config = json.loads(config_file.read_text())
    peft_type = config.get("peft_type")
    if peft_type != "PROMPT_TUNING":
        raise ValueError(
            f"{directory}: peft_type {peft_type!r} is not supported (PROMPT_TUNING is)"
        )
    with safe_open(str(weights_file), framework="pt") as f:
        if "prompt_embeddings" not in f.keys():
            raise ValueError(f"{weights_file} has no 'prompt_embeddings' tensor")
        table: torch.Tensor = f.get_tensor("prompt_embeddings")
    n = int(config["num_virtual_tokens"])
    submodules = int(config.get("num_transformer_submodules") or 1)
    if table.ndim != 2 or table.shape[0] != n * submodules:
        raise ValueError(
            f"{weights_file}: prompt_embeddings has shape {tuple(table.shape)}, expected "
            f"({n * submodules}, token_dim) for {n} virtual tokens x {submodules} submodule(s)"
        )
    # Seq2seq adapters hold 2P rows; PEFT feeds the encoder the first P.
    return PromptTable(table[:n])
