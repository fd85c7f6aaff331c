"""tasks/publish/failure.py: a failed run leaves failure.json in a real file store; a store that
refuses it, or no notification URL, never hides the run's error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.base.config import PipelineConfig
from tasks.evaluate.gate import QualityGateFailed
from tasks.publish.failure import failure_record, failures_reported, notify, write_failure
from tasks.train.errors import TrainingError


class Steps:
    current: str | None = "train"


def config_of(store: Path) -> PipelineConfig:
    return PipelineConfig(artifact_store=store.as_uri(), run_id="r1", work_dir=store / "w")


def test_the_record_keeps_the_first_line_rank_status_and_the_stderr_tail(tmp_path) -> None:
    lines = "\n".join(f"  line {i}" for i in range(50))
    error = TrainingError(f"rank 1 exited with status 137\n{lines}", rank=1, status=137)
    record = failure_record(config_of(tmp_path), "train", error, started=0.0, failed=1.0)
    assert (record.run_id, record.step, record.error_type) == ("r1", "train", "TrainingError")
    assert (record.rank, record.exit_status) == (1, 137)
    assert record.stderr_lines == [f"line {i}" for i in range(10, 50)]  # the last 40
    assert record.started_at < record.failed_at
    assert failure_record(config_of(tmp_path), "flow", ValueError(), 0, 0).error == "ValueError"


def test_a_failing_block_stores_failure_json_and_the_error_goes_on(tmp_path: Path) -> None:
    config = config_of(tmp_path / "store")
    with pytest.raises(TrainingError, match="rank 0 died"), failures_reported(config, Steps()):
        raise TrainingError("rank 0 died", rank=0, status=1)
    stored = json.loads((tmp_path / "store" / "runs" / "r1" / "failure.json").read_text())
    assert (stored["step"], stored["rank"], stored["error"]) == ("train", 0, "rank 0 died")


def test_a_missed_gate_is_recorded_as_step_gate(tmp_path: Path) -> None:
    config = config_of(tmp_path / "store")
    with pytest.raises(QualityGateFailed), failures_reported(config, Steps()):
        raise QualityGateFailed("accuracy 0.5 < 0.8")
    stored = json.loads((tmp_path / "store" / "runs" / "r1" / "failure.json").read_text())
    assert stored["step"] == "gate"


def test_a_store_that_refuses_the_record_is_logged_not_raised(tmp_path, caplog) -> None:
    (tmp_path / "file").write_text("a file where the store's directory should be")
    config = config_of(tmp_path / "file" / "store")
    record = failure_record(config, "train", RuntimeError("x"), 0, 0)
    assert write_failure(config, record) is None
    assert "could not store failure.json" in caplog.text


def test_without_a_url_nothing_is_sent() -> None:
    assert notify(None, "title", "body") is False
    assert notify("", "title", "body") is False
