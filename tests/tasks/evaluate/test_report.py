"""tasks/evaluate/report.py: the report's pictures and markdown, and Prefect artifacts."""

from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

from PIL import Image
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from pipeline.base.config import PipelineConfig
from tasks.dataset import CLASS_NAMES
from tasks.evaluate.gate import read_metrics
from tasks.evaluate.report import CONFUSION_MATRIX, PICTURES
from tasks.evaluate.step import evaluate, evaluate_model
from tests.support.evaluate import PASSING_THRESHOLD, TrainedRun
from tests.support.steps import for_run


def test_report_pictures_and_markdown(report_dir: Path, trained_run: TrainedRun) -> None:
    report = (report_dir / "report.md").read_text()
    metrics = read_metrics(str(report_dir))
    for picture in PICTURES:
        with Image.open(report_dir / picture.file_name) as image:
            assert image.format == "PNG"
            assert image.size == picture.size_pixels
        assert f"]({picture.file_name})" in report
    assert f"{metrics['accuracy']:.4f}" in report
    assert f"{trained_run.summary['train_accuracy']:.4f}" in report
    assert f"passed: accuracy {metrics['accuracy']:.4f} >= {PASSING_THRESHOLD:.4f}" in report
    for name in CLASS_NAMES:
        assert f"| {name} |" in report


# --- Prefect artifacts ----------------------------------------------------------------------


def _artifacts(flow_run_id=None) -> list:
    with get_client(sync_client=True) as client:
        if flow_run_id is None:
            return client.read_artifacts()
        return client.read_artifacts(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )


def test_prefect_artifacts_only_inside_a_flow_run(
    prefect_api, trained_run: TrainedRun, data_uri: str, tmp_path: Path
) -> None:
    config = PipelineConfig(work_dir=tmp_path, min_test_accuracy=PASSING_THRESHOLD)
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run.run_dir, run_dir, ignore=shutil.ignore_patterns("report"))

    # A plain call (as the CLI makes) has no run context: no artifacts (the server is shared
    # with other tests, so count what it held before).
    before = len(_artifacts())
    evaluate_model(str(run_dir), tmp_path / "plain", for_run(config, data_uri))
    assert len(_artifacts()) == before

    @task(name="evaluate")
    def evaluate_step(run_dir_uri: str) -> str:
        evaluate(for_run(config, data_uri, run_dir_uri))
        return str(run_dir / "report")

    @flow(name="evaluate-test")
    def evaluation_flow() -> str:
        return evaluate_step(run_dir.as_uri())

    state = evaluation_flow(return_state=True)
    assert state.is_completed()
    metrics = read_metrics(state.result())

    artifacts = {a.key: a for a in _artifacts(state.state_details.flow_run_id)}
    assert set(artifacts) == {"evaluation-report", "per-class-metrics"}

    markdown = artifacts["evaluation-report"]
    assert markdown.type == "markdown"
    assert f"| test accuracy | {metrics['accuracy']:.4f} |" in markdown.data
    assert f"{metrics['accuracy']:.4f}" in markdown.description
    prefix = "](data:image/png;base64,"
    assert markdown.data.count(prefix) == len(PICTURES)
    embedded = markdown.data.split(prefix, 1)[1].split(")", 1)[0]
    with Image.open(io.BytesIO(base64.b64decode(embedded))) as image:
        assert image.size == CONFUSION_MATRIX.size_pixels

    table = artifacts["per-class-metrics"]
    assert table.type == "table"
    rows = json.loads(table.data)
    assert rows == metrics["per_class"]
