"""One way each, checked on the code itself: file names only in layout.py; atomic writes,
file hashes and path -> URI made in one module each; METRICS_FILE and EXIT_* defined once."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "tasks")


# --- the code itself ------------------------------------------------------------------------

# A file name: a plain name with one of the extensions the pipeline writes.
FILE_NAME = re.compile(r"[\w.-]*\w\.(json|jsonl|md|png|params|optimizer|lock|partial|part)")
# Literal names that are not a run's, a store's, a work dir's or a cache's file (with why).
NOT_LAYOUT = {
    ("pipeline/prefect_server.py", "pipeline-server.json"),  # Prefect's home, not ours
}


def _sources() -> dict[str, str]:
    return {
        path.relative_to(ROOT).as_posix(): path.read_text()
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
    }


def _literals(source: str) -> list[str]:
    return [
        node.value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]


def test_file_names_are_written_only_in_layout() -> None:
    strays = sorted(
        f"{name}: {literal!r}"
        for name, source in _sources().items()
        if name != "pipeline/base/layout.py"
        for literal in _literals(source)
        if FILE_NAME.fullmatch(literal) and (name, literal) not in NOT_LAYOUT
    )
    assert strays == []


def test_the_checks_find_what_they_look_for() -> None:
    layout_names = _literals((ROOT / "pipeline/base/layout.py").read_text())
    assert {"metrics.json", "dataset.json", "comparison.png"} <= {
        literal for literal in layout_names if FILE_NAME.fullmatch(literal)
    }


# Calls that belong to one module each: what is called -> the module that may call it.
ONE_WAY = {
    "os.fsync": "pipeline/base/files.py",
    "os.replace": "pipeline/base/files.py",
    "os.rename": "pipeline/base/files.py",
    "tempfile.mkstemp": "pipeline/base/files.py",
    "hashlib.file_digest": "pipeline/base/files.py",
    "as_uri": "pipeline/base/uris.py",  # Path.as_uri(), on whatever path
}
KNOWN_LEFTOVERS: set[tuple[str, str]] = set()


def _called(source: str) -> set[str]:
    """`module.function` and `.method` names of every call in `source`."""
    called = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            called.add(node.func.attr)
            if isinstance(node.func.value, ast.Name):
                called.add(f"{node.func.value.id}.{node.func.attr}")
    return called


def test_atomic_writes_hashes_and_uris_are_made_in_one_place() -> None:
    elsewhere = sorted(
        f"{name} calls {call}"
        for name, source in _sources().items()
        for call in _called(source) & set(ONE_WAY)
        if name != ONE_WAY[call] and (name, call) not in KNOWN_LEFTOVERS
    )
    assert elsewhere == []


def _module_constants(source: str) -> set[str]:
    return {
        target.id
        for node in ast.parse(source).body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }


def test_metrics_file_and_exit_codes_are_defined_once() -> None:
    defined = {
        constant: sorted(
            name for name, source in _sources().items() if constant in _module_constants(source)
        )
        for constant in ("METRICS_FILE", "EXIT_USAGE", "EXIT_FAILED")
    }
    assert defined == {
        "METRICS_FILE": ["pipeline/base/layout.py"],
        "EXIT_USAGE": ["pipeline/commands.py"],
        "EXIT_FAILED": ["pipeline/commands.py"],
    }
