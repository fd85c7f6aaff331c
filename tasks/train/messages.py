"""The typed channel from a rank to its launcher: one JSON object a line on the rank's stdout.

A rank keeps its stdout for these messages alone: `RankChannel` sends everything else written
to file descriptor 1 (print calls, MXNet, Horovod) to stderr, so the launcher never reads
meaning out of log text. Under horovodrun each line arrives tagged "[RANK]<stdout>:"; the
launcher strips that and decodes the same messages (`tasks.train.launcher`). Both sides import
this module and nothing else decides what a line means.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any, Literal, TextIO

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

# The environment variable naming the launcher's pid, where a rank's parent is not the launcher
# itself (mpirun sits between them): the rank ends when that process is gone.
LAUNCHER_PID = "PIPELINE_LAUNCHER_PID"


class Note(BaseModel):
    """A line for the step log (e.g. where a resumed run continues from)."""

    type: Literal["note"] = "note"
    text: str


class EpochDone(BaseModel):
    """Rank 0 finished an epoch and wrote its checkpoint: it can be resumed from and mirrored."""

    type: Literal["epoch"] = "epoch"
    epoch: int = Field(ge=1)
    epochs: int = Field(ge=1)
    record: dict[str, Any]  # the epoch's line of metrics/train.jsonl


class RankFailed(BaseModel):
    """The rank's own error (bad data, a bad checkpoint, a bad option): the same at every
    start, so the supervisor does not restart for it."""

    type: Literal["error"] = "error"
    message: str


RankMessage = Annotated[Note | EpochDone | RankFailed, Field(discriminator="type")]
_MESSAGE = TypeAdapter(RankMessage)


def encode(message: Note | EpochDone | RankFailed) -> str:
    """One line of the channel (no newline)."""
    return message.model_dump_json()


def decode(line: str) -> Note | EpochDone | RankFailed | None:
    """The message a channel line carries; None for any other text (a library's stray
    output), which the launcher logs as it is."""
    if not line.startswith("{"):
        return None
    try:
        return _MESSAGE.validate_json(line)
    except ValidationError:
        return None


class RankChannel:
    """The rank's end: takes over file descriptor 1 and points it (and `sys.stdout`) at stderr,
    so only `send` ever writes to the launcher's stdout pipe."""

    def __init__(self) -> None:
        sys.stdout.flush()
        self._out: TextIO = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)

    def send(self, message: Note | EpochDone | RankFailed) -> None:
        self._out.write(encode(message) + "\n")
        self._out.flush()
