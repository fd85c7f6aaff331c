"""Checkpoints: the pointer document that names the last complete one, validated before use.

A checkpoint is three files in RUN_DIR/checkpoints: `epoch-NNNN.params` (the weights),
`epoch-NNNN.optimizer` (the optimizer's state arrays, MXNet's NDArray format: no pickle) and
the pointer `checkpoint.json`, written last, so that it only ever names complete files. Anyone
who can write the work directory can write a pointer, so it is a validated model: file names
are plain `epoch-NNNN.*` names inside the directory, never paths. No MXNet here: the launcher
checks a resume before any rank starts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.base import layout
from pipeline.base.config import ConfigError, PipelineConfig
from pipeline.base.files import atomic_write

# Config fields that shape the training trajectory: a resumed run must use the same values.
TRAJECTORY_FIELDS = ("batch_size", "lr", "init_sigma", "seed", "validation_fraction")
FileName = Annotated[str, Field(pattern=r"^epoch-[0-9]{4}\.(params|optimizer)$")]


class Checkpoint(BaseModel):
    """What checkpoint.json says: the last complete epoch and the files that hold it."""

    model_config = ConfigDict(extra="forbid")

    epoch: int = Field(ge=1, le=1_000_000)
    params: FileName
    optimizer: FileName
    # optimizer state layout: parameter index -> number of state arrays (-1: one bare array)
    optimizer_layout: dict[str, int] = Field(default_factory=dict)
    optimizer_counters: dict[str, Any] = Field(default_factory=dict)
    best_epoch: int = Field(ge=1)
    best_params: FileName
    history: list[dict[str, Any]]
    trajectory: dict[str, Any]


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / layout.CHECKPOINTS


def stem(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def trajectory_of(config: PipelineConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in TRAJECTORY_FIELDS}


def read_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The last complete checkpoint of a run directory, None if there is none."""
    pointer = run_dir / layout.CHECKPOINT_POINTER
    try:
        text = pointer.read_text()
    except FileNotFoundError:
        return None
    try:
        return Checkpoint.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError(
            f"resume: {pointer} is not a valid checkpoint pointer ({exc.error_count()} "
            f"problem(s), e.g. {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']})"
        ) from None


def write_pointer(run_dir: Path, checkpoint: Checkpoint) -> None:
    """Make `checkpoint` the last complete one; files it no longer needs are removed after."""
    directory = checkpoint_dir(run_dir)
    atomic_write(run_dir / layout.CHECKPOINT_POINTER, checkpoint.model_dump_json(indent=2))
    keep = {checkpoint.params, checkpoint.optimizer, checkpoint.best_params}
    for path in directory.glob("epoch-*"):
        if path.name not in keep:
            path.unlink(missing_ok=True)


def check_resumable(config: PipelineConfig) -> Checkpoint:
    """The checkpoint a resumed run continues from; ConfigError when it cannot."""
    run_dir = config.run_dir()
    checkpoint = read_checkpoint(run_dir)
    where = checkpoint_dir(run_dir)
    if checkpoint is None:
        raise ConfigError(
            f"resume: {where} holds no complete checkpoint; run without resume to start over"
        )
    if checkpoint.epoch > config.epochs:
        raise ConfigError(
            f"resume: the checkpoint in {where} is after epoch {checkpoint.epoch}, beyond "
            f"epochs={config.epochs}"
        )
    if checkpoint.trajectory != json.loads(json.dumps(trajectory_of(config))):
        raise ConfigError(
            f"resume: the checkpoint in {where} was trained with {checkpoint.trajectory}, "
            f"not {trajectory_of(config)}"
        )
    return checkpoint
