"""The manifest of a published run and the documents derived from it (pure).

The documents themselves are validated models (`pipeline.base.store.documents`): this module
builds them and decides on promotion, without touching a store.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime

from pipeline.base import layout
from pipeline.base.store.documents import (
    MANIFEST_FORMAT,
    Latest,
    Manifest,
    object_problems,
)
from pipeline.base.text import printable

__all__ = [
    "build_manifest",
    "damaged_summary",
    "format_run_line",
    "latest_record",
    "object_problems",
    "promotion_refusal",
    "run_summary",
    "utc_iso",
]


def utc_iso(timestamp: float) -> str:
    # Fixed-width ISO 8601 in UTC, so that string order is time order.
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="microseconds")


def build_manifest(
    *,
    run_id: str,
    objects: Mapping[str, dict],
    created_at: str,
    published_at: str,
    published_after: int,
    dataset: dict,
    config: dict,
    metrics: dict,
    code_revision: str,
    flow_run_id: str | None,
    restarts: list[dict] | None = None,
) -> Manifest:
    """The record of a published run: what it is made of and how it was made."""
    return Manifest(
        format=MANIFEST_FORMAT,
        run_id=run_id,
        created_at=created_at,
        published_at=published_at,
        published_after=published_after,
        code_revision=code_revision,
        flow_run_id=flow_run_id,
        dataset=dataset,
        config=config,
        metrics=metrics,
        # Restarts of the training's ranks after one died (metrics/restarts.jsonl).
        restarts=restarts or [],
        objects=dict(sorted(objects.items())),
    )


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


def latest_record(
    manifest: Manifest, manifest_sha256: str, sequence: int, updated_at: str
) -> Latest:
    """What latest.json holds for a run promoted as the store's `sequence`-th promotion."""
    return Latest(
        run_id=manifest.run_id,
        manifest=f"{layout.run_key(manifest.run_id)}/{layout.MANIFEST}",
        manifest_sha256=manifest_sha256,
        sequence=sequence,
        published_after=manifest.published_after,
        accuracy=manifest.metrics.accuracy,
        created_at=manifest.created_at,
        updated_at=updated_at,
    )


def promotion_refusal(candidate: Manifest, current: Latest | None) -> str | None:
    """Why `candidate` may not replace `current` in latest.json; None when it may.

    Runs are ordered by publication (`Manifest.order`), which no host clock can pin: a run
    whose files carry future times is simply the run published when it was published.
    """
    if not candidate.metrics.gate.passed:
        return f"run {candidate.run_id} did not pass the quality gate"
    if current is None or current.run_id == candidate.run_id:
        return None
    if current.order() >= candidate.order():
        return (
            f"latest.json names run {current.run_id}, published after run {candidate.run_id} "
            f"(publication order {current.order()} >= {candidate.order()})"
        )
    return None


def run_summary(manifest: Manifest, latest_run_id: str | None) -> dict:
    """One line's worth of a published run, for `pipeline artifacts list`."""
    return {
        "run_id": manifest.run_id,
        "order": manifest.order(),
        "created_at": manifest.created_at,
        "published_at": manifest.published_at,
        "accuracy": manifest.metrics.accuracy,
        "gate_passed": manifest.metrics.gate.passed,
        "latest": manifest.run_id == latest_run_id,
        "damaged": None,
    }


def damaged_summary(run_id: str, reason: str) -> dict:
    """A listing entry for a run whose manifest cannot be read: shown, never fatal."""
    return {
        "run_id": run_id,
        "order": (-1, run_id),
        "created_at": "",
        "published_at": "",
        "accuracy": None,
        "gate_passed": False,
        "latest": False,
        "damaged": reason,
    }


def format_run_line(run: dict) -> str:
    """One line of `artifacts list`; every string from the store escaped (`printable`)."""
    if run.get("damaged"):
        return f"{printable(run['run_id'])}  DAMAGED: {printable(run['damaged'])}"
    created = printable(run["created_at"][:19].replace("T", " "))
    gate = "passed" if run["gate_passed"] else "FAILED"
    run_id = printable(run["run_id"])
    line = f"{run_id}  accuracy {run['accuracy']:.4f}  gate {gate}  created {created} UTC"
    return line + ("  <- latest" if run["latest"] else "")
