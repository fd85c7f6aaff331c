"""tasks/train/launcher.py: horovodrun's output lines and the failure message (pure)."""

from __future__ import annotations

from tasks.train.launcher import failure_message, parse_output_line


def test_horovodrun_lines_are_split_into_rank_stream_and_text() -> None:
    assert parse_output_line("[1]<stderr>:Killed") == (1, "stderr", "Killed")
    assert parse_output_line("[12]<stdout>:epoch 1/5: x") == (12, "stdout", "epoch 1/5: x")
    assert parse_output_line("Process 1 exit with status code 137.") == (
        None,
        None,
        "Process 1 exit with status code 137.",
    )


def test_failure_message_names_the_first_failed_rank_and_its_stderr() -> None:
    # The exact lines a real `horovodrun --gloo` printed when rank 1 was SIGKILLed.
    launcher_lines = [
        "Process 1 exit with status code 137.",
        "Terminating remaining workers after failure of Process 1.",
        "Process 0 exit with status code 143.",
    ]
    tails = {0: ["Terminated"], 1: ["Killed"]}
    message = failure_message(1, tails, launcher_lines)
    assert message.startswith("training failed: rank 1 exited with status 137 (SIGKILL)")
    assert message.endswith("last stderr lines of rank 1:\n  Killed")
    no_rank = failure_message(2, {}, ["usage: horovodrun ...", "error: bad -H"])
    assert no_rank == (
        "horovodrun exited with status 2; its last lines:\n  usage: horovodrun ...\n  error: bad -H"
    )
