"""tasks/train/supervisor.py: the gang of a restart, the restart's record, and `supervise`
driving a plain Python attempt that raises TrainingError as `run_ranks` does when a rank dies
(no ranks started: the real restarts are in test_step_restarts.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.base.config import PipelineConfig
from pipeline.base.layout import TRAIN_RESTARTS
from tasks.train.errors import TrainingError
from tasks.train.supervisor import remaining_ranks, restart_record, supervise, survivors
from tests.support.checkpoints import write_epoch

KILLED = 128 + 9  # a rank killed by SIGKILL, as the shell reports it


def config_of(tmp_path: Path, **fields: object) -> PipelineConfig:
    return PipelineConfig(work_dir=tmp_path / "work", run_id="run", **fields)


class Attempts:
    """An attempt callable: raises the given errors in turn, then returns; records each
    config it was called with."""

    def __init__(self, *errors: TrainingError) -> None:
        self.errors, self.configs = list(errors), []

    def __call__(self, config: PipelineConfig) -> None:
        self.configs.append(config)
        if self.errors:
            raise self.errors.pop(0)


def restarts_of(config: PipelineConfig) -> list[dict]:
    path = config.run_dir() / TRAIN_RESTARTS
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.parametrize(("num_proc", "left"), [(4, 3), (2, 1), (1, 1)])
def test_a_restart_uses_the_ranks_that_did_not_die_and_at_least_one(num_proc, left) -> None:
    assert remaining_ranks(num_proc) == left


def test_survivors_on_one_host_are_one_rank_fewer_and_nothing_else_changes(tmp_path) -> None:
    config = config_of(tmp_path, num_proc=3, batch_size=60, epochs=4)
    after = survivors(config)
    assert after.num_proc == 2
    assert after.model_dump(exclude={"num_proc"}) == config.model_dump(exclude={"num_proc"})


def test_host_zero_of_a_rendezvous_job_goes_on_alone_with_its_own_slots(tmp_path) -> None:
    job = config_of(tmp_path, num_proc=3, hosts="localhost:2,127.0.0.1:1", worker_index=0)
    alone = survivors(job)
    assert (alone.worker_index, alone.hosts, alone.num_proc) == (None, None, 2)


def test_the_restart_record_names_rank_reason_epoch_and_ranks() -> None:
    error = TrainingError("rank 1 died", rank=1, status=KILLED)
    assert restart_record(2, error, from_epoch=3, num_proc=1) == {
        "restart": 2,
        "rank": 1,
        "reason": "exited with status 137 (SIGKILL)",
        "from_epoch": 3,
        "num_proc": 1,
    }


def test_an_attempt_that_succeeds_runs_once_and_records_no_restart(tmp_path) -> None:
    config, attempts = config_of(tmp_path, num_proc=2), Attempts()
    supervise(config, attempts)
    assert attempts.configs == [config]
    assert restarts_of(config) == []


def test_a_dead_rank_without_a_checkpoint_restarts_fresh_with_one_rank_fewer(tmp_path) -> None:
    config = config_of(tmp_path, num_proc=2, max_restarts=1)
    attempts = Attempts(TrainingError("rank 1 killed", rank=1, status=KILLED))
    supervise(config, attempts)
    first, second = attempts.configs
    assert (first.num_proc, second.num_proc, second.resume) == (2, 1, False)
    assert restarts_of(config) == [
        {
            "restart": 1,
            "rank": 1,
            "reason": "exited with status 137 (SIGKILL)",
            "from_epoch": 0,
            "num_proc": 1,
        }
    ]


def test_a_dead_rank_after_a_checkpoint_resumes_from_its_epoch(tmp_path) -> None:
    config = config_of(tmp_path, num_proc=3, max_restarts=2)
    write_epoch(config.run_dir().resolve(), 2, config)  # a real pointer and checkpoint files
    attempts = Attempts(TrainingError("rank 2 killed", rank=2, status=KILLED))
    supervise(config, attempts)
    assert (attempts.configs[1].num_proc, attempts.configs[1].resume) == (2, True)
    assert [(r["from_epoch"], r["num_proc"]) for r in restarts_of(config)] == [(2, 2)]


def test_restarts_stop_at_max_restarts_and_the_last_error_says_so(tmp_path) -> None:
    config = config_of(tmp_path, num_proc=4, max_restarts=2)
    errors = [TrainingError(f"rank {r} killed", rank=r, status=KILLED) for r in (3, 2, 1)]
    attempts = Attempts(*errors)
    with pytest.raises(TrainingError, match=r"gave up after 2 restart\(s\) \(max_restarts=2\)"):
        supervise(config, attempts)
    assert [c.num_proc for c in attempts.configs] == [4, 3, 2]
    assert [r["restart"] for r in restarts_of(config)] == [1, 2]


def test_without_restarts_the_rank_error_itself_is_raised(tmp_path) -> None:
    error = TrainingError("rank 1 killed", rank=1, status=KILLED)
    attempts = Attempts(error)
    with pytest.raises(TrainingError) as raised:
        supervise(config_of(tmp_path, num_proc=2, max_restarts=0), attempts)
    assert raised.value is error and len(attempts.configs) == 1


def test_a_failure_that_names_no_rank_is_never_restarted(tmp_path) -> None:
    error = TrainingError("horovodrun could not start")
    attempts = Attempts(error)
    with pytest.raises(TrainingError) as raised:
        supervise(config_of(tmp_path, num_proc=2), attempts)
    assert raised.value is error and len(attempts.configs) == 1


def test_a_rendezvous_job_that_never_trained_an_epoch_fails_unrestarted(tmp_path) -> None:
    job = config_of(tmp_path, num_proc=2, hosts="localhost:1,127.0.0.1:1", worker_index=0)
    attempts = Attempts(TrainingError("rank 1 lost", rank=1, status=KILLED))
    with pytest.raises(TrainingError, match="rank 1 lost"):
        supervise(job, attempts)
    assert len(attempts.configs) == 1 and restarts_of(job) == []
