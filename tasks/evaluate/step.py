"""The evaluate step's shell: a stored run's model on the test set -> report/ and the gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.base import layout
from pipeline.base.config import PipelineConfig
from pipeline.base.files import (
    MAX_DOCUMENT_BYTES,
    UnsafeFileError,
    atomic_write,
    read_document_file,
)
from pipeline.base.layout import METRICS_FILE, REPORT_FILE
from pipeline.base.logs import step_logger
from pipeline.base.uris import to_uri
from tasks.dataset import load_dataset
from tasks.evaluate.gate import gate_verdict, quality_gate
from tasks.evaluate.metrics import EvaluationError, compute_metrics, parse_training_history, softmax
from tasks.evaluate.model_io import load_model, local_run_dir, model_logits
from tasks.evaluate.report import (
    create_prefect_artifacts,
    plot_confusion_matrix,
    plot_misclassified,
    plot_per_class_accuracy,
    plot_training_curves,
    render_report,
)


def _read_text(path: Path) -> str | None:
    """A run directory's small text file (bounded, never through a link); None when absent."""
    try:
        return read_document_file(path, MAX_DOCUMENT_BYTES).decode(errors="replace")
    except FileNotFoundError:
        return None
    except (OSError, UnsafeFileError) as exc:
        raise EvaluationError(f"{path}: cannot read: {exc}") from exc


def read_training_metrics(run_dir: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The train step's summary (None if absent) and per-epoch history ([] if absent)."""
    summary_path, history_path = run_dir / layout.TRAIN_SUMMARY, run_dir / layout.TRAIN_HISTORY
    summary_text, history_text = _read_text(summary_path), _read_text(history_path)
    try:
        summary = None if summary_text is None else json.loads(summary_text)
    except json.JSONDecodeError as exc:
        raise EvaluationError(f"{summary_path}: cannot read JSON: {exc}") from exc
    history = (
        [] if history_text is None else parse_training_history(history_text, str(history_path))
    )
    return summary, history


def evaluate_model(model: str | Path, out_dir: Path, config: PipelineConfig) -> dict[str, Any]:
    """Evaluate a stored run's model on the test set of `config.data_uri()` and write the
    report into `out_dir`.

    `model` is a run directory: a local Path, or a URI (a path, file://PATH or
    s3://BUCKET/PREFIX/runs/RUN_ID). Returns the metrics as written to metrics.json. Does not
    raise on a failing gate: the caller decides (the flow publishes first; the CLI calls
    `check_gate`).
    """
    model_uri = to_uri(model) if isinstance(model, Path) else model  # how the report names it
    with local_run_dir(model, config.s3_endpoint_url, config.s3_timeouts()) as run_dir:
        net = load_model(run_dir, model_uri)
        train_summary, history = read_training_metrics(run_dir)
    data = load_dataset(config.data_uri())
    logits = model_logits(net, data.test_images)
    core = compute_metrics(logits, data.test_labels)
    metrics = {
        "accuracy": core["accuracy"],
        "train_accuracy": train_summary.get("train_accuracy") if train_summary else None,
        "mean_loss": core["mean_loss"],
        "ece": core["ece"],
        "per_class": core["per_class"],
        "confusion_matrix": core["confusion_matrix"],
        "gate": quality_gate(core["accuracy"], config.min_test_accuracy),
    }

    out_dir.mkdir(parents=True, exist_ok=True)
    probabilities = softmax(logits)
    pictures = [
        plot_confusion_matrix(np.asarray(core["confusion_matrix"]), out_dir),
        plot_per_class_accuracy(core["per_class"], core["accuracy"], out_dir),
    ]
    if history:
        best_epoch = train_summary.get("best_epoch") if train_summary else None
        pictures.append(plot_training_curves(history, out_dir, best_epoch))
    pictures.append(plot_misclassified(data.test_images, data.test_labels, probabilities, out_dir))
    links = {path.name: path.name for path in pictures}
    atomic_write(out_dir / REPORT_FILE, render_report(metrics, model_uri, links))
    # metrics.json last: its presence means the report is complete.
    atomic_write(out_dir / METRICS_FILE, json.dumps(metrics, indent=2))
    create_prefect_artifacts(metrics, model_uri, pictures)
    return metrics


def evaluate(config: PipelineConfig) -> None:
    """The flow's evaluate step: the model of `config.run_dir()`, reported into its report/."""
    run_dir = config.run_dir()
    metrics = evaluate_model(run_dir, run_dir / layout.REPORT_DIR, config)
    step_logger(__name__).info(
        f"test accuracy {metrics['accuracy']:.4f}, mean loss {metrics['mean_loss']:.4f}, "
        f"ECE {metrics['ece']:.4f}; quality gate {gate_verdict(metrics['gate'])}"
    )
