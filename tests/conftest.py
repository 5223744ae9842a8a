import os
from pathlib import Path
from typing import Any

# No GPU here: Triton kernels run in Triton's CPU interpreter (set before triton loads).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile(
    "dev", deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# Per-architecture files check each family's locator: where prompts and prefixes go.
# The kernels they call are the same splice and concat that the main suite runs on
# both paths, so in these files only the tests marked ``kernel_paths`` (each
# family's oracles) run again in the Triton pass; the rest count as ``workflow``.
FAMILY_FILES = ("test_family_", "test_torch_mha")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    _record_cells(items)
    for item in items:
        if item.path.name.startswith(FAMILY_FILES) and not item.get_closest_marker("kernel_paths"):
            item.add_marker(pytest.mark.workflow)
        # Each family's oracles are its kernel-path tests: they also run on the
        # oldest supported transformers release (tests/test_releases.py).
        if item.get_closest_marker("kernel_paths"):
            item.add_marker(pytest.mark.oldest_release)


# -- the conformance table ----------------------------------------------------------
# Whenever cells of tests/test_conformance.py ran, the terminal summary prints
# family x property -> pass / FAIL / xfail (a known finding) / skip / n/a (reason);
# --conformance-table=PATH also writes it as Markdown.

_CELLS: dict[str, tuple[str, str, str]] = {}  # nodeid -> (family, property, method)
_OUTCOMES: dict[tuple[str, str, str], list[str]] = {}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--conformance-table",
        metavar="PATH",
        default=None,
        help="also write the conformance table (family x property) as Markdown to PATH",
    )


def _record_cells(items: list[pytest.Item]) -> None:
    for item in items:
        mark = item.get_closest_marker("conformance")
        if mark is not None:
            _CELLS[item.nodeid] = (
                mark.kwargs["family"],
                mark.kwargs["prop"],
                mark.kwargs["method"],
            )


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    cell = _CELLS.get(report.nodeid)
    if cell is None:
        return
    if hasattr(report, "wasxfail"):
        outcome = "xfail" if report.skipped else "XPASS"
    elif report.failed:
        outcome = "FAIL"
    elif report.skipped:
        outcome = "skip"
    elif report.when == "call":
        outcome = "pass"
    else:
        return
    _OUTCOMES.setdefault(cell, []).append(outcome)


def _cell_text(outcomes: dict[str, str]) -> str:
    """One table cell from each method's outcome: one word when they agree."""
    if len(set(outcomes.values())) == 1:
        return next(iter(outcomes.values()))
    return "; ".join(f"{method} {text}" for method, text in outcomes.items())


def conformance_table() -> tuple[list[str], list[list[str]], list[str]]:
    """Header, rows and numbered footnotes (reasons) of the table of this run."""
    from tests.support.families import FAMILIES, METHODS, PROPERTIES

    notes: list[str] = []

    def note(text: str) -> str:
        if text not in notes:
            notes.append(text)
        return f"[{notes.index(text) + 1}]"

    rows = []
    for name, family in FAMILIES.items():
        row = [f"{name} ({family.locator})"]
        for prop in PROPERTIES:
            per_method = {}
            for method in METHODS:
                reason = family.reason(prop, method)
                if reason is not None:
                    per_method[method] = f"n/a {note(reason)}"
                    continue
                seen = _OUTCOMES.get((name, prop, method), [])
                worst = next(
                    (o for o in ("FAIL", "XPASS", "skip", "xfail") if o in seen),
                    "pass" if seen else "-",
                )
                if worst == "xfail":
                    worst = f"xfail {note(family.failure(prop, method) or '')}"
                per_method[method] = worst
            row.append(_cell_text(per_method))
        rows.append(row)
    return ["family (locator)", *PROPERTIES], rows, notes


def _markdown(header: list[str], rows: list[list[str]], notes: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", *(f"[{i}] {text}" for i, text in enumerate(notes, 1))]
    lines.append("\n(- : not run in this session; a cell reads prompt and prefix together)")
    return "\n".join(lines) + "\n"


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    if not _OUTCOMES:
        return
    header, rows, notes = conformance_table()
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    terminalreporter.section("conformance: family x property")
    for row in [header, *rows]:
        terminalreporter.write_line("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    for i, text in enumerate(notes, 1):
        terminalreporter.write_line(f"[{i}] {text}")
    path = config.getoption("--conformance-table")
    if path:
        Path(path).write_text(_markdown(header, rows, notes))
        terminalreporter.write_line(f"written to {path}")
