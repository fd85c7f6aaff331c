"""The Prefect flows: the pipeline (dataset -> train -> evaluate -> publish) and one step alone.

Steps exchange only the config: each finds its inputs where the config says (the dataset
cache, the run directory, the store), so each can run in its own process, container or
Kubernetes job. Orchestration concerns (retries, caching, timeouts) live here; the steps in
`tasks/` are plain functions that know nothing of Prefect's decorators. Each step's module is
imported inside its task: this process loads MXNet and Horovod only when it trains or
evaluates itself.
"""

from __future__ import annotations

import importlib
import threading
import time
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

import prefect.runtime
from prefect import Task, flow, task
from prefect.client.schemas.objects import TaskRun
from prefect.context import TaskRunContext
from prefect.deployments import run_deployment
from prefect.settings import get_current_settings
from prefect.states import State
from prefect.task_engine import TaskRunTimeoutError
from pydantic import BaseModel

from pipeline.base import layout
from pipeline.base.config import PipelineConfig
from pipeline.base.errors import PermanentError, PipelineError
from pipeline.base.store import ConflictError, IntegrityError, open_store
from pipeline.base.uris import to_uri
from pipeline.prefect_server import PrefectApiError
from pipeline.preflight import preflight
from tasks.evaluate.gate import QualityGateFailed, check_gate
from tasks.publish.failure import failures_reported

__all__ = ["QualityGateFailed", "RunSummary", "StepFailed", "pipeline_step", "training_pipeline"]

StepName = Literal["dataset", "train", "evaluate", "publish"]
EVALUATE_MODULE = "tasks.evaluate.step"


class StepFailed(PipelineError):
    """A step run as its own flow run (its own container) did not complete."""


class RunSummary(BaseModel):
    """What a run produced, as the flow returns it and `pipeline run` prints it."""

    run_id: str
    train_accuracy: float | None
    test_accuracy: float
    gate_threshold: float
    gate_passed: bool
    published_uri: str
    step_seconds: dict[str, float]
    flow_run_url: str | None = None


def new_run_id() -> str:
    """A sortable, unique run id: UTC time plus a short random suffix."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def with_run_id(config: PipelineConfig) -> PipelineConfig:
    return config.model_copy(update={"run_id": config.run_id or new_run_id()})


# --- the steps as Prefect tasks -------------------------------------------------------------


def _dataset_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    # Keyed by the pinned digests *and* the cache files' current size/mtime: a second run reuses
    # the verified cache, but a cache that was deleted or touched is checked again.
    from tasks.dataset import cache_key

    return cache_key(parameters["config"])


def _worth_retrying(task: Task, task_run: TaskRun, state: State) -> bool:
    # A lost compare-and-swap, a run id reused with other content or a full disk will not
    # change on retry.
    try:
        state.result()
    except (ConflictError, IntegrityError, PermanentError):
        return False
    except Exception:
        return True
    return False


@task(
    name="dataset",
    retries=2,
    retry_delay_seconds=5,
    retry_condition_fn=_worth_retrying,
    cache_key_fn=_dataset_cache_key,
)
def dataset_step(config: PipelineConfig) -> None:
    from tasks.dataset import prepare_dataset

    prepare_dataset(config)


# No retries: a retry would train from scratch; `--resume` continues from the checkpoint.
@task(name="train")
def train_step(config: PipelineConfig) -> None:
    from pipeline.progress import TrainingProgress
    from tasks.train.step import train

    train(config, on_epoch=TrainingProgress(config.epochs, config.run_id))


@task(name="evaluate")
def evaluate_step(config: PipelineConfig) -> None:
    importlib.import_module(EVALUATE_MODULE).evaluate(config)


@task(name="publish", retries=2, retry_delay_seconds=10, retry_condition_fn=_worth_retrying)
def publish_step(config: PipelineConfig) -> None:
    from tasks.publish.step import publish

    publish(config)


STEP_TASKS: dict[StepName, Task] = {
    "dataset": dataset_step,
    "train": train_step,
    "evaluate": evaluate_step,
    "publish": publish_step,
}


def step_task(step: StepName, config: PipelineConfig) -> Task:
    """The task of `step`, bounded by its configured timeout (`<step>_timeout`, per attempt)."""
    return STEP_TASKS[step].with_options(timeout_seconds=config.step_timeout(step))


def step_budget(step: StepName, config: PipelineConfig) -> float:
    """The most seconds `step` may take with all its attempts: its timeout bounds one attempt,
    and a retried step may also wait out its retry delays."""
    task_ = STEP_TASKS[step]
    retries = task_.retries or 0
    delays = task_.retry_delay_seconds or 0
    waited = sum(delays) if isinstance(delays, list) else retries * float(delays)
    return (retries + 1) * config.step_timeout(step) + waited


def step_output(step: StepName, config: PipelineConfig) -> str:
    """Where `step` leaves what it made, as the config says: the dataset cache, the run
    directory, its report, or the published run."""
    if step == "dataset":
        return config.data_uri()
    if step == "evaluate":
        return to_uri(config.run_dir() / layout.REPORT_DIR)
    if step == "publish":
        return published_uri(config)
    return config.run_dir_uri()


def published_uri(config: PipelineConfig) -> str:
    """The URI of this run in the artifact store."""
    store = open_store(config.artifact_store, **config.store_options())
    return store.child(layout.run_key(config.run_id)).uri


@flow(name="pipeline-step")
def pipeline_step(step: StepName, config: PipelineConfig) -> None:
    """One step of the pipeline as its own flow run (a per-step deployment: its own container).
    The config is the whole contract: the step finds its inputs where the config says."""
    step_task(step, config)(config)


# --- running the steps: inline, or each as its own flow run ---------------------------------


class StepRunner:
    """Runs the steps of one pipeline run and times them.

    inline: each step is a task of this flow run. deployments: each step is a flow run of
    `config.step_deployment` (its own container on a docker or kubernetes work pool). Either
    way only the config crosses over: every step finds its inputs where the config says.
    """

    def __init__(self, config: PipelineConfig) -> None:
        self.config = config
        self.seconds: dict[str, float] = {}
        self.current: StepName | None = None  # the step running, or the last one run

    def __call__(self, step: StepName) -> None:
        start = time.perf_counter()
        self.current = step
        try:
            if self.config.step_runner == "deployments":
                self._as_flow_run(step)
            else:
                step_task(step, self.config)(self.config)
        except TaskRunTimeoutError as exc:  # the step's own deadline (`<step>_timeout`)
            raise StepFailed(
                f"step {step} did not finish within its {step}_timeout of "
                f"{self.config.step_timeout(step):.0f} s and was stopped"
            ) from exc
        finally:
            self.seconds[step] = round(time.perf_counter() - start, 2)

    def _as_flow_run(self, step: StepName) -> None:
        # Only what was set (flags, PIPELINE_* variables, parameters) travels: defaults, and so
        # the paths of the step's own container, stay the worker's.
        overrides = self.config.model_dump(mode="json", exclude_unset=True)
        # Bounded: a flow run that never starts (no worker) or never ends fails this step.
        deadline = self.config.step_start_timeout + step_budget(step, self.config)
        flow_run = run_deployment(
            self.config.step_deployment,
            parameters={"step": step, "config": overrides},
            timeout=deadline,
        )
        if flow_run.state and not flow_run.state.is_final():
            raise StepFailed(
                f"step {step} (flow run {flow_run.name}) did not finish within {deadline:.0f} s "
                f"(state {flow_run.state.name}); see step_start_timeout and {step}_timeout"
            )
        if not flow_run.state or not flow_run.state.is_completed():
            message = flow_run.state.message if flow_run.state else "no state"
            raise StepFailed(f"step {step} (flow run {flow_run.name}) did not complete: {message}")


def _summary(config: PipelineConfig, seconds: dict[str, float]) -> tuple[RunSummary, dict]:
    # Read back from the store, as any later reader would: the published manifest is the truth.
    from tasks.publish.artifacts import show_run

    manifest = show_run(config, config.run_id)
    metrics = manifest["metrics"]
    summary = RunSummary(
        run_id=config.run_id,
        train_accuracy=metrics.get("train_accuracy"),
        test_accuracy=metrics["accuracy"],
        gate_threshold=metrics["gate"]["threshold"],
        gate_passed=metrics["gate"]["passed"],
        published_uri=published_uri(config),
        step_seconds=seconds,
        flow_run_url=_flow_run_url(),
    )
    return summary, metrics


def _flow_run_url() -> str | None:
    # Only a server that outlives the run can show it later; a temporary one is gone by then.
    if get_current_settings().api.url is None:
        return None
    return prefect.runtime.flow_run.ui_url


@flow(name="training_pipeline")
def training_pipeline(config: PipelineConfig | None = None) -> RunSummary | None:
    """Train, evaluate and publish the Fashion-MNIST softmax-regression model."""
    config = with_run_id(config or PipelineConfig())
    preflight(config)
    step = StepRunner(config)
    # A failure (or a missed gate) leaves failure.json in the store and calls notify_url.
    with failures_reported(config, step):
        step("dataset")
        if config.step_runner == "inline" and config.is_coordinator():
            # This process only waits while its ranks train: load evaluate's MXNet and
            # matplotlib (~3 s) meanwhile instead of after.
            threading.Thread(
                target=importlib.import_module, args=(EVALUATE_MODULE,), daemon=True
            ).start()
        step("train")
        if not config.is_coordinator():
            return None  # this host only contributed its Horovod ranks; host 0 goes on
        step("evaluate")
        step("publish")

        summary, metrics = _summary(config, step.seconds)
        check_gate(
            metrics,
            f"; run {summary.run_id} is stored at {summary.published_uri} for inspection but "
            "was not promoted to latest",
        )
    return summary


def run_pipeline(config: PipelineConfig) -> RunSummary | None:
    """The pipeline as `pipeline run` starts it: where Prefect's temporary server cannot start,
    one error line that says what to do instead of a traceback."""
    try:
        return training_pipeline(config=config)
    except RuntimeError as exc:
        # Prefect raises a bare RuntimeError for this; its text is the only way to tell.
        if "ephemeral Prefect API server" not in str(exc):
            raise
        first_line = str(exc).splitlines()[0][:300]
        raise PrefectApiError(
            f"Prefect's temporary API server did not start ({first_line}); use "
            "`pipeline run --local-server` (a server that stays up), set PREFECT_API_URL, or "
            "raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
        ) from None
