"""Real checkpoints without a training: the files and pointer rank 0 leaves after an epoch."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pipeline.base.config import PipelineConfig
from tasks.train.checkpoints import (
    NDARRAY_LIST_HEADER,
    Checkpoint,
    checkpoint_dir,
    stem,
    trajectory_of,
    write_pointer,
)

BEST_EPOCH = 3  # validation picked an early epoch: resume needs its weights, however old


def write_epoch(run_dir: Path, epoch: int, config: PipelineConfig) -> Checkpoint:
    """What rank 0 leaves after `epoch`: its files (NDArray-format bytes), then the pointer."""
    directory = checkpoint_dir(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    best = min(epoch, BEST_EPOCH)
    for name in (f"{stem(epoch)}.params", f"{stem(epoch)}.optimizer"):
        (directory / name).write_bytes(NDARRAY_LIST_HEADER + os.urandom(4096))
    names = {f"{stem(epoch)}.params", f"{stem(epoch)}.optimizer", f"{stem(best)}.params"}
    checkpoint = Checkpoint(
        epoch=epoch,
        params=f"{stem(epoch)}.params",
        optimizer=f"{stem(epoch)}.optimizer",
        best_epoch=best,
        best_params=f"{stem(best)}.params",
        digests={n: hashlib.sha256((directory / n).read_bytes()).hexdigest() for n in names},
        history=[{"epoch": e} for e in range(1, epoch + 1)],
        trajectory=trajectory_of(config),
    )
    write_pointer(run_dir, checkpoint)
    return checkpoint
