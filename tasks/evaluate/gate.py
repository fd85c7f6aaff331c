"""The quality gate: one function decides, one error says so (the flow, the CLI, the tests),
and one reader of the metrics it is recorded in."""

from __future__ import annotations

import json
from typing import Any

from pipeline.base.files import MAX_DOCUMENT_BYTES, UnsafeFileError, read_document_file
from pipeline.base.layout import METRICS_FILE
from pipeline.base.uris import local_path
from tasks.evaluate.metrics import EvaluationError


class QualityGateFailed(EvaluationError):
    """The model's test accuracy is below the configured threshold; it is stored for
    inspection but never promoted to latest."""


def quality_gate(accuracy: float, threshold: float) -> dict[str, Any]:
    """The gate record of metrics.json; a model passes at or above the threshold."""
    return {
        "metric": "accuracy",
        "threshold": threshold,
        "value": accuracy,
        "passed": accuracy >= threshold,
    }


def check_gate(metrics: dict[str, Any], detail: str = "") -> None:
    """Raise QualityGateFailed, stating the measured value and the threshold (and `detail`),
    if the gate failed."""
    gate = metrics["gate"]
    if not gate["passed"]:
        raise QualityGateFailed(
            f"quality gate failed: test {gate['metric']} {gate['value']:.4f} < "
            f"{gate['threshold']:.4f}{detail}"
        )


def gate_verdict(gate: dict[str, Any]) -> str:
    """ "passed: accuracy 0.8262 >= 0.8000" or "FAILED: ..."."""
    if gate["passed"]:
        return f"passed: {gate['metric']} {gate['value']:.4f} >= {gate['threshold']:.4f}"
    return f"FAILED: {gate['metric']} {gate['value']:.4f} < {gate['threshold']:.4f}"


def read_metrics(report_uri: str) -> dict[str, Any]:
    """The metrics.json of a report directory (file:// URI or path), checked for what the
    gate and the publish step need."""
    path = local_path(report_uri) / METRICS_FILE
    try:
        # Bounded and never through a link: the run directory is untrusted input.
        metrics = json.loads(read_document_file(path, MAX_DOCUMENT_BYTES))
    except UnsafeFileError as exc:
        raise EvaluationError(f"cannot read the metrics: {exc}") from None
    except FileNotFoundError:
        raise EvaluationError(
            f"{report_uri}: {METRICS_FILE} is missing: evaluate the run first ({path})"
        ) from None
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"{path}: cannot read the metrics ({exc})") from exc
    gate = metrics.get("gate") if isinstance(metrics, dict) else None
    if not (
        isinstance(gate, dict)
        and isinstance(gate.get("passed"), bool)
        and isinstance(metrics.get("accuracy"), int | float)
    ):
        raise EvaluationError(f"{path}: needs 'accuracy' and 'gate.passed' (the evaluate step's)")
    return metrics
