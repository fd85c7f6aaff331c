"""What the evaluate tests share, once a session: the test set, a model trained in-process
for a few steps, its evaluation report, a work dir, one test image as a PNG."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
from mxnet import autograd, gluon, nd
from mxnet.gluon import nn
from PIL import Image

from pipeline.base.config import PipelineConfig
from tasks.dataset import FashionMNIST, load_dataset
from tasks.evaluate.step import evaluate
from tests.support.evaluate import (
    BATCH_SIZE,
    EPOCHS,
    PASSING_THRESHOLD,
    STEPS_PER_EPOCH,
    TrainedRun,
    _accuracy,
    _export,
    _flat,
)
from tests.support.steps import for_run


@pytest.fixture(scope="session")
def data(data_uri: str) -> FashionMNIST:
    return load_dataset(data_uri)


@pytest.fixture(scope="session")
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


@pytest.fixture(scope="session")
def report_dir(
    trained_run: TrainedRun, data_uri: str, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    config = PipelineConfig(
        work_dir=tmp_path_factory.mktemp("work"), min_test_accuracy=PASSING_THRESHOLD
    )
    evaluate(for_run(config, data_uri, trained_run.run_dir.as_uri()))
    assert (trained_run.run_dir / "report" / "metrics.json").is_file()  # the step's output
    return trained_run.run_dir / "report"


@pytest.fixture(scope="session")
def config(tmp_path_factory: pytest.TempPathFactory) -> PipelineConfig:
    return PipelineConfig(work_dir=tmp_path_factory.mktemp("work"))


@pytest.fixture(scope="session")
def image_png(tmp_path_factory: pytest.TempPathFactory, data: FashionMNIST) -> Path:
    path = tmp_path_factory.mktemp("inputs") / "test-0.png"
    Image.fromarray(data.test_images[0], mode="L").save(path)
    return path
