"""Evaluation metrics (pure: numpy only): accuracy, per-class metrics, calibration, the
confusion matrix, and the training history the report plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.base.errors import PipelineError
from tasks.dataset.idx import CLASS_NAMES

NUM_CLASSES = len(CLASS_NAMES)
ECE_BINS = 15


class EvaluationError(PipelineError, RuntimeError):
    """Evaluation or prediction cannot proceed; the one-line message names the URI or file."""


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax; shifting by the row maximum keeps exp() from overflowing."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise class probabilities of raw model scores."""
    return np.exp(log_softmax(logits))


def mean_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean softmax cross-entropy of raw scores, the loss the model was trained on."""
    return float(-log_softmax(logits)[np.arange(len(labels)), labels].mean())


def confusion_matrix(
    labels: np.ndarray, predicted: np.ndarray, num_classes: int = NUM_CLASSES
) -> np.ndarray:
    """Counts (num_classes x num_classes): rows are the true class, columns the predicted one."""
    flat = labels.astype(np.int64) * num_classes + predicted.astype(np.int64)
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator element-wise, defined as 0.0 where the denominator is 0."""
    return np.divide(
        numerator,
        denominator,
        out=np.zeros(len(numerator), dtype=np.float64),
        where=denominator > 0,
    )


def per_class_metrics(
    confusion: np.ndarray, class_names: Sequence[str] = CLASS_NAMES
) -> list[dict[str, Any]]:
    """Precision, recall, F1 and accuracy of each class, from a confusion matrix.

    A class's accuracy is the share of its images classified correctly (which equals its
    recall). Ratios with a zero denominator are defined as 0.0: precision of a class that is
    never predicted, recall/accuracy of a class with no images, and F1 when both are 0.
    """
    correct = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    precision = _ratio(correct, predicted)
    recall = _ratio(correct, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    return [
        {
            "class": name,
            "support": int(support[i]),
            "predicted": int(predicted[i]),
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "accuracy": float(recall[i]),
        }
        for i, name in enumerate(class_names)
    ]


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float:
    """ECE over `bins` equal-width bins of the top probability: sum_b n_b/N |acc_b - conf_b|.

    Bin b holds confidences in (b/bins, (b+1)/bins]; a softmax maximum is never 0.
    """
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    # n_b * |acc_b - conf_b| == |sum of correct_b - sum of confidence_b|, so per-bin sums suffice.
    confidence_sum = np.bincount(index, weights=confidence, minlength=bins)
    correct_sum = np.bincount(index, weights=correct, minlength=bins)
    return float(np.abs(correct_sum - confidence_sum).sum() / len(labels))


def compute_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """accuracy, mean_loss, ece, per_class and confusion_matrix of a model's raw test scores."""
    logits = logits.astype(np.float64)  # see model_logits
    probabilities = softmax(logits)
    confusion = confusion_matrix(labels, probabilities.argmax(axis=1))
    return {
        "accuracy": float(np.trace(confusion) / confusion.sum()),
        "mean_loss": mean_cross_entropy(logits, labels),
        "ece": expected_calibration_error(probabilities, labels),
        "per_class": per_class_metrics(confusion),
        "confusion_matrix": confusion.tolist(),
    }


def most_confident_errors(probabilities: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """Indices of up to `count` misclassified samples, most confident prediction first."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probabilities[wrong, predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")[:count]]


def parse_training_history(text: str, source: str) -> list[dict[str, Any]]:
    """The per-epoch records of a metrics/train.jsonl text (one JSON object per line)."""
    history = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvaluationError(f"{source}: line {number} is not JSON: {exc.msg}") from exc
        if not isinstance(record, dict) or not {"epoch", "loss"} <= record.keys():
            raise EvaluationError(f"{source}: line {number} has no 'epoch' and 'loss'")
        history.append(record)
    return history
