"""Issue 22, item 7: every repository path a README names exists, and every test a README names
(`test_file.py::test_name`, its fault tables' third column) is a test of that file.

A path is a `code span` or a link target whose first part is a top-level entry of the
repository (or of the README's own directory); run-directory and store names (`model/...`,
`runs/<id>/...`) are not repository paths and are left alone.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.support import REPO

ROOT = REPO
PATH_CHARS = re.compile(r"^[A-Za-z0-9_.\-/]+$")
SPAN = re.compile(r"`([^`\n]+)`|\]\(([^)\s#]+)\)")
# Files a README tells the reader to create (`cp docker/.env.example docker/.env`).
MADE_BY_THE_READER = {"docker/.env"}
MODULE_RUN = re.compile(r"python -m ([A-Za-z_][\w.]*)")
TEST_REF = re.compile(r"^(?:(?P<file>[\w./-]+\.py))?::(?P<name>test_\w+)$")


def readmes() -> list[Path]:
    """The README files git tracks (a stray cache's README is not the project's)."""
    listed = subprocess.run(
        ["git", "ls-files", "*README*"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    return [ROOT / name for name in listed if Path(name).name.upper().startswith("README")]


def named_paths(readme: Path) -> list[str]:
    """The spans of `readme` that name a repository path (without a trailing `::test`)."""
    top_level = {p.name for p in ROOT.iterdir()} | {p.name for p in readme.parent.iterdir()}
    found = []
    for match in SPAN.finditer(readme.read_text()):
        text = (match.group(1) or match.group(2)).split("::")[0].rstrip("/")
        if "/" in text and PATH_CHARS.match(text) and text.split("/")[0] in top_level:
            found.append(text)
    return found


def named_tests(readme: Path) -> list[tuple[str, str]]:
    """(test file, test name) of each `file.py::test` span, `::test` meaning the last file."""
    found, last_file = [], None
    for match in SPAN.finditer(readme.read_text()):
        ref = TEST_REF.match(match.group(1) or "")
        if ref is None:
            continue
        last_file = ref.group("file") or last_file
        found.append((last_file, ref.group("name")))
    return found


def test_every_path_a_readme_names_exists() -> None:
    assert {readme.relative_to(ROOT).as_posix() for readme in readmes()} >= {
        "README.md",
        "k8s/README.md",
    }
    missing = [
        f"{readme.relative_to(ROOT)}: {path}"
        for readme in readmes()
        for path in named_paths(readme)
        if path not in MADE_BY_THE_READER
        and not ((ROOT / path).exists() or (readme.parent / path).exists())
    ]
    assert missing == []


def test_every_test_a_readme_names_exists() -> None:
    missing = []
    for readme in readmes():
        for file, name in named_tests(readme):
            path = ROOT / file if "/" in file else ROOT / "tests" / file
            source = path.read_text() if path.is_file() else ""
            if not re.search(rf"^def {name}\(", source, re.MULTILINE):
                missing.append(f"{readme.relative_to(ROOT)}: {file}::{name}")
    assert missing == []


def runnable(module: str) -> bool:
    """Whether `python -m module` finds a module file or a package with __main__ here."""
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()


def test_every_module_a_readme_runs_exists() -> None:
    stale = {
        (readme.relative_to(ROOT).as_posix(), module)
        for readme in readmes()
        for module in MODULE_RUN.findall(readme.read_text())
        if module.split(".")[0] in {"pipeline", "tasks", "bench", "tests"}
        and not any(part.isupper() for part in module.split("."))  # bench.NAME: a placeholder
        and not runnable(module)
    }
    assert not stale, stale


def test_the_checks_see_what_they_check() -> None:
    """The two checks above find paths and tests at all (a pattern that matched nothing would
    pass them whatever the READMEs say)."""
    main = ROOT / "README.md"
    assert "pipeline/base/config.py" in named_paths(main)
    assert (
        "tests/system/test_untrusted_input.py",
        "test_control_bytes_from_a_store_are_escaped_in_list_show_verify_and_logs",
    ) in named_tests(main)
    assert "model/model.params" not in named_paths(main)
    assert runnable("tasks.train.rank") and not runnable(
        "tasks.train"
    )  # a run's file, not the repository's
