"""tasks/evaluate/metrics.py: every metric against a computation by hand (pure)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tasks.evaluate.metrics import (
    EvaluationError,
    confusion_matrix,
    expected_calibration_error,
    mean_cross_entropy,
    most_confident_errors,
    parse_training_history,
    per_class_metrics,
)
from tests.support.evaluate import _one_line

# --- pure metrics core, hand-computed cases -------------------------------------------------


def test_confusion_matrix_and_per_class_metrics_by_hand() -> None:
    labels = np.array([0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 1, 1, 1, 0, 0])  # class 2 is never predicted
    confusion = confusion_matrix(labels, predicted, num_classes=3)
    assert confusion.tolist() == [[1, 1, 0], [0, 2, 0], [2, 0, 0]]

    rows = per_class_metrics(confusion, class_names=("a", "b", "c"))
    assert [row["class"] for row in rows] == ["a", "b", "c"]
    assert [row["support"] for row in rows] == [2, 2, 2]
    assert [row["predicted"] for row in rows] == [3, 3, 0]
    # a: precision 1/3, recall 1/2, F1 = 2 * (1/6) / (5/6) = 0.4
    assert rows[0]["precision"] == pytest.approx(1 / 3)
    assert rows[0]["recall"] == rows[0]["accuracy"] == pytest.approx(0.5)
    assert rows[0]["f1"] == pytest.approx(0.4)
    # b: precision 2/3, recall 1, F1 = 2 * (2/3) / (5/3) = 0.8
    assert rows[1]["precision"] == pytest.approx(2 / 3)
    assert rows[1]["recall"] == pytest.approx(1.0)
    assert rows[1]["f1"] == pytest.approx(0.8)
    # c is never predicted: every ratio is the documented 0.0, not NaN
    assert (rows[2]["precision"], rows[2]["recall"], rows[2]["f1"]) == (0.0, 0.0, 0.0)


def test_class_without_images_has_zero_recall() -> None:
    confusion = confusion_matrix(np.array([0, 0]), np.array([0, 1]), num_classes=3)
    rows = per_class_metrics(confusion, class_names=("a", "b", "c"))
    assert rows[1]["support"] == 0 and rows[1]["recall"] == 0.0 and rows[1]["precision"] == 0.0
    assert rows[2] == {
        "class": "c",
        "support": 0,
        "predicted": 0,
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "accuracy": 0.0,
    }


def test_mean_cross_entropy_by_hand() -> None:
    probabilities = np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]])
    labels = np.array([0, 1])
    expected = -(math.log(0.5) + math.log(0.8)) / 2
    assert mean_cross_entropy(np.log(probabilities), labels) == pytest.approx(expected)
    # Scores are shift-invariant, and huge scores must not overflow.
    shifted = np.log(probabilities) + 1000.0
    assert mean_cross_entropy(shifted, labels) == pytest.approx(expected)


def test_expected_calibration_error_by_hand() -> None:
    probabilities = np.array(
        [
            [0.9, 0.05, 0.05],  # confidence 0.9 (bin 13 of 15), correct
            [0.9, 0.05, 0.05],  # confidence 0.9 (bin 13), wrong
            [0.2, 0.7, 0.1],  # confidence 0.7 (bin 10), correct
            [0.4, 0.5, 0.1],  # confidence 0.5 (bin 7), wrong
        ]
    )
    labels = np.array([0, 1, 1, 0])
    # 2/4 * |0.5 - 0.9| + 1/4 * |1 - 0.7| + 1/4 * |0 - 0.5| = 0.2 + 0.075 + 0.125
    assert expected_calibration_error(probabilities, labels) == pytest.approx(0.4)
    # Perfectly calibrated: four predictions at confidence 0.75, three of them right.
    calibrated = np.array([[0.75, 0.25], [0.75, 0.25], [0.75, 0.25], [0.25, 0.75]])
    labels = np.zeros(4, dtype=int)
    assert expected_calibration_error(calibrated, labels) == pytest.approx(0.0, abs=1e-12)


def test_most_confident_errors_orders_by_confidence() -> None:
    probabilities = np.array([[0.9, 0.1], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4], [0.55, 0.45]])
    labels = np.array([1, 0, 0, 0, 1])  # wrong: 0 (0.9), 1 (0.7), 2 (0.8), 4 (0.55)
    assert most_confident_errors(probabilities, labels, 3).tolist() == [0, 2, 1]
    assert most_confident_errors(probabilities, labels, 10).tolist() == [0, 2, 1, 4]


def test_malformed_training_history() -> None:
    with pytest.raises(EvaluationError) as info:
        parse_training_history('{"epoch": 1, "loss": 0.7}\n{"epoch": 2,\n', "x.jsonl")
    assert _one_line(info).startswith("x.jsonl: line 2 is not JSON")
