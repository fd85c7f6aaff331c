"""tasks/train/messages.py: the typed channel from a rank to its launcher."""

from __future__ import annotations

import subprocess
import sys

from tasks.train.messages import EpochDone, Note, RankFailed, decode, encode


def test_rank_messages_are_read_back_and_other_lines_ignored():
    record = {"epoch": 3, "loss": 0.5, "train_accuracy": 0.8, "test_accuracy": 0.8, "seconds": 1}
    epoch = EpochDone(epoch=3, epochs=5, record=record)
    assert decode(encode(epoch)) == epoch
    assert decode(encode(Note(text="resuming"))) == Note(text="resuming")
    assert decode(encode(RankFailed(message="bad"))) == RankFailed(message="bad")
    assert decode("epoch 3/5: loss 0.5000") is None  # a human line is no message
    assert decode('{"type": "epoch", "epoch": 0, "epochs": 5, "record": {}}') is None  # invalid
    assert decode("{not json") is None


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
