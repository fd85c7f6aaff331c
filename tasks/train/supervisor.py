"""Supervision of the ranks of one host: a dead rank costs a restart, not the run.

When a rank dies (killed, crashed), `run_ranks` has already stopped the others and raised
`TrainingError` naming it. The supervisor then restarts the gang from the last complete
checkpoint with the ranks that remain (one fewer, at least one), up to `max_restarts` times.
That changes nothing that is trained: every update is the mean gradient over the same global
batch whatever the number of ranks (tasks.train.sharding), so the final model equals an
uninterrupted run's. Each restart is logged and appended to the run's TRAIN_RESTARTS file, which
the publish step copies into the manifest.

Not restarted: a rank that reported an error of its own (`error: ...`, status 1: bad data, a
bad checkpoint; the same at every start), and jobs whose ranks span hosts (a rendezvous job or
horovodrun over ssh: restarting them takes every host, which this process does not own).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from pipeline.base import layout
from pipeline.base.config import PipelineConfig
from pipeline.base.logs import step_logger
from tasks.train.checkpoints import read_checkpoint
from tasks.train.history import TrainingError
from tasks.train.launcher import describe_exit

# --- pure core ------------------------------------------------------------------------------


def reported_its_own_error(error: TrainingError) -> bool:
    """Whether the failed rank ended with its own `error: ...` line (status 1): a problem a
    restart cannot fix."""
    return error.status == 1 and "\n  error: " in str(error)


def remaining_ranks(num_proc: int) -> int:
    """The ranks a restart uses: those that did not die (one did), at least one."""
    return max(1, num_proc - 1)


def restart_record(number: int, error: TrainingError, from_epoch: int, num_proc: int) -> dict:
    """One line of TRAIN_RESTARTS: which rank died, why, and how training went on."""
    return {
        "restart": number,
        "rank": error.rank,
        "reason": "exited with " + describe_exit(error.status or 0),
        "from_epoch": from_epoch,
        "num_proc": num_proc,
    }


# --- shell ------------------------------------------------------------------------------------


def supervise(config: PipelineConfig, attempt: Callable[[PipelineConfig], None]) -> None:
    """Run `attempt(config)`; while a rank dies and restarts are left, run it again from the
    last complete checkpoint with the ranks that remain. Raises the last failure otherwise."""
    logger = step_logger(__name__)
    run_dir = config.run_dir().resolve()
    current, restarts = config, 0
    while True:
        try:
            attempt(current)
            return
        except TrainingError as error:
            if error.rank is None or reported_its_own_error(error):
                raise
            if restarts >= config.max_restarts:
                if restarts == 0:
                    raise
                raise TrainingError(
                    f"gave up after {restarts} restart(s) (max_restarts={config.max_restarts}): "
                    f"{error}",
                    error.rank,
                    error.status,
                ) from None
            restarts += 1
            current = _restarted(current, run_dir, restart_number=restarts, error=error)
            logger.warning(
                "rank %s %s; restart %d of at most %d from epoch %d with %d rank(s)",
                error.rank,
                f"exited with {describe_exit(error.status or 0)}",
                restarts,
                config.max_restarts,
                _resume_epoch(run_dir),
                current.num_proc,
            )


def _resume_epoch(run_dir: Path) -> int:
    checkpoint = read_checkpoint(run_dir)
    return 0 if checkpoint is None else checkpoint.epoch


def _restarted(
    config: PipelineConfig, run_dir: Path, restart_number: int, error: TrainingError
) -> PipelineConfig:
    """The config of the next attempt, with its restart recorded in the run directory."""
    from_epoch = _resume_epoch(run_dir)
    num_proc = remaining_ranks(config.num_proc)
    record = restart_record(restart_number, error, from_epoch, num_proc)
    (run_dir / layout.METRICS_DIR).mkdir(parents=True, exist_ok=True)
    with open(run_dir / layout.TRAIN_RESTARTS, "a") as restarts:
        restarts.write(json.dumps(record) + "\n")
    # No complete checkpoint yet: the restart starts over, as a fresh run would.
    return config.model_copy(update={"resume": from_epoch > 0, "num_proc": num_proc})
