"""Training progress a person can watch: a Prefect progress artifact, and a bar on a terminal.

The train step hands each epoch rank 0 finishes (a typed `EpochDone`) to `TrainingProgress`;
each moves the artifact (Prefect's UI shows how far training is) and, when stderr is a
terminal, a bar. Logs and CI (not a terminal) get neither: the epoch lines are already in the log.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from pipeline.base.logs import in_prefect_run
from tasks.train.messages import EpochDone

ARTIFACT_KEY = "training-progress"
BAR_WIDTH = 30


def format_bar(epoch: int, epochs: int, width: int = BAR_WIDTH) -> str:
    """`[#########.....] epoch 3/5` (pure)."""
    done = round(width * epoch / epochs) if epochs else width
    return f"[{'#' * done}{'.' * (width - done)}] epoch {epoch}/{epochs}"


def wants_bar(stream: TextIO) -> bool:
    """A bar only for a person at a terminal: not in CI, not into a log file."""
    return stream.isatty() and not os.environ.get("CI") and os.environ.get("TERM") != "dumb"


class TrainingProgress:
    """Receives rank 0's finished epochs; reports each."""

    def __init__(self, epochs: int, run_id: str, stream: TextIO = sys.stderr) -> None:
        self.epochs = epochs
        self.stream = stream if wants_bar(stream) else None
        self.artifact_id = None
        if in_prefect_run():
            from prefect.artifacts import create_progress_artifact

            self.artifact_id = create_progress_artifact(
                0.0, key=ARTIFACT_KEY, description=f"Training of run {run_id}: epochs done"
            )

    def __call__(self, message: EpochDone) -> None:
        epoch, epochs = message.epoch, message.epochs
        if self.artifact_id is not None:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self.artifact_id, 100.0 * epoch / epochs)
        if self.stream is not None:
            end = "\n" if epoch >= epochs else ""
            self.stream.write(f"\r{format_bar(epoch, epochs)}{end}")
            self.stream.flush()
