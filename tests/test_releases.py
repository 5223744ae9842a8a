"""The supported transformers range and the extras hold on environments of their own.

The suite runs on the release the README's command installs (the newest in
the range, pinned in ``.ci/constraints.txt``). These tests cover the rest of
what ``pyproject.toml`` promises, each in a virtual environment kept under the
prompthooks cache (``$PROMPTHOOKS_CACHE/venvs``) and rebuilt when the files
that define it change:

* the oldest supported release: an environment layered over this one
  (it sees this one's packages) with only ``transformers`` replaced by the
  declared lower bound, where every test marked ``oldest_release`` (each
  family's Prompt Tuning and prefix oracles with padding, and the
  call-convention tests) must pass;
* the ``demo`` extra alone: a new, empty environment with
  ``pip install -e ".[demo]"``, where the demo's model-loading path
  (``integrations/gguf_check.py``: a tiny GGUF file written with the ``gguf``
  package, converted and loaded as the demo loads SmolLM2) must work.

They install from the package registry (pip's cache makes reruns fast).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

pytestmark = pytest.mark.workflow  # environments, not kernels: the torch pass only

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / ".ci" / "constraints.txt"
OLDEST_CONSTRAINTS = ROOT / ".ci" / "constraints-oldest.txt"


def _requirement(name: str) -> str:
    """``name``'s requirement in ``[project] dependencies`` (read as text: Python 3.10
    has no tomllib)."""
    text = (ROOT / "pyproject.toml").read_text()
    block = text.split("dependencies = [", 1)[1].split("]", 1)[0]
    found = re.findall(rf'"({name}[^"]*)"', block)
    assert len(found) == 1, found
    return str(found[0])


def oldest_transformers() -> str:
    """The lower bound ``pyproject.toml`` declares for transformers."""
    match = re.search(r">=\s*([\d.]+)", _requirement("transformers"))
    assert match, "pyproject.toml must give transformers a lower bound"
    return match.group(1)


def _pinned(constraints: Path, package: str) -> str:
    for line in constraints.read_text().splitlines():
        if line.startswith(f"{package}=="):
            return line.split("==", 1)[1]
    raise AssertionError(f"{constraints.name} does not pin {package}")


def _cache() -> Path:
    env = os.environ.get("PROMPTHOOKS_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "prompthooks") / "venvs"


def _environment(name: str, recipe: list[Path], layered: bool, install: list[str]) -> Path:
    """The python of a venv under the cache that ``pip install <install>`` made,
    made anew when the files in ``recipe``, this environment or this checkout changed.

    ``layered``: the venv also sees this environment's packages, after its own
    (a ``.pth`` file that adds this environment's site-packages; unlike
    ``--system-site-packages`` it works when this environment is a venv too).
    """
    parents = [p for p in site.getsitepackages() if Path(p).is_dir()] if layered else []
    # An editable install points at this checkout: another checkout gets its own.
    digest = hashlib.sha256(f"{sys.version}\n{sys.prefix}\n{ROOT}".encode())
    for path in recipe:
        digest.update(path.read_bytes())
    folder = _cache() / name
    marker = folder / "prompthooks-recipe.txt"
    python = folder / "bin" / "python"
    if marker.is_file() and marker.read_text() == digest.hexdigest() and python.exists():
        return python
    shutil.rmtree(folder, ignore_errors=True)
    venv.EnvBuilder(with_pip=True).create(folder)
    if parents:
        own = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"])
        lines = [f"import site; site.addsitedir({p!r})" for p in parents]
        (Path(own.stdout.strip()) / "_prompthooks_parent.pth").write_text("\n".join(lines) + "\n")
    _run([str(python), "-m", "pip", "install", "-q", *install])
    marker.write_text(digest.hexdigest())  # only once the install succeeded
    return python


def _run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PROMPTHOOKS_KERNELS"}  # the torch path
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    done = subprocess.run(  # noqa: S603 (our own interpreter and arguments)
        command, cwd=ROOT, env=env, capture_output=True, text=True, **kwargs
    )
    output = f"{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    assert done.returncode == 0, f"{' '.join(command)} exited {done.returncode}:\n{output}"
    return done


def _version_in(python: Path, module: str) -> str:
    code = f"import {module}; print({module}.__version__)"
    return _run([str(python), "-c", code]).stdout.strip()


def test_the_constraints_pin_what_pyproject_declares() -> None:
    """The tested sets are inside the declared range: newest for the README's
    commands, the lower bound itself for the oldest pass."""
    from packaging.specifiers import SpecifierSet

    declared = SpecifierSet(_requirement("transformers").removeprefix("transformers"))
    newest, oldest = (
        _pinned(CONSTRAINTS, "transformers"),
        _pinned(OLDEST_CONSTRAINTS, "transformers"),
    )
    assert newest in declared and oldest in declared
    assert oldest == oldest_transformers()
    assert _pinned(CONSTRAINTS, "torch") == _pinned(OLDEST_CONSTRAINTS, "torch") == "2.13.0"


def test_family_oracles_pass_on_the_oldest_supported_release() -> None:
    oldest = oldest_transformers()
    python = _environment(
        f"transformers-{oldest}",
        [OLDEST_CONSTRAINTS, ROOT / "pyproject.toml"],
        layered=True,  # this environment's packages, but for transformers
        install=["-c", str(OLDEST_CONSTRAINTS), f"transformers=={oldest}"],
    )
    assert _version_in(python, "transformers") == oldest
    where = _run([str(python), "-c", "import prompthooks; print(prompthooks.__file__)"])
    assert Path(where.stdout.strip()).is_relative_to(ROOT)  # this checkout's code
    done = _run([str(python), "-m", "pytest", "-m", "oldest_release", "-p", "no:cacheprovider"])
    summary = [line for line in done.stdout.splitlines() if " passed" in line][-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 100 and "failed" not in summary, summary


def test_demo_extra_alone_loads_a_gguf_model() -> None:
    python = _environment(
        "demo-only",
        [CONSTRAINTS, ROOT / "pyproject.toml"],
        layered=False,
        install=["-c", str(CONSTRAINTS), "-e", ".[demo]"],
    )
    installed = _run([str(python), "-m", "pip", "list", "--format=freeze"]).stdout
    for extra in ("pytest", "peft", "hypothesis", "triton"):  # from other extras only
        assert f"\n{extra}==" not in f"\n{installed}", f"{extra} leaked into the demo environment"
    done = _run([str(python), "integrations/gguf_check.py"])
    assert "logits equal the original model's" in done.stdout
    assert "detaches bit for bit" in done.stdout
