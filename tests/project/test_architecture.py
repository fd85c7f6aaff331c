"""The architecture's rules, checked on the source: import floors, the launcher/rank split,
what the flow process loads, file and function sizes."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

ROOT = REPO
PACKAGES = ("pipeline", "tasks")
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 60
# The train step's modules that run in the flow's or the CLI's process (tasks/train/__init__.py).
LAUNCHER_SIDE = (
    "tasks.train.step",
    "tasks.train.launcher",
    "tasks.train.rendezvous",
    "tasks.train.supervisor",
    "tasks.train.store_checkpoints",
)
# What the flow's and the CLI's process import at start (train, evaluate run lazily).
ORCHESTRATION = ("pipeline.flow", "pipeline.cli", "pipeline.commands", "pipeline.sweep")


def floor(module: str) -> int:
    """0: the base everything may import; 1: the steps; 2: orchestration (flow, CLI, sweep)."""
    if module == "pipeline.base" or module.startswith("pipeline.base."):
        return 0
    if module == "tasks" or module.startswith("tasks."):
        return 1
    return 2


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a project module, at any depth (lazy ones too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return [(line, name) for line, name in found if name.split(".")[0] in PACKAGES]


def test_no_module_imports_from_a_floor_above_it() -> None:
    upward = [
        f"{path.relative_to(ROOT)}:{line} imports {name}"
        for module, path in modules().items()
        for line, name in imported(path)
        if floor(name) > floor(module)
    ]
    assert upward == []


def test_the_launcher_side_never_imports_the_rank_side() -> None:
    launcher_side = LAUNCHER_SIDE
    rank_only = ("tasks.train.rank", "tasks.train.model")
    paths = modules()
    crossing = [
        f"{module} imports {name}"
        for module in launcher_side
        for _, name in imported(paths[module])
        if name in rank_only
    ]
    assert crossing == []


def _loaded_after_import(module: str) -> set[str]:
    """The top-level packages of interest loaded by importing `module` in a fresh process (and
    'horovod.mxnet', Horovod's MXNet binding, apart from the rest of horovod)."""
    code = (
        f"import sys, {module}; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'mxnet', 'horovod', 'boto3'} "
        "| {m for m in sys.modules if m == 'horovod.mxnet'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return set(ast.literal_eval(result.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module", [*ORCHESTRATION, "tasks.train.launcher"])
def test_the_flow_process_loads_no_mxnet_or_horovod(module: str) -> None:
    assert _loaded_after_import(module) & {"mxnet", "horovod"} == set()


@pytest.mark.parametrize("module", LAUNCHER_SIDE)
def test_the_launcher_side_loads_no_mxnet(module: str) -> None:
    """Only the rank side trains; the launcher side may load horovod.runner (rendezvous.py
    serves Horovod's Gloo rendezvous), never MXNet or Horovod's MXNet binding."""
    assert _loaded_after_import(module) & {"mxnet", "horovod.mxnet"} == set()


def test_no_file_over_500_lines_and_no_function_over_60() -> None:
    too_long = []
    for path in modules().values():
        source = path.read_text()
        if len(source.splitlines()) > MAX_FILE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {len(source.splitlines())} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {length}")
    assert too_long == []
