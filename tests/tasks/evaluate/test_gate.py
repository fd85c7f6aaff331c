"""tasks/evaluate/gate.py: the quality gate and the stored metrics it reads."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.evaluate.gate import QualityGateFailed, check_gate, quality_gate, read_metrics
from tasks.evaluate.metrics import (
    EvaluationError,
)
from tests.support.evaluate import _one_line


def test_quality_gate_and_check_gate() -> None:
    assert quality_gate(0.8, 0.8)["passed"] is True  # at the threshold passes
    gate = quality_gate(0.7912, 0.8)
    assert gate == {"metric": "accuracy", "threshold": 0.8, "value": 0.7912, "passed": False}
    check_gate({"gate": quality_gate(0.85, 0.8)})
    with pytest.raises(QualityGateFailed) as info:
        check_gate({"gate": gate})
    message = _one_line(info)
    assert "0.7912" in message and "0.8000" in message


def test_read_metrics_of_a_directory_without_report(tmp_path: Path) -> None:
    with pytest.raises(EvaluationError) as info:
        read_metrics(tmp_path.as_uri())
    assert tmp_path.as_uri() in _one_line(info)
