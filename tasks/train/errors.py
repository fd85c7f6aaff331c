"""The train step's error: what failed, and whether a restart could help."""

from __future__ import annotations

from pipeline.base.errors import PipelineError


class TrainingError(PipelineError, RuntimeError):
    """A training run failed; the message names the failing rank and its last stderr lines.

    `rank` and `status` say which rank failed and how, when one did (None otherwise);
    `reported` is True when that rank sent its own error (`RankFailed`): bad data, a bad
    checkpoint, the same at every start, so no restart is tried."""

    def __init__(
        self,
        message: str,
        rank: int | None = None,
        status: int | None = None,
        reported: bool = False,
    ) -> None:
        super().__init__(message)
        self.rank, self.status, self.reported = rank, status, reported
