"""Benchmark of what a pipeline run costs beyond its training epochs, against a bare Prefect flow.

In one run, against one running Prefect server (started here on 127.0.0.1 with its own
PREFECT_HOME, stopped at the end):
  bare flow     a Prefect flow of four no-op tasks, as its own process (the floor any
                Prefect-orchestrated pipeline pays: interpreter, `import prefect`, API calls)
  pipeline run  `pipeline run` with the defaults (5 epochs, 1 process), broken down into
                interpreter and imports, the API check, the four steps (the train step split
                into rank launch and epochs, from the run's own train.jsonl) and the rest
                (Prefect's flow and task bookkeeping)
  make run      the README's command, warm (the environment and the dataset cache exist)
Each row is the median of --repeats runs. Targets: a warm `make run` <= 15 s wall, and
`pipeline run` minus its epochs <= 2x the bare flow. CPU-heavy: run it alone.
Run: .venv/bin/python -m bench.pipeline_overhead [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline import prefect_server
from tests.support.seaweedfs import free_port

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TARGET_MAKE_RUN_S = 15.0
TARGET_OVERHEAD_RATIO = 2.0
BARE_FLOW = """
from prefect import flow, task

@task
def step(name: str) -> str:
    return name

@flow
def bare() -> None:
    for name in ("dataset", "train", "evaluate", "publish"):
        step(name)

bare()
"""
IMPORTS = "import pipeline.cli, pipeline.commands, pipeline.flow"
STEP_TIMES_RE = re.compile(r"(\w+) ([\d.]+)s")


def timed(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    return seconds, result.stdout


def pipeline_run(env: dict[str, str], work: Path) -> dict[str, float]:
    """One `pipeline run`, broken down from its summary and its train.jsonl."""
    wall, out = timed([str(BIN / "pipeline"), "run", "--work-dir", str(work)], env)
    steps_line = next(line for line in out.splitlines() if "step times" in line)
    steps = {name: float(sec) for name, sec in STEP_TIMES_RE.findall(steps_line)}
    run_id = next(line.split()[1] for line in out.splitlines() if line.startswith("run "))
    jsonl = work / run_id / "metrics" / "train.jsonl"
    epochs = sum(json.loads(line)["seconds"] for line in jsonl.read_text().splitlines())
    return {
        "wall": wall,
        **steps,
        "rank launch": steps["train"] - epochs,
        "epochs": epochs,
    }


def median_of(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(row[key] for row in rows) for key in rows[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="bench-prefect-"))
    os.environ["PREFECT_HOME"] = str(home)
    start = time.perf_counter()
    server = prefect_server.start_server(free_port())
    server_start = time.perf_counter() - start
    try:
        env = {
            **os.environ,
            "PREFECT_API_URL": server.api_url,
            "PIPELINE_ARTIFACT_STORE": (home / "artifacts").as_uri(),
            "PIPELINE_PREFECT_PORT": str(server.port),
        }
        check_start = time.perf_counter()
        prefect_server.check_api(server.api_url)
        api_check = time.perf_counter() - check_start
        warm_up = ["run", "--epochs", "1", "--min-test-accuracy", "0.5", "--work-dir", str(home)]
        timed([str(BIN / "pipeline"), *warm_up], env)
        bare, imports, runs, make = [], [], [], []
        for repeat in range(args.repeats):
            bare.append(timed([sys.executable, "-c", BARE_FLOW], env)[0])
            imports.append(timed([sys.executable, "-c", IMPORTS], env)[0])
            runs.append(pipeline_run(env, home / f"work-{repeat}"))
            make.append(timed(["make", "run"], env)[0])
    finally:
        prefect_server.stop_server()
    report(server_start, api_check, statistics.median(bare), statistics.median(imports),
           median_of(runs), statistics.median(make), args.repeats)  # fmt: skip


def report(server_start, api_check, bare, imports, run, make, repeats) -> None:
    parts = ["dataset", "rank launch", "epochs", "evaluate", "publish"]
    rest = run["wall"] - imports - api_check - sum(run[part] for part in parts)
    print(f"pipeline overhead: medians of {repeats} runs against one running Prefect server\n")
    print("| what                                  | seconds |")
    print("|---------------------------------------|---------|")
    print(f"| bare flow (4 no-op tasks)             | {bare:7.2f} |")
    print(f"| pipeline run (5 epochs, 1 process)    | {run['wall']:7.2f} |")
    print(f"|   interpreter and imports             | {imports:7.2f} |")
    print(f"|   Prefect API check                   | {api_check:7.2f} |")
    for part in parts:
        print(f"|   {part:<35} | {run[part]:7.2f} |")
    print(f"|   Prefect flow and task bookkeeping   | {rest:7.2f} |")
    print(f"| make run (warm)                       | {make:7.2f} |")
    print(f"| (local Prefect server first start     | {server_start:7.2f} |)")
    overhead = run["wall"] - run["epochs"]
    print()
    print(
        f"pipeline run minus epochs: {overhead:.2f} s = {overhead / bare:.2f}x the bare flow "
        f"(target <= {TARGET_OVERHEAD_RATIO:.0f}x); warm make run {make:.2f} s "
        f"(target <= {TARGET_MAKE_RUN_S:.0f} s)"
    )


if __name__ == "__main__":
    main()
