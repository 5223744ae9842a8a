"""Reading and writing prompts: our own safetensors format and PEFT adapters.

Only safetensors and JSON are read: no pickle, no remote code.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes

from .locators.base import Located
from .methods.base import SoftPrompt
from .methods.p_tuning import PTuningPrompt
from .methods.prefix_tuning import Prefix
from .methods.prompt_tuning import PromptTable

#: The file layout's own version, not the library's (``prompthooks.__version__``):
#: it changes only when the layout does, and files of every earlier layout still load.
FORMAT = "prompthooks/2"
#: Files written by prompthooks 0.1.0 and 0.2.0: no checksum and no model record.
LEGACY_FORMATS = ("prompthooks/1",)

_METHODS: dict[str, type[SoftPrompt]] = {
    cls.method: cls for cls in (PromptTable, PTuningPrompt, Prefix)
}


class CheckpointError(ValueError):
    """A prompt file that cannot be used: truncated, corrupted, not a
    prompthooks file, or inconsistent with itself. Raised before any model
    is touched."""


def _digest(config: str, tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the config text and every tensor's name, dtype, shape and
    bytes: a corrupted byte anywhere is found at load, not trained on."""
    h = hashlib.sha256(config.encode())
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous().cpu()
        h.update(f"\0{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(ctypes.string_at(t.data_ptr(), t.numel() * t.element_size()))
    return h.hexdigest()


def atomic_write(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temporary file next to ``path``, flush it to disk,
    then rename it over ``path`` in one step. If anything fails or the process
    dies first, ``path`` keeps its previous content (a stray ``.{name}.*.tmp``
    may remain after a hard kill; it is never read).

    The bytes are written here, not by a library's own file writer: safetensors
    0.8 writes through a temporary file of its own (``.tmpXXXXXX``), which a
    kill would leave behind under a name nobody cleans up.

    A symbolic link is written through: its target gets the new content and
    the link stays (as ``torch.save`` does). An ``OSError`` names ``path``, the
    file the caller asked for, never the temporary file."""
    given = Path(path)
    path = Path(os.path.realpath(given))  # a link's target (the path itself otherwise)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _mode_for(path))  # mkstemp makes it private (0600)
        os.replace(tmp, path)
        _fsync_directory(path.parent)  # make the rename itself durable
    except OSError as error:
        message = f"cannot save {given}: {error.strerror or error}"
        if error.errno is None:
            raise type(error)(message) from error
        raise type(error)(error.errno, message) from error
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _mode_for(path: Path) -> int:
    """Keep an existing file's permissions; new files get the usual 0666 & ~umask."""
    if path.exists():
        return stat.S_IMODE(path.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms where a directory cannot be opened (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save(
    prompts: dict[str, SoftPrompt],
    path: str | Path,
    located: Located | None = None,
    *,
    allow_non_finite: bool = False,
) -> None:
    """Write prompts, their config, a checksum and a record of the model to one
    safetensors file, atomically: a crash mid-save leaves the old file intact.

    A prompt holding NaN or inf (a diverged run) is not written, so it never
    replaces a good file, unless ``allow_non_finite`` says to (``ph.load``
    refuses such a file all the same).

    Prompts sharded by FSDP (``fully_shard``) are gathered first, which is a
    collective: call ``att.save`` on every rank; rank 0 writes the file."""
    states = {f"{n}.{k}": v for n, p in prompts.items() for k, v in p.state_dict().items()}
    sharded = any(_is_dtensor(v) for v in states.values())
    tensors = {key: _full(value).detach().contiguous().cpu() for key, value in states.items()}
    if sharded and torch.distributed.get_rank() != 0:
        return
    diverged = _non_finite(tensors)
    if diverged and not allow_non_finite:
        raise CheckpointError(
            f"not saved: the prompts hold NaN or inf values ({', '.join(diverged)}), so "
            f"{path} was left as it was. Training diverged (lower the learning rate, or "
            "use gradient clipping); att.save(path, allow_non_finite=True) writes them anyway."
        )
    meta: dict[str, Any] = {"prompts": {n: p.config() for n, p in prompts.items()}}
    if located is not None:
        meta["model"] = located.fingerprint()
    config = json.dumps(meta, sort_keys=True)
    metadata = {"format": FORMAT, "config": config, "sha256": _digest(config, tensors)}
    atomic_write(path, save_bytes(tensors, metadata=metadata))


def _is_dtensor(value: torch.Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _full(value: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP shard (every rank must take part)."""
    if _is_dtensor(value):
        full: torch.Tensor = value.full_tensor()  # type: ignore[attr-defined]
        return full
    return value


def load(path: str | Path) -> dict[str, SoftPrompt]:
    """Read prompts written by ``att.save``; attach the result with ``ph.attach``.

    Everything is checked before anything is returned: the file is complete
    safetensors, its checksum matches, and every tensor has exactly the shape
    its config says. Attaching then checks the model (see ``trained_for``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no prompt file at {path}")
    # Read once, then parse the bytes: a save that replaces the file meanwhile
    # cannot mix two versions into one load.
    data = path.read_bytes()
    try:
        metadata = _metadata(data)
        tensors = load_bytes(data)
    except Exception as e:  # safetensors reports every bad header its own way
        raise CheckpointError(
            f"{path} cannot be read as a safetensors file: it is truncated, corrupted or "
            f"another format (pickle files are never read). Reader said: {e}"
        ) from e
    found = metadata.get("format")
    if found != FORMAT and found not in LEGACY_FORMATS:
        hint = " A PEFT adapter directory loads with ph.load_peft(directory)." if not found else ""
        raise CheckpointError(f"{path} is not a prompthooks file (format {found!r}).{hint}")
    config = metadata.get("config", "")
    # Format 2 always has a checksum; wherever one exists it is checked, whatever
    # the format says (a file relabelled as format 1 does not skip it).
    checked = found == FORMAT or "sha256" in metadata
    if checked and metadata.get("sha256") != _digest(config, tensors):
        raise CheckpointError(
            f"{path} is corrupted: its checksum does not match its contents "
            "(changed after it was written). Use an earlier copy."
        )
    diverged = _non_finite(tensors)
    if diverged:
        raise CheckpointError(
            f"{path} holds NaN or inf values ({', '.join(diverged)}): it was saved from a "
            "diverged run. Use an earlier file."
        )
    try:
        meta = json.loads(config)
        entries = dict(meta["prompts"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} has an unreadable config: {e}") from e
    if not entries:
        raise CheckpointError(f"{path} holds no prompts")
    claimed = {k for k in tensors if k.split(".", 1)[0] in entries}
    if claimed != set(tensors):
        raise CheckpointError(
            f"{path} holds tensors of no listed prompt: {sorted(set(tensors) - claimed)}"
        )
    prompts = {name: _rebuild(path, name, config, tensors) for name, config in entries.items()}
    for prompt in prompts.values():
        prompt.trained_for = meta.get("model")
    return prompts


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header (8-byte little-endian
    length, then JSON)."""
    length = int.from_bytes(data[:8], "little")
    if len(data) < 8 or length > len(data) - 8:
        raise ValueError("the header is longer than the file")
    header = json.loads(data[8 : 8 + length])
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    found = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in dict(found).items()}


def _non_finite(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating tensors that hold NaN or inf."""
    return [
        name
        for name, t in tensors.items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]


def _rebuild(path: Path, name: str, config: Any, tensors: dict[str, torch.Tensor]) -> SoftPrompt:
    """Build prompt ``name`` from its config and check the file's tensors
    against the built module's own state dict, name by name and shape by shape."""
    method = config.get("method") if isinstance(config, dict) else None
    if method not in _METHODS:
        raise CheckpointError(
            f"{path}: prompt {name!r} has unknown method {method!r} (known: {sorted(_METHODS)})"
        )
    try:
        prompt = _METHODS[method].from_config(config)
    except KeyError as e:
        raise CheckpointError(f"{path}: prompt {name!r} lacks the field {e}") from e
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: prompt {name!r} has a bad {method} config: {e}") from e
    own = {k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")}
    expected = prompt.state_dict()
    problems = [f"missing {k}" for k in expected if k not in own]
    problems += [f"unexpected {k}" for k in own if k not in expected]
    problems += [
        f"{k} has shape {tuple(own[k].shape)}, its config says {tuple(v.shape)}"
        for k, v in expected.items()
        if k in own and own[k].shape != v.shape
    ]
    problems += [
        f"{k} is {own[k].dtype}, not floating point"
        for k in expected
        if k in own and not own[k].is_floating_point()
    ]
    if problems:
        raise CheckpointError(
            f"{path}: prompt {name!r} does not match its config: " + "; ".join(problems)
        )
    prompt.load_state_dict(own, strict=True)
    return prompt


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
    try:
        config = json.loads(config_file.read_text())
        peft_type = config.get("peft_type")
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"{config_file} is not a readable PEFT adapter config: {e!r}") from e
    if peft_type not in ("PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"):
        raise ValueError(
            f"{directory}: peft_type {peft_type!r} is not supported "
            "(PROMPT_TUNING, P_TUNING and PREFIX_TUNING are)"
        )
    try:
        n = int(config["num_virtual_tokens"])
        submodules = int(config.get("num_transformer_submodules") or 1)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{config_file}: bad or missing num_virtual_tokens: {e!r}") from e
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            keys = set(f.keys())
            table: torch.Tensor | None = (
                f.get_tensor("prompt_embeddings") if "prompt_embeddings" in keys else None
            )
    except Exception as e:  # safetensors reports every bad header its own way
        raise CheckpointError(
            f"{weights_file} cannot be read as a safetensors file: it is truncated, "
            f"corrupted or another format. Reader said: {e}"
        ) from e
    if table is None:
        raise CheckpointError(f"{weights_file} has no 'prompt_embeddings' tensor")
    if not table.is_floating_point():
        raise CheckpointError(f"{weights_file}: prompt_embeddings is {table.dtype}")
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
    """Write ``prompt`` as a PEFT prompt-learning adapter (see ``Attachment.save_peft``).

    PEFT stores only the encoder's output, so P-tuning prompts are written as
    P_TUNING adapters holding their exported table; PEFT loads them for
    inference (its encoder is not rebuilt in inference mode)."""
    p_tuning = prompt.settings if isinstance(prompt, PTuningPrompt) else None
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
            token_dim=prompt.hidden_size,
            num_transformer_submodules=submodules,
        )
        if p_tuning is None:
            config.update(peft_type="PROMPT_TUNING", prompt_tuning_init="RANDOM")
        else:
            config.update(
                peft_type="P_TUNING",
                encoder_reparameterization_type=str(p_tuning["encoder"]).upper(),
                encoder_hidden_size=int(p_tuning["encoder_hidden_size"]),
                encoder_num_layers=int(p_tuning["num_layers"]),
                encoder_dropout=float(p_tuning["dropout"]),
            )
        # Seq2seq adapters hold 2P rows; PEFT feeds the encoder the first P.
        table = prompt.table().repeat(submodules, 1)
    else:
        raise ValueError(f"{type(prompt).__name__} prompts have no PEFT format")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # Each file is replaced atomically, weights first: a crash leaves whole files.
    weights = {"prompt_embeddings": table.detach().float().contiguous().cpu()}
    atomic_write(directory / "adapter_model.safetensors", save_bytes(weights))
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(directory / "adapter_config.json", text.encode("utf-8"))
