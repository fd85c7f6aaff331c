"""Checkpoints: the pointer document that names the last complete one, validated before use.

A checkpoint is three files in RUN_DIR/checkpoints: `epoch-NNNN.params` (the weights),
`epoch-NNNN.optimizer` (the optimizer's state arrays, MXNet's NDArray format: no pickle) and
the pointer `checkpoint.json`, written last, so that it only ever names complete files. Anyone
who can write the work directory can write a pointer or a checkpoint file (a shared cache
volume, a ReadWriteMany claim), so nothing is taken on trust before MXNet reads it: the pointer
is a validated model whose file names are the plain names of its own epochs (never paths), and
every file it names must be a regular file in the checkpoint directory (no symlink), of bounded
size, with the SHA-256 the pointer records and MXNet's NDArray-list header (a pickle, say, is
refused before any loader sees it). No MXNet here: the launcher checks a resume before any
rank starts, and rank 0 checks again right before it loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.base import layout
from pipeline.base.config import ConfigError, PipelineConfig
from pipeline.base.files import atomic_write
from pipeline.base.files import file_sha256 as file_sha256  # re-exported: the rank imports it here

# Config fields that shape the training trajectory: a resumed run must use the same values.
TRAJECTORY_FIELDS = ("batch_size", "lr", "init_sigma", "seed", "validation_fraction")
ParamsName = Annotated[
    str, Field(pattern=layout.checkpoint_file_pattern(layout.CHECKPOINT_WEIGHTS))
]
OptimizerName = Annotated[
    str, Field(pattern=layout.checkpoint_file_pattern(layout.CHECKPOINT_OPTIMIZER))
]
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
# The seed's model is 31 KB a file; anything far bigger is not one of ours.
MAX_CHECKPOINT_FILE_BYTES = 64 * 1024 * 1024
# What MXNet's nd.save / save_parameters write first: kMXAPINDArrayListMagic, then a reserved 0
# (both little-endian uint64).
NDARRAY_LIST_HEADER = struct.pack("<QQ", 0x112, 0)
MAX_POINTER_BYTES = 16 * 1024 * 1024  # a history of 1,000,000 epochs fits


class Checkpoint(BaseModel):
    """What checkpoint.json says: the last complete epoch and the files that hold it."""

    model_config = ConfigDict(extra="forbid")

    epoch: int = Field(ge=1, le=1_000_000)
    params: ParamsName
    optimizer: OptimizerName
    # optimizer state layout: parameter index -> number of state arrays (-1: one bare array)
    optimizer_layout: dict[str, int] = Field(default_factory=dict)
    optimizer_counters: dict[str, Any] = Field(default_factory=dict)
    best_epoch: int = Field(ge=1)
    best_params: ParamsName
    # SHA-256 of every file named above: a file changed after the pointer was written is refused.
    digests: dict[str, Sha256]
    history: list[dict[str, Any]]
    trajectory: dict[str, Any]

    @model_validator(mode="after")
    def _names_are_its_own_epochs(self) -> Checkpoint:
        for field, name in checkpoint_names(self.epoch, self.best_epoch).items():
            if getattr(self, field) != name:
                raise ValueError(f"{field} must be {name!r}, not {getattr(self, field)!r}")
        if self.best_epoch > self.epoch:
            raise ValueError(f"best_epoch {self.best_epoch} is after epoch {self.epoch}")
        if set(self.digests) != self.files():
            raise ValueError(f"digests must name exactly {sorted(self.files())}")
        return self

    def files(self) -> set[str]:
        """The checkpoint directory's files this checkpoint needs."""
        return {self.params, self.optimizer, self.best_params}


def checkpoint_dir(run_dir: Path) -> Path:
    return run_dir / layout.CHECKPOINTS


def stem(epoch: int) -> str:
    """The name of an epoch's checkpoint files without their suffix (`layout`'s)."""
    return layout.checkpoint_stem(epoch)


def checkpoint_names(epoch: int, best_epoch: int) -> dict[str, str]:
    """The file names of the checkpoint of `epoch` whose kept model is `best_epoch`'s, by the
    pointer's field: what rank 0 writes and what the pointer is validated against."""
    return {
        "params": stem(epoch) + layout.CHECKPOINT_WEIGHTS,
        "optimizer": stem(epoch) + layout.CHECKPOINT_OPTIMIZER,
        "best_params": stem(best_epoch) + layout.CHECKPOINT_WEIGHTS,
    }


def trajectory_of(config: PipelineConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in TRAJECTORY_FIELDS}


def read_checkpoint(run_dir: Path) -> Checkpoint | None:
    """The last complete checkpoint of a run directory, None if there is none."""
    pointer = run_dir / layout.CHECKPOINT_POINTER
    text = _read_regular(pointer, MAX_POINTER_BYTES)
    if text == "is missing":
        return None
    if isinstance(text, str):
        raise ConfigError(f"resume: {pointer} {text}")
    try:
        return Checkpoint.model_validate_json(text)
    except ValidationError as exc:
        raise ConfigError(
            f"resume: {pointer} is not a valid checkpoint pointer ({exc.error_count()} "
            f"problem(s), e.g. {exc.errors()[0]['loc']}: {exc.errors()[0]['msg']})"
        ) from None


def _read_regular(path: Path, limit: int) -> bytes | str:
    """The bytes of `path`, or why it is not a plain file of at most `limit` bytes. O_NOFOLLOW:
    a symlink (to /dev/zero, to another run, to anything) is refused, never followed."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return "is missing"
    except OSError:
        return "is not a regular file (a symlink is never followed)"
    with os.fdopen(fd, "rb") as source:
        info = os.fstat(source.fileno())
        if not stat.S_ISREG(info.st_mode):
            return "is not a regular file"
        if info.st_size > limit:
            return f"is {info.st_size} bytes, more than {limit}"
        return source.read(limit + 1)


def file_problem(path: Path, expected_sha256: str) -> str | None:
    """Why `path` cannot be a checkpoint file with that digest; None if it can."""
    data = _read_regular(path, MAX_CHECKPOINT_FILE_BYTES)
    if isinstance(data, str):
        return data
    if not data.startswith(NDARRAY_LIST_HEADER):
        return "is not an MXNet NDArray file (nothing else, e.g. a pickle, is ever loaded)"
    if hashlib.sha256(data).hexdigest() != expected_sha256:
        return "does not match the SHA-256 in the checkpoint pointer (changed after it was written)"
    return None


def verify_files(run_dir: Path, checkpoint: Checkpoint) -> None:
    """ConfigError unless every file `checkpoint` names is safe to hand to MXNet."""
    directory = checkpoint_dir(run_dir)
    for name in sorted(checkpoint.files()):
        problem = file_problem(directory / name, checkpoint.digests[name])
        if problem is not None:
            raise ConfigError(f"resume: checkpoint file {directory / name} {problem}")


def write_pointer(run_dir: Path, checkpoint: Checkpoint) -> None:
    """Make `checkpoint` the last complete one; files it no longer needs are removed after."""
    directory = checkpoint_dir(run_dir)
    atomic_write(run_dir / layout.CHECKPOINT_POINTER, checkpoint.model_dump_json(indent=2))
    keep = checkpoint.files()
    for path in directory.glob(f"{layout.CHECKPOINT_EPOCH_PREFIX}*"):
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
    verify_files(run_dir, checkpoint)
    return checkpoint
