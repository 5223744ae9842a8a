"""Prompt files that never lose work and never half-apply.

* Crash safety: a save that dies (an injected exception after the temporary
  file is written, or half-way through, or the writing process killed with
  SIGKILL at random moments) leaves the previous file loadable and unchanged.
* Bad files raise ``ph.CheckpointError`` naming the problem: truncated files,
  any flipped bit (hypothesis), pickle files (never unpickled: a tripwire object
  would leave a file), other safetensors files, self-inconsistent files. A file for
  a model with another hidden size, layer count, KV heads, head size or
  vocabulary is refused at attach, naming the differences, and the model stays
  bit-identical.
* Resume: N steps, save, a fresh process loads and trains N more, equals 2N
  steps in one go, bit for bit (a table, a P-tuning LSTM encoder, a prefix MLP;
  AdamW and a schedule).
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import prompthooks as ph
from prompthooks import io
from prompthooks.methods import PromptTable
from tests.resume_job import METHODS
from tests.support.models import MAX_POSITIONS, VOCAB, same_snapshot, snapshot, tiny

# File and workflow tests: the same on every kernel path; they run in the torch pass
# and the Triton pass deselects them (-m "not workflow").
pytestmark = pytest.mark.workflow

HERE = Path(__file__).resolve().parent


def tables(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def same_tables(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def saved(tmp_path: Path, spec: Any = None, name: str = "prompt.safetensors") -> Path:
    """A real file written by ``att.save`` from a tiny LLaMA."""
    model = tiny("llama")
    torch.manual_seed(5)
    with ph.attach(model, spec or {"a": ph.PromptTuning(3), "b": ph.PrefixTuning(2)}) as att:
        att.save(tmp_path / name)
    return tmp_path / name


# -- crash safety ---------------------------------------------------------------


def test_exception_after_the_temporary_file_is_written_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = saved(tmp_path)
    before_bytes = path.read_bytes()
    written: list[bytes] = []

    def crash(src: str, dst: str) -> None:
        written.append(Path(src).read_bytes())  # the new content is complete on disk ...
        raise OSError("simulated crash before the rename")  # ... and then we die

    monkeypatch.setattr(io.os, "replace", crash)
    model = tiny("llama")
    with ph.attach(model, ph.PromptTuning(7)) as att, pytest.raises(OSError, match="simulated"):
        att.save(path)
    assert written and written[0] != before_bytes
    assert path.read_bytes() == before_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no stray temporary
    monkeypatch.undo()
    assert ph.load(path)["a"].num_virtual_tokens == 3


def test_exception_while_writing_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = saved(tmp_path)
    before_bytes = path.read_bytes()

    real_fdopen = io.os.fdopen

    class TornFile:
        """Writes the first half of what it is given, then fails."""

        def __init__(self, fd: int, mode: str) -> None:
            self.file = real_fdopen(fd, mode)

        def __enter__(self) -> TornFile:
            return self

        def __exit__(self, *exc: object) -> None:
            self.file.close()

        def write(self, data: bytes) -> None:
            self.file.write(data[: len(data) // 2])
            raise MemoryError("simulated failure half-way through")

    monkeypatch.setattr(io.os, "fdopen", TornFile)
    with pytest.raises(MemoryError):
        ph.attach(tiny("gpt2"), ph.PromptTuning(2)).save(path)
    assert path.read_bytes() == before_bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


WRITER = """
import sys, torch
from prompthooks import io
from prompthooks.methods import PromptTable
path = sys.argv[1]
for version in range(1, 10**6):
    io.save({"default": PromptTable(torch.full((256, 2048), float(version)))}, path)
    print(version, flush=True)
"""


def _kill_writers_and_check(script: str, path: Path, seed: int) -> None:
    """Start ``script`` saving to ``path`` twice, SIGKILL it at a random moment each
    time, and check the file is one whole version: the last the writer reported
    finished, or the one after. No stray temporary file is ever read."""
    io.save({"default": PromptTable(torch.zeros(256, 2048))}, path)
    rng = torch.Generator().manual_seed(seed)
    for _ in range(2):
        writer = subprocess.Popen(
            [sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True
        )
        assert writer.stdout is not None
        finished = int(writer.stdout.readline())  # at least one save completed
        time.sleep(float(torch.rand((), generator=rng)) * 0.2)
        writer.send_signal(signal.SIGKILL)
        rest = writer.stdout.read().split()
        assert writer.wait() == -signal.SIGKILL  # killed, not stopped by its own check
        finished = int(rest[-1]) if rest else finished
        table = ph.load(path)["default"].table()  # (``ph.load`` refuses NaN)
        value = float(table[0, 0].detach())
        assert torch.equal(table, torch.full_like(table, value))  # one version, whole
        assert finished <= value <= finished + 1
    stray = sorted(p.name for p in path.parent.iterdir() if p != path)
    assert all(n.startswith(".prompt.safetensors.") for n in stray), stray  # never read


def test_killing_the_writer_at_any_moment_leaves_a_whole_file(tmp_path: Path) -> None:
    """A process saves 2 MB files in a loop and is killed with SIGKILL at a
    random moment: the file is always a whole, earlier version."""
    _kill_writers_and_check(WRITER, tmp_path / "prompt.safetensors", seed=0)


REFUSED_WRITER = """
import sys, torch
from prompthooks import io
from prompthooks.io import CheckpointError
from prompthooks.methods import PromptTable
path = sys.argv[1]
for version in range(1, 10**6):
    io.save({"default": PromptTable(torch.full((256, 2048), float(version)))}, path)
    print(version, flush=True)
    diverged = torch.full((256, 2048), float(version + 1))
    diverged[-1, -1] = float("nan")
    try:
        io.save({"default": PromptTable(diverged)}, path)
    except CheckpointError:
        pass
    else:
        raise SystemExit("a non-finite prompt was saved")
"""


def test_killing_a_writer_between_good_and_refused_saves_leaves_the_last_good_file(
    tmp_path: Path,
) -> None:
    """A process alternates good saves with saves of a diverged (NaN) prompt,
    which are refused, and is killed with SIGKILL at random moments: the file
    always loads (``ph.load`` refuses NaN) as one whole good version."""
    _kill_writers_and_check(REFUSED_WRITER, tmp_path / "prompt.safetensors", seed=1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_prompt_never_replaces_a_good_file(tmp_path: Path, bad: float) -> None:
    """A diverged prompt is refused by ``att.save`` (the good file stays, bit for
    bit), written only when asked, and refused by ``ph.load`` all the same."""
    path = tmp_path / "prompt.safetensors"
    model = tiny("llama")
    before = snapshot(model)
    with ph.attach(model, ph.PrefixTuning(3)) as att:
        att.save(path)
        good = path.read_bytes()
        with torch.no_grad():
            next(att.parameters())[0, 0] = bad
        with pytest.raises(ph.CheckpointError, match="NaN or inf.*left as it was"):
            att.save(path)
        assert path.read_bytes() == good
        assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no stray file
        att.save(path, allow_non_finite=True)
    assert same_snapshot(before, snapshot(model))
    with pytest.raises(ph.CheckpointError, match="NaN or inf.*diverged"):
        ph.load(path)


def test_loads_racing_saves_read_one_whole_version(tmp_path: Path) -> None:
    """Two processes save to one path in a loop while this one loads it: every
    load reads one consistent version (the file is read once), never a
    spurious checksum error."""
    path = tmp_path / "prompt.safetensors"
    io.save({"default": PromptTable(torch.zeros(256, 2048))}, path)
    writers = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    loads = 0
    try:
        for writer in writers:
            assert writer.stdout is not None
            writer.stdout.readline()  # both are saving
        # A number of loads, not a time window: a busy machine makes each slower.
        while loads < 60:
            table = ph.load(path)["default"].table()
            assert torch.equal(table, torch.full_like(table, float(table[0, 0])))
            loads += 1
        assert all(w.poll() is None for w in writers)  # both were saving throughout
    finally:
        for writer in writers:
            writer.kill()
            writer.wait()


def test_saving_through_a_symlink_writes_its_target(tmp_path: Path) -> None:
    """As ``torch.save`` does: the link stays a link, its target gets the file."""
    target = saved(tmp_path)
    link = tmp_path / "latest.safetensors"
    link.symlink_to(target.name)
    model = tiny("llama")
    with ph.attach(model, ph.PromptTuning(5)) as att:
        att.save(link)
    assert link.is_symlink() and os.readlink(link) == target.name
    assert ph.load(target)["default"].num_virtual_tokens == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, link.name])


def test_a_save_error_names_the_users_path_not_the_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "prompt.safetensors"
    path.mkdir()  # a folder where the file should go: the rename over it fails
    model = tiny("llama")
    with ph.attach(model, ph.PromptTuning(2)) as att, pytest.raises(OSError) as info:
        att.save(path)
    message = str(info.value)
    assert f"cannot save {path}" in message and "directory" in message
    assert ".tmp" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no stray temporary


# -- bad files --------------------------------------------------------------------


@pytest.mark.parametrize("keep", [0, 5, 8, 40, -1, -100])
def test_truncated_file_is_refused(tmp_path: Path, keep: int) -> None:
    path = saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:keep])
    with pytest.raises(ph.CheckpointError, match="truncated, corrupted"):
        ph.load(path)


@functools.cache
def clean() -> tuple[Path, bytes, dict[str, torch.Tensor]]:
    """One good file (two prompts: a table and a prefix), its bytes and tensors."""
    path = saved(Path(tempfile.mkdtemp(prefix="prompthooks-clean-")))
    return path, path.read_bytes(), tables(path)


@settings(max_examples=60)
@given(where=st.floats(0, 1, exclude_max=True), bit=st.integers(0, 7))
def test_any_flipped_bit_is_refused_or_harmless(where: float, bit: int) -> None:
    """A flipped bit anywhere is caught (bad header, checksum) or lands in
    padding and changes nothing: never a silently different prompt."""
    path, data, expected = clean()
    flipped = bytearray(data)
    at = int(where * len(flipped))
    flipped[at] ^= 1 << bit
    target = path.with_name("flipped.safetensors")
    target.write_bytes(bytes(flipped))
    try:
        prompts = ph.load(target)
    except ph.CheckpointError:
        return
    got = {f"{n}.{k}": v for n, p in prompts.items() for k, v in p.state_dict().items()}
    assert same_tables(got, expected)


class Tripwire:
    """Unpickling this object creates a file: proof that a loader unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Path.touch, (self.marker,))


def test_pickle_files_are_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "unpickled"
    for name in ("prompt.safetensors", "prompt.pt"):
        (tmp_path / name).write_bytes(pickle.dumps({"default.weight": Tripwire(marker)}))
        with pytest.raises(ph.CheckpointError, match="pickle files are never read"):
            ph.load(tmp_path / name)
    torch.save({"weight": torch.zeros(2, 32)}, tmp_path / "torch.bin")
    with pytest.raises(ph.CheckpointError):
        ph.load(tmp_path / "torch.bin")
    assert not marker.exists()


def test_other_safetensors_files_are_named_not_ours(tmp_path: Path) -> None:
    save_file({"prompt_embeddings": torch.zeros(4, 32)}, str(tmp_path / "adapter.safetensors"))
    with pytest.raises(ph.CheckpointError, match=r"not a prompthooks file.*ph\.load_peft"):
        ph.load(tmp_path / "adapter.safetensors")
    with pytest.raises(FileNotFoundError, match="no prompt file"):
        ph.load(tmp_path / "missing.safetensors")


def rewrite(path: Path, edit: Any) -> None:
    """Change a saved file's config and tensors, with a valid checksum, to
    reach the checks behind it."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["config"])
        found = {k: f.get_tensor(k) for k in f.keys()}
    edit(meta, found)
    config = json.dumps(meta)
    metadata = {"format": io.FORMAT, "config": config, "sha256": io._digest(config, found)}
    save_file(found, str(path), metadata=metadata)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m, t: t.update({"a.weight": torch.zeros(3, 31)}), r"a\.weight|weight has shape"),
        (lambda m, t: t.pop("a.weight"), "missing weight"),
        (lambda m, t: t.update({"c.weight": torch.zeros(1)}), r"no listed prompt: \['c\.weight'\]"),
        (lambda m, t: t.update({"a.bias": torch.zeros(1)}), "unexpected bias"),
        (lambda m, t: m["prompts"]["a"].update(method="lora"), "unknown method 'lora'"),
        (lambda m, t: m["prompts"]["b"].pop("site_shapes"), "lacks the field .site_shapes."),
        (lambda m, t: m["prompts"]["a"].update(num_virtual_tokens=4), "config says"),
        (lambda m, t: t.update({"a.weight": torch.zeros(3, 32, dtype=torch.int64)}), "int64"),
        (lambda m, t: m.update(prompts={}), "no prompts"),
    ],
)
def test_inconsistent_file_is_refused_naming_the_problem(
    tmp_path: Path, edit: Any, match: str
) -> None:
    path = saved(tmp_path)
    rewrite(path, edit)
    with pytest.raises(ph.CheckpointError, match=match):
        ph.load(path)


def test_a_bad_file_never_reaches_the_model(tmp_path: Path) -> None:
    path = saved(tmp_path)
    path.write_bytes(path.read_bytes()[:-3])
    model = tiny("llama")
    before = snapshot(model)
    with pytest.raises(ph.CheckpointError):
        ph.attach(model, ph.load(path))
    assert same_snapshot(before, snapshot(model))


def test_files_of_the_first_format_still_load(tmp_path: Path) -> None:
    """0.1-0.2 wrote ``prompthooks/1``: no checksum, no model record."""
    table = torch.randn(3, 32)
    config = {
        "prompts": {
            "default": {"method": "prompt_tuning", "num_virtual_tokens": 3, "hidden_size": 32}
        }
    }
    save_file(
        {"default.weight": table},
        str(tmp_path / "old.safetensors"),
        metadata={"format": "prompthooks/1", "config": json.dumps(config)},
    )
    (prompt,) = ph.load(tmp_path / "old.safetensors").values()
    assert prompt.trained_for is None and torch.equal(prompt.table(), table)


def test_edited_file_without_a_new_checksum_is_corrupted(tmp_path: Path) -> None:
    path = saved(tmp_path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        found = {k: f.get_tensor(k) for k in f.keys()}
    found["a.weight"] = found["a.weight"] + 1
    save_file(found, str(path), metadata=metadata)
    with pytest.raises(ph.CheckpointError, match="checksum"):
        ph.load(path)


@pytest.mark.parametrize("relabel", ["prompthooks/1", None])
def test_a_file_relabelled_as_the_first_format_keeps_its_checksum(
    tmp_path: Path, relabel: str | None
) -> None:
    """Old files may load without a checksum, but a file that has one is checked
    whatever its format says; a format-2 file without one is refused."""
    path = saved(tmp_path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
        found = {k: f.get_tensor(k) for k in f.keys()}
    found["a.weight"] = found["a.weight"] + 1
    if relabel is None:  # format 2 with its checksum removed
        del metadata["sha256"]
    else:
        metadata["format"] = relabel
    save_file(found, str(path), metadata=metadata)
    with pytest.raises(ph.CheckpointError, match="checksum"):
        ph.load(path)


def _edited(tmp_path: Path, spec: Any, prompt: str, edit: Callable[[dict[str, Any]], None]) -> Path:
    """A saved file whose config was edited by hand, its checksum recomputed to match."""
    path = saved(tmp_path, spec)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata())
        found = {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(metadata["config"])
    edit(meta["prompts"][prompt])
    metadata["config"] = json.dumps(meta, sort_keys=True)
    metadata["sha256"] = io._digest(metadata["config"], found)
    save_file(found, str(path), metadata=metadata)
    return path


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(config: dict[str, Any]) -> None:
        config[key] = value

    return edit


def _set_in(outer: str, key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(config: dict[str, Any]) -> None:
        config[outer][key] = value

    return edit


HAND_EDITS: list[tuple[str, Callable[[], Any], Callable[[dict[str, Any]], None], str]] = [
    (
        "prompt-zero",
        lambda: ph.PromptTuning(3),
        _set("num_virtual_tokens", 0),
        "num_virtual_tokens",
    ),
    (
        "prompt-neg",
        lambda: ph.PromptTuning(3),
        _set("num_virtual_tokens", -2),
        "num_virtual_tokens",
    ),
    (
        "prompt-str",
        lambda: ph.PromptTuning(3),
        _set("num_virtual_tokens", "3"),
        "num_virtual_tokens",
    ),
    ("prompt-bool", lambda: ph.PromptTuning(3), _set("hidden_size", True), "hidden_size"),
    ("prompt-size", lambda: ph.PromptTuning(3), _set("num_virtual_tokens", 4), "shape"),
    ("prompt-missing", lambda: ph.PromptTuning(3), lambda c: c.pop("hidden_size"), "hidden_size"),
    (
        "prefix-shift",
        lambda: ph.PrefixTuning(2),
        _set("shift_positions", "false"),
        "shift_positions",
    ),
    ("prefix-sites", lambda: ph.PrefixTuning(2), _set("site_shapes", [[2, 0]]), "head_dim"),
    ("prefix-sites-shape", lambda: ph.PrefixTuning(2), _set("site_shapes", [3]), "site_shapes"),
    (
        "prefix-mlp",
        lambda: ph.PrefixTuning(2),
        _set_in("projection", "hidden_size", 0),
        "hidden_size",
    ),
    (
        "prefix-mlp-size",
        lambda: ph.PrefixTuning(2),
        _set_in("projection", "hidden_size", 7),
        "shape",
    ),
    ("ptuning-dropout", lambda: ph.PTuning(2), _set("dropout", 1.0), "dropout"),
    ("ptuning-dropout-neg", lambda: ph.PTuning(2), _set("dropout", -0.1), "dropout"),
    ("ptuning-encoder", lambda: ph.PTuning(2), _set("encoder", "gru"), "encoder"),
    ("ptuning-layers", lambda: ph.PTuning(2), _set("num_layers", "2"), "num_layers"),
]


@pytest.mark.parametrize(
    ("spec", "edit", "field"), [h[1:] for h in HAND_EDITS], ids=[h[0] for h in HAND_EDITS]
)
def test_hand_edited_configs_are_refused_naming_the_field(
    tmp_path: Path, spec: Callable[[], Any], edit: Callable[[dict[str, Any]], None], field: str
) -> None:
    """The checksum matches (recomputed after the edit), so only the loader's own
    checks stand between the file and a later RuntimeError in the forward."""
    path = _edited(tmp_path, spec(), "default", edit)
    with pytest.raises(ph.CheckpointError, match=field):
        ph.load(path)


def llama(**changes: int) -> torch.nn.Module:
    settings_ = dict(
        num_hidden_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=MAX_POSITIONS,
    )
    settings_.update(changes)
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(tf.LlamaConfig(**settings_)).eval()


@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.parametrize(
    "changes, match",
    [
        ({"hidden_size": 48, "num_attention_heads": 4}, r"hidden size 32 vs 48"),
        ({"num_hidden_layers": 3}, r"attention layers 2 self vs 3 self"),
        ({"num_key_value_heads": 4}, r"KV heads 2 vs 4"),
        ({"hidden_size": 64, "num_attention_heads": 4}, r"head size 8 vs 16"),
        ({"vocab_size": VOCAB + 10}, rf"vocabulary {VOCAB} vs {VOCAB + 10}"),
    ],
)
def test_file_for_another_model_names_the_shapes_and_leaves_it_unchanged(
    tmp_path: Path, method: str, changes: dict[str, int], match: str
) -> None:
    spec = ph.PromptTuning(3) if method == "prompt" else ph.PrefixTuning(2, hidden_size=8)
    with ph.attach(llama(), spec) as att:
        att.save(tmp_path / "p.safetensors")
    other = llama(**changes)
    before = snapshot(other)
    prompts = ph.load(tmp_path / "p.safetensors")  # the file itself is fine
    with pytest.raises(ValueError, match=match) as info:
        ph.attach(other, prompts)
    assert "token embedding" in str(info.value)
    assert same_snapshot(before, snapshot(other))


def test_the_model_check_can_be_waived_for_a_compatible_variant(tmp_path: Path) -> None:
    with ph.attach(llama(), ph.PromptTuning(3)) as att:
        att.save(tmp_path / "p.safetensors")
    variant = llama(vocab_size=VOCAB + 2)  # e.g. two tokens added to the vocabulary
    prompts = ph.load(tmp_path / "p.safetensors")
    with pytest.raises(ValueError, match="vocabulary"):
        ph.attach(variant, prompts)
    prompts["default"].trained_for = None
    with ph.attach(variant, prompts) as att:
        assert torch.equal(
            att.prompts["default"].weight, tables(tmp_path / "p.safetensors")["default.weight"]
        )


def test_corrupted_peft_adapter_is_refused(tmp_path: Path) -> None:
    model = tiny("gpt2")
    with ph.attach(model, ph.PromptTuning(3)) as att:
        att.save_peft(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])
    with pytest.raises(ph.CheckpointError, match="truncated"):
        ph.load_peft(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(ph.CheckpointError, match="adapter_config.json"):
        ph.load_peft(tmp_path)


# -- resume -------------------------------------------------------------------------


def test_resume_in_a_fresh_process_equals_training_straight_through(tmp_path: Path) -> None:
    """N steps, save, a new process loads and trains N more == 2N steps, bit for bit,
    for a table, a P-tuning LSTM encoder and a prefix MLP (their weights are saved)."""
    job = [sys.executable, str(HERE / "resume_job.py")]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]),
    }
    straight = subprocess.Popen([*job, "straight", str(tmp_path), "3"], env=env)
    subprocess.run([*job, "first", str(tmp_path), "3"], env=env, check=True)
    subprocess.run([*job, "second", str(tmp_path), "3"], env=env, check=True)
    assert straight.wait() == 0
    for method in METHODS:
        first = tables(tmp_path / f"{method}.first.safetensors")
        resumed = tables(tmp_path / f"{method}.second.safetensors")
        through = tables(tmp_path / f"{method}.straight.safetensors")
        assert same_tables(resumed, through), method
        assert not same_tables(first, through), method  # the second half did train
        assert len(first) > 1 or method == "prompt_tuning"  # encoder weights are in the file
