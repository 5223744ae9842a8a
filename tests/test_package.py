"""What the package says about itself: one version, a light import, what the checkout tracks."""

from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
from packaging.version import Version

import prompthooks as ph

pytestmark = pytest.mark.workflow  # packaging, not kernels: the torch pass only

ROOT = Path(__file__).resolve().parents[1]


def _editable_source() -> Path | None:
    """The checkout an editable install of prompthooks points at (``None``: not editable)."""
    text = importlib.metadata.distribution("prompthooks").read_text("direct_url.json")
    if not text:
        return None
    record = json.loads(text)
    if not record.get("dir_info", {}).get("editable"):
        return None
    return Path(unquote(urlparse(record["url"]).path)).resolve()


def test_version_is_the_installed_packages_version() -> None:
    """``pyproject.toml`` reads the version from ``prompthooks/_version.py``, so the
    metadata pip wrote and the code agree. They differ when the install is older
    than the checkout: run ``pip install -e .`` again."""
    source = _editable_source()
    if source is not None and source != ROOT:
        pytest.skip(f"the installed prompthooks is an editable install of {source}, not {ROOT}")
    installed = importlib.metadata.version("prompthooks")
    assert ph.__version__ == installed, f"installed metadata says {installed}: pip install -e ."


def test_version_names_the_changelogs_top_entry() -> None:
    """``X.Y.Z.devN`` while the README's top entry is ``X.Y.Z (in progress)``,
    ``X.Y.Z`` once it is released."""
    version = Version(ph.__version__)
    changelog = (ROOT / "README.md").read_text().split("\n## Changelog\n", 1)[1]
    top = re.search(r"^- (\d+\.\d+\.\d+)( \(in progress\))?", changelog, re.MULTILINE)
    assert top, "the changelog has no entry"
    assert version.base_version == top.group(1)
    assert version.is_devrelease == bool(top.group(2)), (ph.__version__, top.group(0))


def test_import_loads_no_transformers_model_code() -> None:
    """``import prompthooks`` imports no family's modeling module (eleven of them took
    about 2 s): the built-in locators know their classes by module and name
    (``prompthooks/locators/classes.py``). Checked in a fresh interpreter, where
    nothing else has imported them yet."""
    code = (
        "import sys, prompthooks\n"
        "print(prompthooks.__file__)\n"
        "print(','.join(prompthooks.registered_locators()))\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    where, locators, *modules = done.stdout.splitlines()
    assert Path(where).is_relative_to(ROOT)  # this checkout's code
    built_in = {"gpt2", "llama", "t5", "bert", "roberta", "distilbert", "bart", "opt", "gpt_neox"}
    assert built_in <= set(locators.split(","))  # registered all the same
    assert "prompthooks.locators.gpt2" in modules
    modeling = [m for m in modules if m.startswith("transformers.models.") and ".modeling_" in m]
    assert modeling == []


def test_nothing_tracked_is_ignored() -> None:
    """``.gitignore`` describes what is not tracked: a tracked file it matches (added
    with ``git add -f``) would make a new file next to it silently untracked."""
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    done = subprocess.run(
        [git, "ls-files", "--cached", "--ignored", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout == ""
