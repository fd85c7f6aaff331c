"""The Prefect flow: dataset -> train -> evaluate -> publish.

Steps exchange only URIs (the dataset cache, the run directory, the published run), so each
can run in its own process, container or Kubernetes job. Orchestration concerns (retries,
caching, timeouts) live here; the steps in `tasks/` know nothing of Prefect's decorators.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from typing import Any

from prefect import flow, task
from prefect.context import TaskRunContext
from pydantic import BaseModel

from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from pipeline.store import open_store
from tasks import dataset, evaluate, publish, train


class QualityGateFailed(PipelineError):
    """The model missed the quality gate; it is stored but not promoted to latest."""


class RunSummary(BaseModel):
    """What a run produced, as the flow returns it and `pipeline run` prints it."""

    run_id: str
    train_accuracy: float
    test_accuracy: float
    gate_threshold: float
    gate_passed: bool
    data_uri: str
    run_dir_uri: str
    published_uri: str
    step_seconds: dict[str, float]


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus a short random suffix."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def preflight(config: PipelineConfig) -> None:
    """Fail on what would fail late: before the dataset and an hour of training, not at publish."""
    open_store(config.artifact_store, config).ensure_writable()


def _dataset_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    # Keyed by the pinned digests *and* the cache files' current size/mtime: a second run reuses
    # the verified cache, but a cache that was deleted or touched is checked again.
    return dataset.cache_key(parameters["config"])


@task(
    name="dataset",
    retries=2,
    retry_delay_seconds=5,
    cache_key_fn=_dataset_cache_key,
    log_prints=True,
)
def dataset_step(config: PipelineConfig) -> str:
    return dataset.prepare_dataset(config)


@task(name="train", log_prints=True)
def train_step(config: PipelineConfig, data_uri: str) -> str:
    return train.train(config, data_uri)


@task(name="evaluate", log_prints=True)
def evaluate_step(config: PipelineConfig, data_uri: str, run_dir_uri: str) -> str:
    return evaluate.evaluate(config, data_uri, run_dir_uri)


@task(name="publish", retries=2, retry_delay_seconds=10, log_prints=True)
def publish_step(config: PipelineConfig, run_dir_uri: str, data_uri: str) -> str:
    return publish.publish(config, run_dir_uri, data_uri)


@flow(name="training_pipeline", log_prints=True)
def training_pipeline(config: PipelineConfig | None = None) -> RunSummary:
    """Train, evaluate and publish the Fashion-MNIST softmax-regression model."""
    config = config or PipelineConfig()
    config = config.model_copy(update={"run_id": config.run_id or new_run_id()})
    preflight(config)
    seconds: dict[str, float] = {}

    def timed(name: str, step, *args) -> str:
        start = time.perf_counter()
        try:
            return step(*args)
        finally:
            seconds[name] = round(time.perf_counter() - start, 2)

    data_uri = timed("dataset", dataset_step, config)
    run_dir_uri = timed("train", train_step, config, data_uri)
    report_uri = timed("evaluate", evaluate_step, config, data_uri, run_dir_uri)
    published_uri = timed("publish", publish_step, config, run_dir_uri, data_uri)

    metrics = evaluate.read_metrics(report_uri)
    summary = RunSummary(
        run_id=config.run_id,
        train_accuracy=metrics["train_accuracy"],
        test_accuracy=metrics["accuracy"],
        gate_threshold=metrics["gate"]["threshold"],
        gate_passed=metrics["gate"]["passed"],
        data_uri=data_uri,
        run_dir_uri=run_dir_uri,
        published_uri=published_uri,
        step_seconds=seconds,
    )
    if not summary.gate_passed:
        raise QualityGateFailed(
            f"quality gate failed: test accuracy {summary.test_accuracy:.4f} < "
            f"{summary.gate_threshold:.4f}; run {summary.run_id} is stored at "
            f"{published_uri} for inspection but was not promoted to latest"
        )
    return summary
