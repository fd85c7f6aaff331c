"""tasks/train/step.py: real trainings with 1 and 2 ranks (horovodrun --gloo) and what they
leave in the run directory."""

from __future__ import annotations

import json
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from pipeline.base.config import PipelineConfig
from tasks.dataset import load_dataset
from tasks.train.errors import TrainingError
from tests.support.steps import trained
from tests.support.train import history, parameters, run_config, wait_until_no_ranks

# ----------------------------------------------------------------------------- real trainings


pytestmark = pytest.mark.integration  # real horovodrun trainings


def test_one_and_two_ranks_train_the_same_model(np1_run: Path, np2_run) -> None:
    np2_dir, _ = np2_run
    one, two = parameters(np1_run), parameters(np2_dir)
    assert one.keys() == two.keys()
    for name in one:
        np.testing.assert_allclose(one[name], two[name], rtol=0, atol=1e-5, err_msg=name)
    for first, second in zip(history(np1_run), history(np2_dir), strict=True):
        assert first["train_accuracy"] == pytest.approx(second["train_accuracy"], abs=1e-3)
        assert first["test_accuracy"] == pytest.approx(second["test_accuracy"], abs=1e-3)
        assert first["loss"] == pytest.approx(second["loss"], rel=1e-4)


def test_same_seed_and_ranks_give_bit_identical_parameters(np2_run, np2_again: Path) -> None:
    np2_dir, _ = np2_run
    for name in ("model.params", "model-0000.params"):
        first, second = parameters(np2_dir, name), parameters(np2_again, name)
        assert first.keys() == second.keys()
        for key in first:
            assert np.array_equal(first[key], second[key]), f"{name}: {key} differs"


def test_run_directory_holds_the_layout(np2_run, data_uri: str) -> None:
    run_dir, _ = np2_run
    config = PipelineConfig.model_validate_json((run_dir / "config.json").read_text())
    assert (config.num_proc, config.epochs, config.run_id) == (2, 2, "np2")

    records = history(run_dir)
    assert [record["epoch"] for record in records] == [1, 2]
    for record in records:
        assert set(record) == {"epoch", "loss", "train_accuracy", "test_accuracy", "seconds"}
        assert record["seconds"] > 0
    summary = json.loads((run_dir / "metrics" / "train.json").read_text())
    assert summary == {
        "epochs": 2,
        "train_accuracy": records[-1]["train_accuracy"],
        "test_accuracy": records[-1]["test_accuracy"],
        "val_accuracy": None,
        "best_epoch": 2,
        "num_proc": 2,
        "seconds": pytest.approx(sum(record["seconds"] for record in records), abs=1e-3),
    }
    assert (run_dir / "checkpoints" / "checkpoint.json").exists()

    # The exported model loads without our classes and scores what the train step reported.
    net = mx.gluon.SymbolBlock.imports(
        str(run_dir / "model" / "model-symbol.json"),
        ["data"],
        str(run_dir / "model" / "model-0000.params"),
    )
    data = load_dataset(data_uri)
    images = mx.nd.array(data.test_images.reshape(-1, 784).astype(np.float32) / 255)
    predicted = net(images).argmax(axis=1).asnumpy()
    assert (predicted == data.test_labels).mean() == pytest.approx(summary["test_accuracy"])


def test_rank_zero_epoch_lines_reach_the_step_log(np2_run) -> None:
    _, messages = np2_run
    epoch_lines = [message for message in messages if message.startswith("epoch ")]
    assert len(epoch_lines) == 2
    assert epoch_lines[0].startswith("epoch 1/2: loss ")


@pytest.mark.slow
def test_five_epochs_reach_the_seed_accuracy(five_epochs: Path) -> None:
    summary = json.loads((five_epochs / "metrics" / "train.json").read_text())
    assert summary["epochs"] == 5
    assert summary["train_accuracy"] >= 0.83
    assert summary["test_accuracy"] >= 0.81


def test_validation_split_keeps_the_best_epoch(work_dir: Path, data_uri: str) -> None:
    config = run_config(work_dir, "val", num_proc=1, epochs=3, validation_fraction=0.1)
    run_dir = trained(config, data_uri)
    records = history(run_dir)
    assert all("val_accuracy" in record for record in records)
    summary = json.loads((run_dir / "metrics" / "train.json").read_text())
    best = max(records, key=lambda record: (record["val_accuracy"], -record["epoch"]))
    assert summary["best_epoch"] == best["epoch"]
    assert summary["val_accuracy"] == best["val_accuracy"]
    kept = mx.nd.load(str(run_dir / "checkpoints" / f"epoch-{best['epoch']:04d}.params"))
    for key, value in parameters(run_dir).items():
        assert np.array_equal(value, kept[key].asnumpy()), key


def test_a_rank_error_is_reported_with_its_stderr_lines(work_dir: Path, tmp_path: Path) -> None:
    empty_cache = tmp_path / "no-data"
    empty_cache.mkdir()
    config = run_config(work_dir, "no-data", num_proc=2, epochs=1)
    with pytest.raises(TrainingError, match=r"(?s)rank \d exited with status 1;.*error: .*no-data"):
        trained(config, empty_cache.as_uri())
    assert wait_until_no_ranks(config.run_dir().resolve()) == []
