"""The step contract (the config alone) and the ranks' typed channel, checked directly."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys

import pytest

from pipeline.base.config import PipelineConfig
from pipeline.flow import STEP_TASKS, step_budget
from tasks.train.errors import TrainingError
from tasks.train.launcher import Launch, run_ranks
from tasks.train.messages import EpochDone, Note, decode

STEP_FUNCTIONS = {
    "dataset": ("tasks.dataset", "prepare_dataset"),
    "train": ("tasks.train.step", "train"),
    "evaluate": ("tasks.evaluate.step", "evaluate"),
    "publish": ("tasks.publish.step", "publish"),
}


def test_every_step_and_its_task_take_the_config_alone() -> None:
    for step, step_task in STEP_TASKS.items():
        assert list(inspect.signature(step_task.fn).parameters) == ["config"], step
        module, name = STEP_FUNCTIONS[step]
        function = getattr(__import__(module, fromlist=[name]), name)
        required = [
            p.name
            for p in inspect.signature(function).parameters.values()
            if p.default is inspect.Parameter.empty
        ]
        assert required == ["config"], (step, required)


def test_a_steps_budget_covers_every_attempt_and_retry_delay() -> None:
    config = PipelineConfig(dataset_timeout=100, train_timeout=50, publish_timeout=10)
    # dataset: 3 attempts of 100 s and two 5 s delays; train: one attempt, never retried.
    assert step_budget("dataset", config) == 3 * 100 + 2 * 5
    assert step_budget("train", config) == 50
    assert step_budget("publish", config) == 3 * 10 + 2 * 10


RANK_LIKE = """
import os, sys
from tasks.train.messages import EpochDone, Note, RankChannel
channel = RankChannel()
print("a print of the rank")
os.write(1, b"a library writing to fd 1\\n")
channel.send(Note(text="resuming"))
channel.send(EpochDone(epoch=1, epochs=2, record={"epoch": 1}))
"""


def test_a_ranks_stdout_carries_its_messages_and_nothing_else() -> None:
    # A real process, as the launcher starts a rank: print() and a raw write to file
    # descriptor 1 (what MXNet or Horovod would do) both land on stderr.
    done = subprocess.run(
        [sys.executable, "-c", RANK_LIKE], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    messages = [decode(line) for line in done.stdout.splitlines()]
    assert messages == [Note(text="resuming"), EpochDone(epoch=1, epochs=2, record={"epoch": 1})]
    assert "a print of the rank" in done.stderr
    assert "a library writing to fd 1" in done.stderr


FAILING_RANK = """
import sys
from tasks.train.messages import RankChannel, RankFailed
channel = RankChannel()
if sys.argv[1] == "reports":
    print("error: the data set is damaged", file=sys.stderr)
    channel.send(RankFailed(message="the data set is damaged"))
sys.exit(1)
"""


def test_the_launcher_tells_a_ranks_own_error_from_a_silent_failure() -> None:
    # Real processes through the real launcher: only the typed message makes an error the
    # rank's own (the supervisor restarts for the other kind), whatever stderr says.
    env = dict(os.environ)
    for kind, reported in (("reports", True), ("silent", False)):
        command = [sys.executable, "-c", FAILING_RANK, kind]
        with pytest.raises(TrainingError) as failed:
            run_ranks([Launch(command, env, 0)])
        assert (failed.value.rank, failed.value.status) == (0, 1)
        assert failed.value.reported is reported, kind
        assert "training failed: rank 0 exited with status 1" in str(failed.value)
