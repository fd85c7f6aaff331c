"""tasks/train/launcher.py: horovodrun's output lines and the failure message (pure)."""

from __future__ import annotations

import os
import sys

import pytest

from tasks.train.errors import TrainingError
from tasks.train.launcher import Launch, RankExit, failure_message, horovodrun_line, run_ranks


def test_horovodrun_lines_are_split_into_rank_stream_and_text() -> None:
    assert horovodrun_line("[1]<stderr>:Killed") == (1, "stderr", "Killed")
    assert horovodrun_line('[12]<stdout>:{"type": "note"}') == (12, "stdout", '{"type": "note"}')
    assert horovodrun_line("Process 1 exit with status code 137.") == RankExit(1, 137)
    assert horovodrun_line("Terminating remaining workers after failure of Process 1.") is None


def test_failure_message_names_the_first_failed_rank_and_its_stderr() -> None:
    # The exact lines a real `horovodrun --gloo` printed when rank 1 was SIGKILLed.
    launcher_lines = [
        "Process 1 exit with status code 137.",
        "Terminating remaining workers after failure of Process 1.",
        "Process 0 exit with status code 143.",
    ]
    tails = {0: ["Terminated"], 1: ["Killed"]}
    exits = [e for e in map(horovodrun_line, launcher_lines) if isinstance(e, RankExit)]
    first_failed = exits[0]
    message = failure_message(first_failed, 1, tails, launcher_lines)
    assert message.startswith("training failed: rank 1 exited with status 137 (SIGKILL)")
    assert message.endswith("last stderr lines of rank 1:\n  Killed")
    no_rank = failure_message(None, 2, {}, ["usage: horovodrun ...", "error: bad -H"])
    assert no_rank == (
        "horovodrun exited with status 2; its last lines:\n  usage: horovodrun ...\n  error: bad -H"
    )


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
