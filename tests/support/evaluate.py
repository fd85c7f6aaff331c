"""Helpers of the evaluate step's tests: a model trained in-process, and the sizes of that
training (fixtures: tests/tasks/evaluate/conftest.py)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from mxnet import gluon, nd
from mxnet.gluon import nn

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
