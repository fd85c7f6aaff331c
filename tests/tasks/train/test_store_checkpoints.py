"""tasks/train/store_checkpoints.py: the artifact store keeps the last K epochs' checkpoint
files plus what --resume needs, not every epoch's. Caused for real: twelve epochs of real
checkpoint files and pointers written as rank 0 writes them, mirrored to a real directory and a
real SeaweedFS store after each epoch, then restored into an empty run directory; and one real
training run."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.base.config import PipelineConfig
from pipeline.base.layout import CHECKPOINTS, run_key
from pipeline.base.store import open_store
from tasks.dataset import prepare_dataset
from tasks.train.checkpoints import (
    checkpoint_dir,
    stem,
    verify_files,
)
from tasks.train.store_checkpoints import expired_files, mirror_checkpoint, restore_checkpoint
from tests.support.checkpoints import write_epoch
from tests.support.steps import trained

DEBIAN_MIRROR = "file:///usr/share/datasets/fashion-mnist/"


def test_twelve_epochs_leave_the_last_two_and_what_resume_needs(
    store_config: PipelineConfig, tmp_path: Path
) -> None:
    config = store_config.model_copy(update={"run_id": "run-12"})
    assert config.keep_checkpoints == 2  # the default
    store = open_store(config.artifact_store, **config.store_options()).child(
        f"{run_key(config.run_id)}/{CHECKPOINTS}"
    )
    run_dir = config.run_dir()
    for epoch in range(1, 13):
        checkpoint = write_epoch(run_dir, epoch, config)
        assert mirror_checkpoint(store, run_dir, config.keep_checkpoints) == epoch
        assert len(store.list_keys()) <= 2 * 2 + 2  # two epochs, the best params, the pointer
    assert store.list_keys() == [
        "checkpoint.json",
        "epoch-0003.params",  # the best epoch's weights, which --resume needs
        "epoch-0011.optimizer",
        "epoch-0011.params",
        "epoch-0012.optimizer",
        "epoch-0012.params",
    ]  # before issue 22: 24 epoch files and the pointer
    fresh = tmp_path / "fresh"
    assert restore_checkpoint(store, fresh) == 12
    verify_files(fresh, checkpoint)


def test_expired_files_keep_newer_epochs_and_what_the_pointer_names(tmp_path: Path) -> None:
    config = PipelineConfig(work_dir=tmp_path, run_id="pure")
    checkpoint = [write_epoch(tmp_path / "pure", e, config) for e in range(1, 6)][-1]
    stored = ["checkpoint.json", "notes.txt"] + [
        f"{stem(e)}.{kind}" for e in range(1, 8) for kind in ("params", "optimizer")
    ]
    expired = expired_files(stored, checkpoint, keep=1)
    # Epochs 6 and 7 (after the pointer's) are not this pointer's to judge; 3 is the best.
    assert expired == sorted(
        ["epoch-0001.params", "epoch-0001.optimizer", "epoch-0002.params", "epoch-0002.optimizer"]
        + ["epoch-0003.optimizer", "epoch-0004.params", "epoch-0004.optimizer"]
    )


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_a_real_training_keeps_only_the_configured_epochs_in_the_store(tmp_path: Path) -> None:

    data_uri = prepare_dataset(PipelineConfig(mirrors=[DEBIAN_MIRROR], data_dir=tmp_path / "d"))
    config = PipelineConfig(
        work_dir=tmp_path / "work",
        run_id="run-kept",
        artifact_store=(tmp_path / "store").as_uri(),
        mirrors=[DEBIAN_MIRROR],
        epochs=4,
        keep_checkpoints=1,
    )
    run_dir = trained(config, data_uri)
    stored = sorted(p.name for p in (tmp_path / "store/runs/run-kept/checkpoints").iterdir())
    assert stored == ["checkpoint.json", "epoch-0004.optimizer", "epoch-0004.params"], stored
    assert sorted(p.name for p in checkpoint_dir(run_dir).iterdir()) == stored
