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
from .methods.p_tuning import PTuningPrompt
from .methods.prefix_tuning import Prefix
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
        mine = f"{name}."
        own = {k.removeprefix(mine): v for k, v in tensors.items() if k.startswith(mine)}
        if config["method"] == PromptTable.method:
            prompts[name] = PromptTable(own["weight"])
        elif config["method"] == Prefix.method:
            prompts[name] = Prefix.from_config(config, own)
        elif config["method"] == PTuningPrompt.method:
            prompts[name] = PTuningPrompt.from_config(config, own)
        else:
            raise ValueError(f"{path}: prompt {name!r} has unknown method {config['method']!r}")
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
    if peft_type not in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"):
        raise ValueError(
            f"{directory}: peft_type {peft_type!r} is not supported "
            "(PROMPT_TUNING, P_TUNING and PREFIX_TUNING are)"
        )
    with safe_open(str(weights_file), framework="pt") as f:
        if "prompt_embeddings" not in f.keys():
            raise ValueError(f"{weights_file} has no 'prompt_embeddings' tensor")
        table: torch.Tensor = f.get_tensor("prompt_embeddings")
    n = int(config["num_virtual_tokens"])
    submodules = int(config.get("num_transformer_submodules") or 1)
    if peft_type == "PREFIX_TUNING":
        return _peft_prefix(config, table, n, submodules, weights_file)
    if table.ndim != 2 or table.shape[0] != n * submodules:
        raise ValueError(
            f"{weights_file}: prompt_embeddings has shape {tuple(table.shape)}, expected "
            f"({n * submodules}, token_dim) for {n} virtual tokens x {submodules} submodule(s)"
        )
    # Seq2seq adapters hold 2P rows; PEFT feeds the encoder the first P.
    return PromptTable(table[:n])


def _peft_prefix(
    config: dict[str, Any], table: torch.Tensor, n: int, submodules: int, weights_file: Path
) -> Prefix:
    """PEFT's prefix table is ``(n, L * 2 * token_dim)``, read as ``(n, L, 2, H_kv, D)``."""
    if submodules != 1:
        raise ValueError(
            f"{weights_file}: a PEFT prefix for an encoder-decoder model "
            f"(num_transformer_submodules={submodules}) cannot be imported: PEFT gives only the "
            "decoder self-attention a prefix, with layer i reading slot 2i mod L. "
            "Train a ph.PrefixTuning prompt instead: it covers encoder, decoder and "
            "cross-attention."
        )
    layers, heads = int(config["num_layers"]), int(config["num_attention_heads"])
    token_dim = int(config["token_dim"])
    if token_dim % heads or table.shape != (n, layers * 2 * token_dim):
        raise ValueError(
            f"{weights_file}: prompt_embeddings has shape {tuple(table.shape)}, expected "
            f"({n}, {layers * 2 * token_dim}) for {n} virtual tokens x {layers} layers x 2 x "
            f"token_dim {token_dim} ({heads} heads)"
        )
    shapes = [(heads, token_dim // heads)] * layers
    return Prefix(shapes, table=table, shift_positions=True)


_TASKS = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("LMHeadModel", "CAUSAL_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)


def peft_task_type(model: torch.nn.Module) -> str:
    """PEFT's task type for a transformers model class, from its name."""
    name = type(model).__name__
    return next((task for suffix, task in _TASKS if name.endswith(suffix)), "FEATURE_EXTRACTION")


def save_peft(
    prompt: SoftPrompt, directory: str | Path, located: Located, *, task_type: str | None = None
) -> None:
    """Write ``prompt`` as a PEFT prompt-learning adapter (see ``Attachment.save_peft``)."""
    prompt = prompt.export()
    task = task_type or peft_task_type(located.model)
    heads = {s.num_kv_heads for s in located.sites}
    layers = sum(1 for s in located.sites if s.role in ("self", "dec_self"))
    model_config = getattr(located.model, "config", None)
    config: dict[str, Any] = {
        "task_type": task,
        "num_virtual_tokens": prompt.num_virtual_tokens,
        "inference_mode": True,
        "base_model_name_or_path": getattr(model_config, "_name_or_path", None) or None,
        "num_layers": layers,
        "num_attention_heads": heads.pop() if len(heads) == 1 else None,
    }
    if isinstance(prompt, Prefix):
        if {s.role for s in located.sites} != {"self"} or len(set(prompt.shapes)) != 1:
            raise ValueError(
                f"PEFT's prefix format cannot hold this {type(located.model).__name__} prefix: "
                "it has one (H_kv, D) shape for all layers of a single stack, while this model "
                f"has attention roles {sorted({s.role for s in located.sites})}. "
                "Save it with att.save(path) instead."
            )
        h, d = prompt.shapes[0]
        config.update(
            peft_type="PREFIX_TUNING",
            token_dim=h * d,
            num_attention_heads=h,
            num_transformer_submodules=1,
            encoder_hidden_size=h * d,
            prefix_projection=False,
        )
        table = prompt.flat()
    elif isinstance(prompt, PromptTable):
        submodules = 2 if located.is_encoder_decoder else 1
        config.update(
            peft_type="PROMPT_TUNING",
            token_dim=prompt.hidden_size,
            num_transformer_submodules=submodules,
            prompt_tuning_init="RANDOM",
        )
        # Seq2seq adapters hold 2P rows; PEFT feeds the encoder the first P.
        table = prompt.table().repeat(submodules, 1)
    else:
        raise ValueError(f"{type(prompt).__name__} prompts have no PEFT format")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(
        {"prompt_embeddings": table.detach().float().contiguous().cpu()},
        str(directory / "adapter_model.safetensors"),
    )
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
