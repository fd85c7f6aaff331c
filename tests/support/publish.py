"""Helpers of the publish tests: a run directory as the earlier steps leave it, and
publishers in processes of their own."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipeline.base.config import PipelineConfig
from pipeline.base.layout import LATEST
from pipeline.base.store import (
    StoreError,
    open_store,
)
from tasks.dataset import CLASS_NAMES
from tasks.publish.artifacts import list_runs, show_run, verify_run
from tasks.publish.step import publish_run

DEBIAN_MIRROR = "file:///usr/share/datasets/fashion-mnist/"
T0 = 1_700_000_000.0  # creation time of the first test run; later runs are newer


def make_run_dir(
    config: PipelineConfig,
    *,
    created: float,
    accuracy: float = 0.84,
    passed: bool = True,
    large_bytes: int = 0,
) -> Path:
    """A run directory as train + evaluate leave it, its files dated `created`."""
    rng = random.Random(config.run_id)
    run_dir = config.run_dir()
    params = rng.randbytes(4 * (784 * 10 + 10) + 64)
    epochs = [
        {"epoch": e, "loss": 0.9 / e, "train_accuracy": 0.7 + e / 100, "test_accuracy": 0.7}
        for e in range(1, 4)
    ]
    per_class = [{"class": name, "accuracy": accuracy} for name in CLASS_NAMES]
    gate = {"metric": "accuracy", "threshold": 0.8, "value": accuracy, "passed": passed}
    files = {
        "config.json": config.model_dump_json(indent=2).encode(),
        "model/model-symbol.json": json.dumps({"nodes": [{"op": "FullyConnected"}]}).encode(),
        "model/model-0000.params": params,
        "model/model.params": params,
        "metrics/train.jsonl": "".join(json.dumps(e) + "\n" for e in epochs).encode(),
        "metrics/train.json": json.dumps({"epochs": 3, "test_accuracy": accuracy}).encode(),
        "report/metrics.json": json.dumps(
            {
                "accuracy": accuracy,
                "train_accuracy": 0.86,
                "mean_loss": 0.45,
                "ece": 0.02,
                "per_class": per_class,
                "confusion_matrix": [[rng.randrange(1000) for _ in range(10)] for _ in range(10)],
                "gate": gate,
            }
        ).encode(),
        "report/report.md": f"# Run {config.run_id}\n\naccuracy {accuracy}\n".encode(),
        "checkpoints/epoch-0003.params": params,  # local only: never published
    }
    if large_bytes:
        files["model/large.bin"] = os.urandom(large_bytes)
    for key, data in files.items():
        (run_dir / key).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / key).write_bytes(data)
    Image.new("L", (28, 28), color=128).save(run_dir / "report" / "confusion_matrix.png")
    for path in run_dir.rglob("*"):
        os.utime(path, (created, created))
    return run_dir


def published_keys(run_dir: Path) -> set[str]:
    return {
        p.relative_to(run_dir).as_posix()
        for p in run_dir.rglob("*")
        if p.is_file() and not p.relative_to(run_dir).as_posix().startswith("checkpoints/")
    }


def with_run(config: PipelineConfig, run_id: str) -> PipelineConfig:
    return config.model_copy(update={"run_id": run_id})


def read_latest(config: PipelineConfig) -> dict:
    blob = open_store(config.artifact_store, **config.store_options()).get(LATEST)
    assert blob is not None, "latest.json is missing"
    return json.loads(blob.data)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- crashes --------------------------------------------------------------------------------------

PUBLISHER = """
import json, resource, signal, sys
from pathlib import Path
from boto3.s3.transfer import TransferConfig
from pipeline.base.config import PipelineConfig
from pipeline.base.store import open_store
from tasks.publish.step import publish_run

args = json.loads(sys.argv[1])
if args.get("max_file_bytes"):
    # Die like a crash when a write passes the limit (Python itself ignores SIGXFSZ).
    signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (args["max_file_bytes"],) * 2)
config = PipelineConfig.model_validate_json(args["config"])
if args.get("start_at"):  # racing publishers: start together
    import time
    time.sleep(max(0.0, args["start_at"] - time.time()))
transfer = TransferConfig(**args["transfer"]) if args.get("transfer") else None
store = open_store(config.artifact_store, **config.store_options(), transfer=transfer)
publish_run(store, Path(args["run_dir"]), args["record"], config)
"""


def start_publisher(config: PipelineConfig, run_dir: Path, record: dict, **options):
    args = {"config": config.model_dump_json(), "run_dir": str(run_dir), "record": record}
    return subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, json.dumps({**args, **options})],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def assert_incomplete_then_completed(
    config: PipelineConfig, run_dir: Path, record: dict, completed_before: set[str]
) -> None:
    """The killed run is invisible; publishing it again finishes it, re-sending only the rest."""
    assert list_runs(config) == []
    with pytest.raises(StoreError, match="publish did not finish"):
        show_run(config, config.run_id)
    assert completed_before, "nothing was stored before the kill"
    assert "model/large.bin" not in completed_before

    store = open_store(config.artifact_store, **config.store_options())
    result = publish_run(store, run_dir, record, config)
    assert "model/large.bin" in result.uploaded
    assert not completed_before & set(result.uploaded)
    assert [r["run_id"] for r in list_runs(config)] == [config.run_id]
    assert verify_run(config, config.run_id) == []
