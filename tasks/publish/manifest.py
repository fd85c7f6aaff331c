"""The manifest of a published run and the documents derived from it (pure)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime

from pipeline.base import layout
from pipeline.base.store import ObjectInfo

MANIFEST_FORMAT = 1


def utc_iso(timestamp: float) -> str:
    # Fixed-width ISO 8601 in UTC, so that string order is time order.
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="microseconds")


def build_manifest(
    *,
    run_id: str,
    objects: Mapping[str, dict],
    created_at: str,
    published_at: str,
    dataset: dict,
    config: dict,
    metrics: dict,
    code_revision: str,
    flow_run_id: str | None,
    restarts: list[dict] | None = None,
) -> dict:
    """The record of a published run: what it is made of and how it was made."""
    return {
        "format": MANIFEST_FORMAT,
        "run_id": run_id,
        "created_at": created_at,
        "published_at": published_at,
        "code_revision": code_revision,
        "flow_run_id": flow_run_id,
        "dataset": dataset,
        "config": config,
        "metrics": metrics,
        # Restarts of the training's ranks after one died (metrics/restarts.jsonl).
        "restarts": restarts or [],
        "objects": dict(sorted(objects.items())),
    }


def parse_restarts(text: str) -> list[dict]:
    """The records of a run's TRAIN_RESTARTS file (JSON lines); lines that are not JSON
    objects are left out."""
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def latest_record(manifest: dict) -> dict:
    """What latest.json holds for a run."""
    return {
        "run_id": manifest["run_id"],
        "created_at": manifest["created_at"],
        "accuracy": manifest["metrics"]["accuracy"],
        "manifest": f"{layout.run_key(manifest['run_id'])}/{layout.MANIFEST}",
    }


def is_newer(candidate: dict, current: dict) -> bool:
    """Whether run `candidate` was created after `current` (the run id breaks ties)."""
    return (candidate["created_at"], candidate["run_id"]) > (
        current["created_at"],
        current["run_id"],
    )


def object_problems(
    expected: Mapping[str, dict], stored: Mapping[str, ObjectInfo | None]
) -> list[str]:
    """One line per object whose stored size or SHA-256 differs from the manifest."""
    problems = []
    for key, entry in sorted(expected.items()):
        info = stored.get(key)
        if info is None:
            problems.append(f"{key}: missing")
        elif info.size != entry["size"]:
            problems.append(f"{key}: {info.size} bytes stored, manifest says {entry['size']}")
        elif info.sha256 != entry["sha256"]:
            problems.append(f"{key}: SHA-256 {info.sha256} stored, manifest says {entry['sha256']}")
    return problems


def run_summary(manifest: dict, latest_run_id: str | None) -> dict:
    """One line's worth of a published run, for `pipeline artifacts list`."""
    return {
        "run_id": manifest["run_id"],
        "created_at": manifest["created_at"],
        "published_at": manifest["published_at"],
        "accuracy": manifest["metrics"]["accuracy"],
        "gate_passed": manifest["metrics"]["gate"]["passed"],
        "latest": manifest["run_id"] == latest_run_id,
    }


def format_run_line(run: dict) -> str:
    created = run["created_at"][:19].replace("T", " ")
    gate = "passed" if run["gate_passed"] else "FAILED"
    line = f"{run['run_id']}  accuracy {run['accuracy']:.4f}  gate {gate}  created {created} UTC"
    return line + ("  <- latest" if run["latest"] else "")
