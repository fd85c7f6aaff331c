"""Tests of the evaluate step with a real model trained here on the real Fashion-MNIST files.

The fixture model is a few hundred SGD steps of the seed's softmax regression, trained directly
with Gluon (not through the train step, which is developed separately) and exported exactly as
the run-directory layout prescribes. Every expected number is measured independently here.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import math
import shutil
import struct
import time
import zlib
from pathlib import Path
from typing import NamedTuple

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon, nd
from mxnet.gluon import nn
from PIL import Image
from prefect import flow, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from pipeline.base.config import PipelineConfig
from pipeline.base.errors import PipelineError
from pipeline.base.layout import MODEL_PARAMS
from tasks.dataset import CLASS_NAMES, FashionMNIST, load_dataset, prepare_dataset
from tasks.evaluate.gate import QualityGateFailed, check_gate, quality_gate, read_metrics
from tasks.evaluate.metrics import (
    EvaluationError,
    confusion_matrix,
    expected_calibration_error,
    mean_cross_entropy,
    most_confident_errors,
    parse_training_history,
    per_class_metrics,
)
from tasks.evaluate.model_io import ModelFormatError, ModelNotFoundError
from tasks.evaluate.predict import TOP_K, InputError, format_predictions, predict, read_input_images
from tasks.evaluate.report import CONFUSION_MATRIX, PICTURES, TRAINING_CURVES
from tasks.evaluate.step import evaluate, evaluate_model
from tests.support.documents import manifest_bytes
from tests.support.steps import for_run

# The Debian copy of the real data set, used as the only mirror of a per-module cache.
DEBIAN_MIRROR = "file:///usr/share/datasets/fashion-mnist/"
EPOCHS = 3
STEPS_PER_EPOCH = 100
BATCH_SIZE = 256
PASSING_THRESHOLD = 0.5  # far below what even a few hundred steps reach (asserted below)


class TrainedRun(NamedTuple):
    run_dir: Path
    test_logits: np.ndarray  # the in-memory model's test-set scores: independent expectations
    summary: dict  # metrics/train.json as written


def _flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), 784).astype(np.float32) / 255


def _accuracy(net: nn.Dense, images: np.ndarray, labels: np.ndarray) -> float:
    return float((net(nd.array(_flat(images))).asnumpy().argmax(axis=1) == labels).mean())


def _export(net: gluon.HybridBlock, run_dir: Path) -> None:
    (run_dir / "model").mkdir(parents=True, exist_ok=True)
    net.export(str(run_dir / "model" / "model"))  # model-symbol.json + model-0000.params
    net.save_parameters(str(run_dir / "model" / "model.params"))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def data_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    config = PipelineConfig(mirrors=[DEBIAN_MIRROR], data_dir=tmp_path_factory.mktemp("data"))
    return prepare_dataset(config)


@pytest.fixture(scope="module")
def data(data_uri: str) -> FashionMNIST:
    return load_dataset(data_uri)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory, data: FashionMNIST) -> TrainedRun:
    run_dir = tmp_path_factory.mktemp("run")
    mx.random.seed(0)
    rng = np.random.default_rng(0)
    net = nn.Dense(10)
    net.initialize(mx.init.Normal(0.01))
    net.hybridize()
    loss_fn = gluon.loss.SoftmaxCrossEntropyLoss()
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 0.1})
    train_x, train_y = _flat(data.train_images), data.train_labels.astype(np.float32)
    history = []
    started = time.perf_counter()
    for epoch in range(1, EPOCHS + 1):
        epoch_start, losses = time.perf_counter(), []
        for _ in range(STEPS_PER_EPOCH):
            batch = rng.integers(0, len(train_x), BATCH_SIZE)
            with autograd.record():
                loss = loss_fn(net(nd.array(train_x[batch])), nd.array(train_y[batch]))
            loss.backward()
            trainer.step(BATCH_SIZE)
            losses.append(float(loss.mean().asscalar()))
        history.append(
            {
                "epoch": epoch,
                "loss": float(np.mean(losses)),
                "train_accuracy": _accuracy(net, data.train_images, data.train_labels),
                "test_accuracy": _accuracy(net, data.test_images, data.test_labels),
                "seconds": time.perf_counter() - epoch_start,
            }
        )
    _export(net, run_dir)
    summary = {
        "epochs": EPOCHS,
        "train_accuracy": history[-1]["train_accuracy"],
        "test_accuracy": history[-1]["test_accuracy"],
        "val_accuracy": None,
        "best_epoch": EPOCHS,
        "num_proc": 1,
        "seconds": time.perf_counter() - started,
    }
    (run_dir / "metrics").mkdir()
    (run_dir / "metrics" / "train.jsonl").write_text(
        "".join(json.dumps(record) + "\n" for record in history)
    )
    (run_dir / "metrics" / "train.json").write_text(json.dumps(summary))
    test_logits = net(nd.array(_flat(data.test_images))).asnumpy()
    return TrainedRun(run_dir, test_logits, summary)


@pytest.fixture(scope="module")
def report_dir(
    trained_run: TrainedRun, data_uri: str, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    config = PipelineConfig(
        work_dir=tmp_path_factory.mktemp("work"), min_test_accuracy=PASSING_THRESHOLD
    )
    evaluate(for_run(config, data_uri, trained_run.run_dir.as_uri()))
    assert (trained_run.run_dir / "report" / "metrics.json").is_file()  # the step's output
    return trained_run.run_dir / "report"


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> PipelineConfig:
    return PipelineConfig(work_dir=tmp_path_factory.mktemp("work"))


@pytest.fixture(scope="module")
def image_png(tmp_path_factory: pytest.TempPathFactory, data: FashionMNIST) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "test-0.png"
    Image.fromarray(data.test_images[0], mode="L").save(path)
    return path


def _softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits.astype(np.float64) - logits.max())
    return exp / exp.sum()


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


def test_quality_gate_and_check_gate() -> None:
    assert quality_gate(0.8, 0.8)["passed"] is True  # at the threshold passes
    gate = quality_gate(0.7912, 0.8)
    assert gate == {"metric": "accuracy", "threshold": 0.8, "value": 0.7912, "passed": False}
    check_gate({"gate": quality_gate(0.85, 0.8)})
    with pytest.raises(QualityGateFailed) as info:
        check_gate({"gate": gate})
    message = _one_line(info)
    assert "0.7912" in message and "0.8000" in message


def test_most_confident_errors_orders_by_confidence() -> None:
    probabilities = np.array([[0.9, 0.1], [0.3, 0.7], [0.2, 0.8], [0.6, 0.4], [0.55, 0.45]])
    labels = np.array([1, 0, 0, 0, 1])  # wrong: 0 (0.9), 1 (0.7), 2 (0.8), 4 (0.55)
    assert most_confident_errors(probabilities, labels, 3).tolist() == [0, 2, 1]
    assert most_confident_errors(probabilities, labels, 10).tolist() == [0, 2, 1, 4]


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


# --- predict --------------------------------------------------------------------------------


def test_predict_png_as_is_and_warns_on_light_background(
    trained_run: TrainedRun, data: FashionMNIST, image_png: Path, config: PipelineConfig
) -> None:
    inverted = image_png.with_name("inverted.png")
    Image.fromarray(255 - data.test_images[0], mode="L").save(inverted)

    plain, light = predict(trained_run.run_dir.as_uri(), [image_png, inverted], config)

    expected = _softmax(trained_run.test_logits[0])
    ranked = np.argsort(-expected)[:TOP_K]
    assert plain.source == "test-0.png"
    assert [name for name, _ in plain.top] == [CLASS_NAMES[i] for i in ranked]
    assert [p for _, p in plain.top] == pytest.approx(expected[ranked].tolist(), rel=1e-4)
    assert plain.label == CLASS_NAMES[ranked[0]]
    assert plain.notes == ()
    # Not inverted, but the user is told why the prediction may be poor.
    assert len(light.notes) == 1
    assert "light background" in light.notes[0] and "not inverted" in light.notes[0]

    printed = format_predictions([plain, light])
    assert f"{plain.label} {plain.top[0][1]:.1%}" in printed
    assert "light background" in printed


def test_predict_bigger_rgb_jpeg_states_the_conversion(
    trained_run: TrainedRun, data: FashionMNIST, tmp_path: Path, config: PipelineConfig
) -> None:
    original = data.test_images[1]
    jpeg = tmp_path / "big.jpg"
    Image.fromarray(original, mode="L").resize((112, 112), Image.Resampling.NEAREST).convert(
        "RGB"
    ).save(jpeg, quality=95)

    [prediction] = predict(str(trained_run.run_dir), [jpeg], config)

    assert prediction.notes == ("converted RGB to grayscale", "resized 112x112 to 28x28")
    probabilities = [p for _, p in prediction.top]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0001
    # The converted pixels are the original image, up to JPEG and resampling error.
    [(_, pixels, _)] = read_input_images(jpeg)
    assert pixels.shape == (28, 28) and pixels.dtype == np.uint8
    assert np.abs(pixels.astype(int) - original.astype(int)).mean() < 8
    assert "converted RGB to grayscale" in format_predictions([prediction])


def test_predict_idx_raw_and_gzipped(
    trained_run: TrainedRun, data: FashionMNIST, tmp_path: Path, config: PipelineConfig
) -> None:
    count = 7
    idx = struct.pack(">BBBBIII", 0, 0, 8, 3, count, 28, 28) + data.test_images[:count].tobytes()
    raw_path, gz_path = tmp_path / "few-images-idx3-ubyte", tmp_path / "few-images-idx3-ubyte.gz"
    raw_path.write_bytes(idx)
    gz_path.write_bytes(gzip.compress(idx))

    predictions = predict(str(trained_run.run_dir), [raw_path, gz_path], config)

    expected = [CLASS_NAMES[i] for i in trained_run.test_logits[:count].argmax(axis=1)]
    assert [p.label for p in predictions] == expected * 2
    assert [p.source for p in predictions[:2]] == [
        "few-images-idx3-ubyte[0]",
        "few-images-idx3-ubyte[1]",
    ]
    assert predictions[count].source == "few-images-idx3-ubyte.gz[0]"
    assert all(p.notes == () and len(p.top) == TOP_K for p in predictions)


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


# --- bad input ------------------------------------------------------------------------------


def test_missing_model_uri(
    tmp_path: Path, image_png: Path, data_uri: str, config: PipelineConfig
) -> None:
    missing = tmp_path / "runs" / "no-such-run"
    for uri in (str(missing), missing.as_uri()):
        with pytest.raises(ModelNotFoundError) as info:
            predict(uri, [image_png], config)
        message = _one_line(info)
        assert uri in message and "model/model-symbol.json" in message
    with pytest.raises(EvaluationError) as info:
        evaluate_model("http://example.com/run", tmp_path / "out", for_run(config, data_uri))
    assert "unsupported URI scheme 'http'" in _one_line(info)


@pytest.mark.parametrize(
    ("units", "in_units", "expected"),
    [
        (5, 784, "output of shape (5,) per image, expected 10 class scores"),
        (10, 100, "does not take a 28x28 image as 784 inputs"),
    ],
)
def test_model_of_the_wrong_shape(
    units: int,
    in_units: int,
    expected: str,
    tmp_path: Path,
    image_png: Path,
    config: PipelineConfig,
) -> None:
    net = nn.Dense(units, in_units=in_units)
    net.initialize(mx.init.Normal(0.01))
    net.hybridize()
    net(nd.zeros((1, in_units)))  # a hybridized block is exported after one forward pass
    _export(net, tmp_path)

    with pytest.raises(ModelFormatError) as info:
        predict(str(tmp_path), [image_png], config)
    message = _one_line(info)
    assert str(tmp_path) in message and expected in message


def test_corrupted_params_file(
    trained_run: TrainedRun, data_uri: str, tmp_path: Path, config: PipelineConfig
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run.run_dir / "model", run_dir / "model")
    params = run_dir / "model" / "model-0000.params"
    params.write_bytes(params.read_bytes()[: params.stat().st_size // 2])  # a cut-off download

    with pytest.raises(ModelFormatError) as info:
        evaluate_model(run_dir.as_uri(), tmp_path / "out", for_run(config, data_uri))
    message = _one_line(info)
    assert run_dir.as_uri() in message and "model-0000.params" in message
    assert "Invalid NDArray file format" in message  # MXNet's own reason, without its trace


def test_params_file_of_another_model(
    trained_run: TrainedRun, tmp_path: Path, image_png: Path, config: PipelineConfig
) -> None:
    other = nn.Dense(10, in_units=784, prefix="other_")  # same shapes, other parameter names
    other.initialize()
    other.hybridize()
    other(nd.zeros((1, 784)))
    _export(other, tmp_path / "other")
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run.run_dir / "model", run_dir / "model")
    shutil.copyfile(
        tmp_path / "other" / "model" / "model-0000.params", run_dir / "model" / "model-0000.params"
    )

    with pytest.raises(ModelFormatError) as info:
        predict(str(run_dir), [image_png], config)
    message = _one_line(info)
    assert str(run_dir) in message and "is missing in file" in message


def test_inputs_that_are_not_images(
    trained_run: TrainedRun, data: FashionMNIST, tmp_path: Path, config: PipelineConfig
) -> None:
    text = tmp_path / "notes.png"
    text.write_text("these are my notes, not a picture\n")
    buffer = io.BytesIO()
    Image.fromarray(data.test_images[0], mode="L").save(buffer, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(buffer.getvalue()[:60])
    labels = tmp_path / "labels-idx1-ubyte"
    labels.write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 3) + bytes([1, 2, 3]))
    bad_gzip = tmp_path / "broken.gz"
    bad_gzip.write_bytes(gzip.compress(b"x" * 100)[:20])

    cases = {
        text: "not a PNG/JPEG image nor an IDX file",
        truncated: "cannot decode the image",
        labels: "is it a labels file?",
        bad_gzip: "corrupt gzip data",
        tmp_path / "absent.png": "cannot read: No such file or directory",
    }
    for path, expected in cases.items():
        with pytest.raises(InputError) as info:
            predict(str(trained_run.run_dir), [path], config)
        message = _one_line(info)
        assert str(path) in message and expected in message


def test_read_metrics_of_a_directory_without_report(tmp_path: Path) -> None:
    with pytest.raises(EvaluationError) as info:
        read_metrics(tmp_path.as_uri())
    assert tmp_path.as_uri() in _one_line(info)


def test_malformed_training_history() -> None:
    with pytest.raises(EvaluationError) as info:
        parse_training_history('{"epoch": 1, "loss": 0.7}\n{"epoch": 2,\n', "x.jsonl")
    assert _one_line(info).startswith("x.jsonl: line 2 is not JSON")


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


# --- untrusted inputs and unverified runs (issue 15, items 7 and 9) ---------------------------


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels, with no pixel data at all."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_predict_refuses_decompression_bombs(
    trained_run: TrainedRun, tmp_path: Path, config: PipelineConfig
) -> None:
    huge = tmp_path / "huge.png"  # 400 M pixels: PIL raises DecompressionBombError
    huge.write_bytes(_png_header_only(20_000, 20_000))
    large = tmp_path / "large.png"  # 144 M pixels: PIL only warns, then decodes
    large.write_bytes(_png_header_only(12_000, 12_000))
    idx_bomb = tmp_path / "bomb-idx3-ubyte.gz"  # 80 KB that inflate to 80 MB
    side = 28 * 28
    count = 80 * 2**20 // side
    idx_bomb.write_bytes(
        gzip.compress(struct.pack(">BBBBIII", 0, 0, 8, 3, count, 28, 28) + bytes(count * side))
    )
    assert idx_bomb.stat().st_size < 1 << 20
    cases = {huge: "pixels", large: "pixels", idx_bomb: "inflates to more than"}
    for path, expected in cases.items():
        with pytest.raises(InputError) as info:
            predict(str(trained_run.run_dir), [path], config)
        message = _one_line(info)
        assert str(path) in message and expected in message


def test_published_runs_are_verified_before_loading(
    trained_run: TrainedRun, image_png: Path, data_uri: str, tmp_path: Path, config: PipelineConfig
) -> None:
    """A run in a store's runs/ needs its manifest, and every object must match it."""
    run_dir = tmp_path / "store" / "runs" / "r1"
    shutil.copytree(trained_run.run_dir, run_dir)
    for uri in (str(run_dir), run_dir.as_uri()):
        with pytest.raises(PipelineError) as info:
            predict(uri, [image_png], config)
        assert "has no manifest.json" in _one_line(info)
        with pytest.raises(PipelineError) as info:
            evaluate_model(uri, tmp_path / "report", for_run(config, data_uri))
        assert "has no manifest.json" in _one_line(info)

    objects = {}
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        data = path.read_bytes()
        key = path.relative_to(run_dir).as_posix()
        objects[key] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (run_dir / "manifest.json").write_bytes(manifest_bytes("r1", objects))
    [prediction] = predict(str(run_dir), [image_png], config)  # verified: loads

    params = run_dir / MODEL_PARAMS
    params.write_bytes(bytes(params.stat().st_size))  # same size, other bytes
    with pytest.raises(PipelineError) as info:
        predict(str(run_dir), [image_png], config)
    assert "does not match its manifest" in _one_line(info) and MODEL_PARAMS in _one_line(info)
    (run_dir / "manifest.json").write_text('{"objects": {"\\u0000": 1}}')
    with pytest.raises(PipelineError) as info:
        predict(str(run_dir), [image_png], config)
    assert "not a valid Manifest" in _one_line(info)
