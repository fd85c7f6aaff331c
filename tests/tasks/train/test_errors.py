"""tasks/train/errors.py: what a TrainingError says of the failure."""

from __future__ import annotations

from pipeline.base.errors import PipelineError
from tasks.train.errors import TrainingError


def test_a_training_error_names_the_rank_its_status_and_whether_it_reported_it() -> None:
    error = TrainingError("rank 1 exited with status 1", 1, 1, reported=True)
    assert (error.rank, error.status, error.reported) == (1, 1, True)
    assert isinstance(error, PipelineError) and isinstance(error, RuntimeError)
    assert str(error) == "rank 1 exited with status 1"
    bare = TrainingError("horovodrun not found")
    assert (bare.rank, bare.status, bare.reported) == (None, None, False)
