"""A failed run's record and its notification.

`failure.json` goes to the artifact store (runs/<id>/failure.json), which outlives the
containers and pods the run used: which step failed, the failing rank and its exit status, the
error with the ranks' last stderr lines, the configuration and the times. An optional Apprise
URL (`notify_url`: json://, slack://, mailto://, ...) is called on a failure and on a missed
quality gate. Both are best effort: a store or receiver that is down is logged, never hides the
run's own error.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from pydantic import BaseModel

from pipeline.base import layout
from pipeline.base.config import PipelineConfig
from pipeline.base.errors import PipelineError
from pipeline.base.logs import step_logger
from pipeline.base.store import open_store
from pipeline.base.store.documents import document_bytes
from tasks.evaluate.gate import QualityGateFailed
from tasks.publish.manifest import utc_iso

MAX_STDERR_LINES = 40


class FailureRecord(BaseModel):
    """failure.json: what failed, where and when."""

    run_id: str
    step: str  # dataset, train, evaluate, publish, or gate (the quality gate missed)
    error: str  # the one line (and for training, the ranks' stderr tails) a user sees
    error_type: str
    rank: int | None  # the Horovod rank that failed first, when one did
    exit_status: int | None  # that rank's exit status (128+N: killed by signal N)
    stderr_lines: list[str]  # the failing rank's last stderr lines, when training failed
    config: dict
    started_at: str
    failed_at: str


class CurrentStep(Protocol):
    current: str | None


def failure_record(
    config: PipelineConfig, step: str, exc: BaseException, started: float, failed: float
) -> FailureRecord:
    """The record of run `config.run_id` failing in `step` with `exc` (pure)."""
    message = str(exc) or type(exc).__name__
    first, *rest = message.splitlines() or [message]
    return FailureRecord(
        run_id=config.run_id or "",
        step=step,
        error=message,
        error_type=type(exc).__name__,
        rank=getattr(exc, "rank", None),
        exit_status=getattr(exc, "status", None),
        stderr_lines=[line.strip() for line in rest][-MAX_STDERR_LINES:],
        config=config.model_dump(mode="json"),
        started_at=utc_iso(started),
        failed_at=utc_iso(failed),
    )


def write_failure(config: PipelineConfig, record: FailureRecord) -> str | None:
    """Store `record` as the run's failure.json; its URI, None when the store refused it."""
    try:
        store = open_store(config.artifact_store, **config.store_options())
        run_store = store.child(layout.run_key(record.run_id))
        run_store.put(layout.FAILURE, document_bytes(record))
        return run_store.key_uri(layout.FAILURE)
    except PipelineError as exc:
        step_logger(__name__).warning("could not store failure.json: %s", exc)
        return None


def notify(url: str | None, title: str, body: str) -> bool:
    """Send one notification through Apprise; False (logged) when it could not be sent."""
    if not url:
        return False
    import apprise  # installed with Prefect; imported only when a notification is sent

    sender = apprise.Apprise()
    if not sender.add(url):
        step_logger(__name__).warning("notify_url is not a URL Apprise understands")
        return False
    sent = bool(sender.notify(title=title, body=body))
    if not sent:
        step_logger(__name__).warning("the failure notification could not be delivered")
    return sent


def report_failure(config: PipelineConfig, record: FailureRecord) -> None:
    where = write_failure(config, record)
    kind = "missed the quality gate" if record.step == "gate" else f"failed in step {record.step}"
    body = record.error + (f"\n\nrecord: {where}" if where else "")
    notify(config.notify_url, f"pipeline run {record.run_id} {kind}", body)


@contextmanager
def failures_reported(config: PipelineConfig, steps: CurrentStep) -> Iterator[None]:
    """Record and announce any failure of the block (a run), then let it propagate."""
    started = time.time()
    try:
        yield
    except Exception as exc:  # not Ctrl-C / SIGTERM: those must stop at once
        step = "gate" if isinstance(exc, QualityGateFailed) else steps.current or "flow"
        report_failure(config, failure_record(config, step, exc, started, time.time()))
        raise
