"""tasks/train/step.py's checks: bad input fails before any process starts; threads per rank."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from pipeline.base.config import ConfigError, PipelineConfig
from tasks.train.step import threads_per_rank
from tests.support.seaweedfs import free_port
from tests.support.steps import trained
from tests.support.train import history, job_config, run_config


def _assert_nothing_started(config: PipelineConfig) -> None:
    assert not config.run_dir().exists()
    launched = [
        child
        for child in psutil.Process().children(recursive=True)
        if any("horovodrun" in part or part == "tasks.train.rank" for part in child.cmdline())
    ]
    assert launched == []


@pytest.mark.parametrize(
    ("hostfile_text", "message"),
    [
        (None, "hostfile .* does not exist"),
        ("node1\n", "expected lines 'HOST slots=N'"),
        ("localhost slots=1\n", "Requested more processes"),
    ],
)
def test_bad_hostfile_fails_before_any_process_starts(
    tmp_path: Path, hostfile_text: str | None, message: str
) -> None:
    hostfile = tmp_path / "hostfile"
    if hostfile_text is not None:
        hostfile.write_text(hostfile_text)
    config = run_config(tmp_path / "work", "bad-hostfile", num_proc=2, hostfile=hostfile)
    with pytest.raises(ConfigError, match=message):
        trained(config, "file:///nowhere")
    _assert_nothing_started(config)


def test_resume_without_checkpoint_fails_before_any_process_starts(tmp_path: Path) -> None:
    config = run_config(tmp_path / "work", "never-ran", resume=True)
    with pytest.raises(ConfigError, match=r"holds no complete checkpoint"):
        trained(config, "file:///nowhere")
    _assert_nothing_started(config)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochs": 3, "lr": 0.2}, r"was trained with .*'lr': 0\.1"),
        ({"epochs": 1}, r"is after epoch 2, beyond epochs=1"),
    ],
)
def test_resume_that_cannot_continue_the_checkpoint_is_refused(
    work_dir: Path, np1_run: Path, overrides: dict, message: str
) -> None:
    config = run_config(work_dir, "np1", num_proc=1, resume=True, **overrides)
    with pytest.raises(ConfigError, match=message):
        trained(config, "file:///nowhere")
    assert len(history(np1_run)) == 2  # untouched


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"num_proc": 1}, r"num_proc=1 but hosts 'localhost:1,127\.0\.0\.1:1' offer 2 slots"),
        ({"hosts": "localhost:1,localhost:1"}, r"lists localhost more than once"),
        ({"hostfile": Path("hostfile")}, r"hostfile hostfile cannot be used with worker_index"),
    ],
)
def test_bad_rendezvous_job_fails_before_any_process_starts(
    tmp_path: Path, overrides: dict, message: str
) -> None:
    config = job_config(tmp_path / "work", 0, free_port(), **overrides)
    with pytest.raises(ConfigError, match=message):
        trained(config, "file:///nowhere")
    _assert_nothing_started(config)


def test_ranks_of_a_host_share_its_cores() -> None:
    assert threads_per_rank(cpu_count=16, ranks_per_host=4, useful_threads=8) == 4
    assert threads_per_rank(cpu_count=16, ranks_per_host=1, useful_threads=8) == 8
    assert threads_per_rank(cpu_count=2, ranks_per_host=3, useful_threads=8) == 1
    assert threads_per_rank(cpu_count=64, ranks_per_host=2) == 1  # the seed model: one is best
