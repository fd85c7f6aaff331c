"""pipeline/progress.py: the training progress bar (pure, a real pseudo-terminal)."""

from __future__ import annotations

import io
import os

from pipeline.progress import TrainingProgress, format_bar
from tasks.train.messages import EpochDone


def test_bar_is_drawn_on_a_terminal_and_never_into_a_log(tmp_path):
    assert format_bar(0, 5, width=10) == "[..........] epoch 0/5"
    assert format_bar(5, 5, width=10) == "[##########] epoch 5/5"
    leader, follower = os.openpty()
    with os.fdopen(follower, "w") as terminal:
        env_ci = os.environ.pop("CI", None)
        try:
            progress = TrainingProgress(2, "r1", stream=terminal)
            progress(EpochDone(epoch=1, epochs=2, record={}))
            progress(EpochDone(epoch=2, epochs=2, record={}))
        finally:
            if env_ci is not None:
                os.environ["CI"] = env_ci
        drawn = os.read(leader, 4096).decode()
    os.close(leader)
    assert "epoch 1/2" in drawn and drawn.rstrip().endswith("epoch 2/2")
    log = io.StringIO()
    TrainingProgress(2, "r1", stream=log)(EpochDone(epoch=1, epochs=2, record={}))
    assert log.getvalue() == ""
