"""The README and the guides it links to, as a reader meets them.

* Links: every relative link and image in ``README.md``, ``benchmarks/README.md`` and
  ``integrations/README.md`` names a file that exists, and every ``#anchor`` a heading
  of the file it points into (GitHub's anchor rules); every repository path quoted in
  backticks (``tests/...``, ``integrations/...``, globs included) exists; every
  ``README 'Section'`` or ``integrations/README.md, 'Section'`` that a message of the
  library points to is a heading there.
* Python blocks: the README's ``python`` blocks run as written, in order, in one
  interpreter (a reader pasting them into one session), from a scratch folder with the
  checkout importable. The quick start's offline loaders (``integrations.assets``) are
  swapped for a stand-in built on ``integrations/tiny_assets.py`` (a 2-layer random
  LLaMA, a word-level tokenizer, counting sentences), so the whole chain takes seconds.
  (The real SmolLM2 needs the demo's packages, which the test environment does not
  install; the demo command runs the same loader on it.)
* Shell blocks: every ``*.py`` they name exists and takes the ``--flags`` given to it
  (its ``--help`` lists them); ``pip install`` names extras that ``pyproject.toml``
  declares and constraint files that exist; ``-m`` selects declared pytest markers.
* The guides' ``python`` blocks parse (they quote the scripts beside them, which the
  integration tests run).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.workflow  # documentation, not kernels: the torch pass only

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "benchmarks/README.md", "integrations/README.md")
# A fenced block, possibly indented (inside a list item): language and body.
FENCE = re.compile(
    r"^(?P<indent> *)```(?P<lang>[\w-]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S
)
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
# A code span that is a path from the repository root (``prompthooks/2`` is a file format).
REPO_PATH = re.compile(
    r"(?!prompthooks/\d+$)(?:prompthooks|integrations|tests|benchmarks|\.ci)/[\w./*-]*|pyproject\.toml"
)


def text_of(doc: str) -> str:
    return (ROOT / doc).read_text(encoding="utf-8")


def blocks(doc: str, lang: str) -> list[tuple[int, str]]:
    """``(first line of the code, code)`` of every ``lang`` block of ``doc``, dedented."""
    text = text_of(doc)
    found = []
    for match in FENCE.finditer(text):
        if match.group("lang") == lang:
            line = text.count("\n", 0, match.start("body")) + 1
            found.append((line, textwrap.dedent(match.group("body"))))
    return found


def prose(doc: str) -> str:
    """``doc`` without its fenced blocks (whose lines may start with ``#``)."""
    return FENCE.sub("", text_of(doc))


def anchors(doc: str) -> set[str]:
    """GitHub's anchors for the headings of ``doc``: lower case, punctuation dropped,
    spaces to hyphens, ``-1``, ``-2``, ... on repeats."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", prose(doc), flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def relative(file: Path) -> str:
    return str(file.resolve().relative_to(ROOT))


def headings(doc: str) -> set[str]:
    return {h.strip() for h in re.findall(r"^#{1,6} +(.+?) *#*$", prose(doc), flags=re.M)}


# -- links and paths ------------------------------------------------------------------------


@pytest.mark.parametrize("doc", DOCS)
def test_links_and_anchors_resolve(doc: str) -> None:
    broken = []
    for target in LINK.findall(prose(doc)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (ROOT / doc).parent / path if path else ROOT / doc
        if not file.exists():
            broken.append(f"{target}: no {relative(file)}")
        elif anchor and (file.suffix != ".md" or anchor not in anchors(relative(file))):
            broken.append(f"{target}: no heading #{anchor} in {relative(file)}")
    assert not broken, f"{doc}: " + "; ".join(broken)


@pytest.mark.parametrize("doc", DOCS)
def test_quoted_repository_paths_exist(doc: str) -> None:
    quoted = {span for span in CODE_SPAN.findall(prose(doc)) if REPO_PATH.fullmatch(span)}
    assert quoted, f"{doc} quotes no repository path"  # the pattern still finds them
    missing = sorted(p for p in quoted if not any(ROOT.glob(p.rstrip("/"))))
    assert not missing, f"{doc} names paths that do not exist: {missing}"


def _string_constants(path: Path) -> list[str]:
    return [
        node.value
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]


def test_messages_point_to_sections_that_exist() -> None:
    """The library's errors send users to a section by name: it must be there."""
    pointer = re.compile(r"(integrations/README\.md|README)[ ,]+'([^']+)'")
    pointers = [
        (source.relative_to(ROOT), doc, section)
        for source in sorted((ROOT / "prompthooks").rglob("*.py"))
        for constant in _string_constants(source)
        for doc, section in pointer.findall(" ".join(constant.split()))
    ]
    assert pointers  # the pattern still finds them
    for source, doc, section in pointers:
        doc = "README.md" if doc == "README" else doc
        assert section in headings(doc), f"{source} points to {doc}, '{section}': no such heading"


# -- shell blocks ---------------------------------------------------------------------------


def _commands(doc: str) -> list[list[str]]:
    """Each command of ``doc``'s bash blocks as words (comments and ``&&`` chains split)."""
    commands = []
    for _, code in blocks(doc, "bash"):
        joined = code.replace("\\\n", " ")
        for line in joined.splitlines():
            line = line.split(" #", 1)[0] if not line.startswith("#") else ""
            for command in line.split("&&"):
                words = shlex.split(command)
                if words:
                    commands.append(words)
    return commands


def _extras() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^(\w+) = \[", block, flags=re.M))


def _markers() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    return set(re.findall(r'^ *"(\w+): ', text.split("markers = [", 1)[1], flags=re.M))


@pytest.mark.parametrize("doc", DOCS)
def test_shell_commands_name_what_exists(doc: str) -> None:
    helps: dict[Path, str] = {}
    for words in _commands(doc):
        scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
        for i in scripts:
            script = ROOT / words[i]
            assert script.is_file(), f"{doc}: {' '.join(words)}: no {words[i]}"
            flags = [w.split("=", 1)[0] for w in words[i + 1 :] if w.startswith("--")]
            if flags:
                if script not in helps:
                    helps[script] = _help(script)
                unknown = [f for f in flags if f not in helps[script]]
                assert not unknown, f"{doc}: {words[i]} does not take {unknown}"
        if words[:2] == ["pip", "install"] or words[1:3] == ["-m", "pip"]:
            for flag, value in zip(words, words[1:], strict=False):
                if flag == "-c":
                    assert (ROOT / value).is_file(), f"{doc}: no constraints file {value}"
                if flag == "-e" and "[" in value:
                    wanted = set(value.split("[", 1)[1].rstrip("]").split(","))
                    assert wanted <= _extras(), f"{doc}: pyproject.toml has no extra {wanted}"
        after = words[words.index("pytest") + 1 :] if "pytest" in words else []
        if "-m" in after:  # a marker expression
            names = set(re.findall(r"\w+", after[after.index("-m") + 1])) - {"not", "and", "or"}
            assert names <= _markers(), f"{doc}: undeclared pytest markers {names}"


def _help(script: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(script), "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_guides_python_blocks_parse() -> None:
    for doc in DOCS[1:]:
        for line, code in blocks(doc, "python"):
            try:
                ast.parse(code)
            except SyntaxError as error:
                where = line + (error.lineno or 1) - 1
                raise AssertionError(f"{doc}:{where}: {error.msg}") from None


# -- python blocks --------------------------------------------------------------------------

# Runs the given README blocks in one namespace, each compiled under README.md with its
# own line numbers, so a failure's traceback points at the README line.
RUNNER = """
import json, sys
readme, chosen = json.load(open(sys.argv[1]))
ns = {"__name__": "__main__"}
for line, code in chosen:
    exec(compile("\\n" * (line - 1) + code, readme, "exec"), ns)
print("README blocks ran:", len(chosen))
"""

# What ``integrations.assets`` offers the README, on the integration scripts' tiny assets.
STAND_IN = '''
"""Stand-in for integrations.assets: the README's loaders, on a tiny random model."""
import sys
from pathlib import Path

sys.path.insert(0, {integrations!r})
from tiny_assets import counting_texts, tiny_llama, word_tokenizer


def load_smollm2(padding_side=None):
    return tiny_llama(), word_tokenizer(padding_side or "right")


def rotten_tomatoes(n_train, n_test, seed):
    rows = [(text, i % 2) for i, text in enumerate(counting_texts(n_train + n_test, seed))]
    return rows[:n_train], rows[n_train:]


def smollm2_dir():
    folder = Path("tiny-smollm2").resolve()
    if not folder.is_dir():
        tiny_llama().save_pretrained(folder)
        word_tokenizer().save_pretrained(folder)
    return folder
'''


def _section(line: int) -> str:
    """The ``##`` section of README.md that ``line`` is in."""
    above = text_of("README.md").split("\n")[:line]
    return next(text[3:].strip() for text in reversed(above) if text.startswith("## "))


def run_blocks(chosen: list[tuple[int, str]], cwd: Path, pythonpath: list[Path]) -> str:
    for line, code in chosen:
        compile(code, f"README.md:{line}", "exec")  # a syntax error names its block
    (cwd / "blocks.json").write_text(json.dumps([str(ROOT / "README.md"), chosen]))
    (cwd / "run_blocks.py").write_text(RUNNER)
    env = {k: v for k, v in os.environ.items() if k != "PROMPTHOOKS_KERNELS"}
    env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), env.get("PYTHONPATH", "")])
    env["HF_HUB_OFFLINE"] = "1"  # as integrations/assets.py sets it: no model hub
    done = subprocess.run(
        [sys.executable, "run_blocks.py", "blocks.json"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return done.stdout


def test_readme_python_blocks_run_as_written(tmp_path: Path) -> None:
    """Every block, in order, on the tiny stand-in for SmolLM2."""
    chosen = blocks("README.md", "python")
    assert any(_section(line) == "Quick start" for line, _ in chosen)
    stand_in = tmp_path / "integrations"
    stand_in.mkdir()
    (stand_in / "__init__.py").write_text("")
    (stand_in / "assets.py").write_text(STAND_IN.format(integrations=str(ROOT / "integrations")))
    out = run_blocks(chosen, tmp_path, [tmp_path, ROOT])
    assert f"README blocks ran: {len(chosen)}" in out
    assert (tmp_path / "sentiment.safetensors").is_file()  # what the README says they write
    assert (tmp_path / "tuned.safetensors").is_file() and (tmp_path / "opt.pt").is_file()
    assert (tmp_path / "prefix_adapter").is_dir()
