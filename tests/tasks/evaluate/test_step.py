"""tasks/evaluate/step.py: evaluating a trained run, on a file store and on S3."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from mxnet import gluon, nd

from pipeline.base.config import PipelineConfig
from pipeline.base.errors import PipelineError
from pipeline.base.layout import MODEL_PARAMS
from tasks.dataset import CLASS_NAMES, FashionMNIST
from tasks.evaluate.gate import QualityGateFailed, check_gate, read_metrics
from tasks.evaluate.predict import predict
from tasks.evaluate.report import TRAINING_CURVES
from tasks.evaluate.step import evaluate_model
from tests.support.documents import manifest_bytes
from tests.support.evaluate import PASSING_THRESHOLD, TrainedRun, _one_line
from tests.support.steps import for_run

# --- the real model on the real test set ----------------------------------------------------


def test_evaluation_matches_independent_computation(
    report_dir: Path, trained_run: TrainedRun, data: FashionMNIST
) -> None:
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert read_metrics(report_dir.as_uri()) == metrics

    independent = trained_run.test_logits.argmax(axis=1)
    independent_accuracy = float((independent == data.test_labels).mean())
    assert independent_accuracy > PASSING_THRESHOLD
    assert metrics["accuracy"] == independent_accuracy
    assert metrics["train_accuracy"] == trained_run.summary["train_accuracy"]
    loss = gluon.loss.SoftmaxCrossEntropyLoss()(
        nd.array(trained_run.test_logits), nd.array(data.test_labels)
    )
    assert metrics["mean_loss"] == pytest.approx(float(loss.mean().asscalar()), rel=1e-5)
    assert 0.0 <= metrics["ece"] <= 1.0

    confusion = np.array(metrics["confusion_matrix"])
    assert confusion.shape == (10, 10)
    assert confusion.sum() == 10_000
    assert confusion.sum(axis=1).tolist() == np.bincount(data.test_labels, minlength=10).tolist()
    assert confusion.sum(axis=0).tolist() == np.bincount(independent, minlength=10).tolist()
    assert [row["class"] for row in metrics["per_class"]] == list(CLASS_NAMES)
    for i, row in enumerate(metrics["per_class"]):
        of_class = data.test_labels == i
        assert row["accuracy"] == pytest.approx(float((independent[of_class] == i).mean()))

    assert metrics["gate"] == {
        "metric": "accuracy",
        "threshold": PASSING_THRESHOLD,
        "value": independent_accuracy,
        "passed": True,
    }


def test_failing_gate_on_a_model_only_run_dir(
    trained_run: TrainedRun, data: FashionMNIST, data_uri: str, tmp_path: Path
) -> None:
    # A run directory with only model/ (no training metrics) evaluated by plain path.
    run_dir = tmp_path / "copied-run"
    shutil.copytree(trained_run.run_dir / "model", run_dir / "model")
    achieved = float((trained_run.test_logits.argmax(axis=1) == data.test_labels).mean())
    threshold = min(1.0, achieved + 0.01)
    config = PipelineConfig(work_dir=tmp_path, min_test_accuracy=threshold)

    out_dir = tmp_path / "evaluation"
    metrics = evaluate_model(str(run_dir), out_dir, for_run(config, data_uri))

    assert metrics["gate"] == {
        "metric": "accuracy",
        "threshold": threshold,
        "value": achieved,
        "passed": False,
    }
    assert metrics["train_accuracy"] is None
    report = (out_dir / "report.md").read_text()
    assert f"FAILED: accuracy {achieved:.4f} < {threshold:.4f}" in report
    assert "n/a (no metrics/train.json)" in report
    # Without a training history there is no training-curves picture, and no link to one.
    assert not (out_dir / TRAINING_CURVES.file_name).exists()
    assert TRAINING_CURVES.file_name not in report
    with pytest.raises(QualityGateFailed) as info:
        check_gate(metrics)
    message = _one_line(info)
    assert f"{achieved:.4f}" in message and f"{threshold:.4f}" in message


@pytest.mark.s3
def test_evaluate_and_predict_a_run_stored_in_s3(
    s3_env,
    s3_store_uri: str,
    trained_run: TrainedRun,
    data: FashionMNIST,
    data_uri: str,
    image_png: Path,
    tmp_path: Path,
) -> None:
    # The fixture run, uploaded as the train step leaves it (model/ and metrics/), no manifest.
    bucket, prefix = s3_store_uri.removeprefix("s3://").split("/", 1)
    client = s3_env.client()
    objects = {}
    for path in sorted(trained_run.run_dir.glob("*/*")):
        relative = path.relative_to(trained_run.run_dir).as_posix()
        if relative.startswith(("model/", "metrics/")):
            client.upload_file(str(path), bucket, f"{prefix}/runs/fixture-run/{relative}")
            content = path.read_bytes()
            objects[relative] = {
                "size": len(content),
                "sha256": hashlib.sha256(content).hexdigest(),
            }
    run_uri = f"{s3_store_uri}/runs/fixture-run"
    config = PipelineConfig(
        s3_endpoint_url=s3_env.endpoint, min_test_accuracy=PASSING_THRESHOLD, work_dir=tmp_path
    )
    # Without a manifest it is an unfinished publish: readers refuse it (issue 15, item 9).
    for read in (
        lambda: evaluate_model(run_uri, tmp_path / "report", for_run(config, data_uri)),
        lambda: predict(run_uri, [image_png], config),
    ):
        with pytest.raises(PipelineError) as info:
            read()
        assert "has no manifest.json" in _one_line(info)
    manifest_key = f"{prefix}/runs/fixture-run/manifest.json"
    client.put_object(Bucket=bucket, Key=manifest_key, Body=manifest_bytes("fixture-run", objects))

    metrics = evaluate_model(run_uri, tmp_path / "report", for_run(config, data_uri))
    [prediction] = predict(run_uri, [image_png], config)

    independent = trained_run.test_logits.argmax(axis=1)
    assert metrics["accuracy"] == float((independent == data.test_labels).mean())
    assert metrics["train_accuracy"] == trained_run.summary["train_accuracy"]
    assert (tmp_path / "report" / TRAINING_CURVES.file_name).is_file()
    assert run_uri in (tmp_path / "report" / "report.md").read_text()
    assert prediction.label == CLASS_NAMES[independent[0]]

    # A published run whose params were swapped is refused before MXNet reads a byte of it.
    params_key = f"{prefix}/runs/fixture-run/{MODEL_PARAMS}"
    client.put_object(Bucket=bucket, Key=params_key, Body=b"\0" * objects[MODEL_PARAMS]["size"])
    with pytest.raises(PipelineError) as info:
        predict(run_uri, [image_png], config)
    assert f"{MODEL_PARAMS}: stored bytes" in _one_line(info)

    missing = f"{s3_store_uri}/runs/no-such-run"
    with pytest.raises(PipelineError) as info:
        predict(missing, [image_png], config)
    assert missing in _one_line(info)
