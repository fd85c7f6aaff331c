"""Hyper-parameter sweep (the seed's exercise 1: "try adjusting batch size, epochs and lr").

Every point of the grid is a run of the whole pipeline (`training_pipeline` as a subflow, so
with its step timeouts, failure record and gate) with its own run id; the trials are Prefect
tasks submitted at most `max_parallel` at a time. The best point is
chosen by validation accuracy, never by test accuracy (that would tune on the test set); its
test accuracy is reported beside it.
"""

from __future__ import annotations

import itertools
import json
from contextlib import suppress
from pathlib import Path
from typing import Literal

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, Field

from pipeline.base import layout
from pipeline.base.config import SWEEPABLE, PipelineConfig
from pipeline.base.errors import PipelineError
from pipeline.base.files import MAX_DOCUMENT_BYTES, read_document_file
from pipeline.flow import (
    QualityGateFailed,
    dataset_step,
    new_run_id,
    published_uri,
    training_pipeline,
)
from tasks.evaluate.report import png_data_uri
from tasks.publish.artifacts import show_run

SweepParameter = Literal[tuple(SWEEPABLE)]
DEFAULT_VALIDATION_FRACTION = 0.1


class SweepError(PipelineError):
    """A grid that cannot be swept; the message says why."""


class Trial(BaseModel):
    """One point of the grid and what its run measured."""

    params: dict[str, float | int]
    run_id: str
    train_accuracy: float | None
    val_accuracy: float
    test_accuracy: float
    gate_passed: bool
    published_uri: str


class SweepResult(BaseModel):
    sweep_id: str
    trials: list[Trial]
    best: Trial = Field(description="the trial with the highest validation accuracy")
    plot: str


# --- pure core --------------------------------------------------------------------------------


def grid_points(grid: dict[SweepParameter, list[float]]) -> list[dict[str, float | int]]:
    """Every combination of the grid's values, in a stable order."""
    if not grid or any(not values for values in grid.values()):
        raise SweepError("the grid needs at least one value for each parameter it names")
    names = sorted(grid)
    return [
        {name: SWEEPABLE[name](value) for name, value in zip(names, combo, strict=True)}
        for combo in itertools.product(*(grid[name] for name in names))
    ]


def best_trial(trials: list[Trial]) -> Trial:
    """The trial with the highest validation accuracy (earlier trial wins a tie)."""
    return max(trials, key=lambda trial: trial.val_accuracy)


def comparison_rows(trials: list[Trial], best: Trial) -> list[dict]:
    return [
        {
            **trial.params,
            "val_accuracy": round(trial.val_accuracy, 4),
            "test_accuracy": round(trial.test_accuracy, 4),
            "train_accuracy": trial.train_accuracy and round(trial.train_accuracy, 4),
            "gate": "passed" if trial.gate_passed else "failed",
            "run_id": trial.run_id,
            "best": "<- best" if trial.run_id == best.run_id else "",
        }
        for trial in trials
    ]


def plot_comparison(trials: list[Trial], path: Path) -> Path:
    """Validation and test accuracy against each swept parameter, one panel each."""
    names = sorted(trials[0].params)
    figure = Figure(figsize=(4.5 * len(names), 4), dpi=100)
    FigureCanvasAgg(figure)
    for index, name in enumerate(names, start=1):
        axes = figure.add_subplot(1, len(names), index)
        x = [trial.params[name] for trial in trials]
        axes.scatter(x, [t.val_accuracy for t in trials], label="validation", marker="o")
        axes.scatter(x, [t.test_accuracy for t in trials], label="test", marker="x")
        if name == "lr":
            axes.set_xscale("log")
        axes.set_xlabel(name)
        axes.set_ylabel("accuracy")
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle("Sweep: accuracy against each hyper-parameter")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path


# --- the flow ---------------------------------------------------------------------------------


@task(name="trial")
def run_trial(config: PipelineConfig) -> Trial:
    """One point of the grid: the whole pipeline as a subflow run (its preflight, step
    timeouts, failure record and gate), read back from the store as any later reader would."""
    # Below the gate the run is published but not promoted; the trial records gate_passed.
    with suppress(QualityGateFailed):
        training_pipeline(config=config)
    metrics = show_run(config, config.run_id)["metrics"]
    summary = config.run_dir() / layout.TRAIN_SUMMARY
    trained = json.loads(read_document_file(summary, MAX_DOCUMENT_BYTES))
    return Trial(
        params={name: getattr(config, name) for name in SWEEPABLE},
        run_id=config.run_id,
        train_accuracy=metrics.get("train_accuracy"),
        val_accuracy=trained["val_accuracy"],
        test_accuracy=metrics["accuracy"],
        gate_passed=metrics["gate"]["passed"],
        published_uri=published_uri(config),
    )


@flow(name="hyperparameter_sweep")
def hyperparameter_sweep(
    grid: dict[SweepParameter, list[float]],
    config: PipelineConfig | None = None,
    max_parallel: int = 2,
) -> SweepResult:
    """Train every point of `grid` (at most `max_parallel` at once); name the best by validation."""
    config = config or PipelineConfig()
    if max_parallel < 1:
        raise SweepError(f"max_parallel={max_parallel}: at least one training must run")
    # Choosing by validation accuracy needs a validation split; hold 10% out unless configured.
    base = config.model_copy(
        update={"validation_fraction": config.validation_fraction or DEFAULT_VALIDATION_FRACTION}
    )
    sweep_id = f"sweep-{new_run_id()}"
    points = grid_points(grid)
    dataset_step(base)  # once, before the trials: each of them then finds the cache warm

    trials: list[Trial] = []
    for start in range(0, len(points), max_parallel):
        batch = points[start : start + max_parallel]
        futures = [
            run_trial.submit(
                PipelineConfig.model_validate(
                    {
                        **base.model_dump(),
                        "notify_url": base.notify_url,  # excluded from dumps (a credential)
                        **point,
                        "run_id": f"{sweep_id}-{start + i:02d}",
                    }
                ),
            )
            for i, point in enumerate(batch)
        ]
        trials += [future.result() for future in futures]

    best = best_trial(trials)
    plot = plot_comparison(trials, base.work_dir.resolve() / layout.sweep_plot(sweep_id))
    create_table_artifact(
        key="sweep-comparison",
        table=comparison_rows(trials, best),
        description=f"{sweep_id}: {len(trials)} trainings; best by validation accuracy",
    )
    best_params = ", ".join(f"{name}={value}" for name, value in best.params.items())
    create_markdown_artifact(
        key="sweep-best",
        markdown=(
            f"# {sweep_id}\n\nBest configuration by **validation** accuracy: `{best_params}` "
            f"(validation {best.val_accuracy:.4f}, test {best.test_accuracy:.4f}, run "
            f"`{best.run_id}`).\n\n![accuracy against each hyper-parameter]"
            f"({png_data_uri(plot)})\n"
        ),
    )
    print(
        f"{sweep_id}: best by validation accuracy {best_params}: validation "
        f"{best.val_accuracy:.4f}, test {best.test_accuracy:.4f} (run {best.run_id})"
    )
    return SweepResult(sweep_id=sweep_id, trials=trials, best=best, plot=str(plot))
