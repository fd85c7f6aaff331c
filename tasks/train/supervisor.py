"""Supervision of the ranks of one host: a dead rank costs a restart, not the run.

When a rank dies (killed, crashed), `run_ranks` has already stopped the others and raised
`TrainingError` naming it. The supervisor then restarts the gang from the last complete
checkpoint with the ranks that remain (one fewer, at least one), up to `max_restarts` times.
That changes nothing that is trained: every update is the mean gradient over the same global
batch whatever the number of ranks (tasks.train.sharding), so the final model equals an
uninterrupted run's. Each restart is logged and appended to the run's TRAIN_RESTARTS file, which
the publish step copies into the manifest.

Host 0 of a rendezvous job (`worker_index` 0) is supervised too: when a rank fails there,
typically because another host died and took its ranks with it, host 0 goes on alone from the
last checkpoint as a single-host job with its own slots, once the job has trained an epoch
(a job whose hosts never all came fails, as before).

Not restarted: a rank that sent an error of its own (`RankFailed` on its message channel:
bad data, a bad checkpoint; the same at every start), the other hosts of a rendezvous job, and
horovodrun over ssh (restarting those takes hosts this process does not own).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from pipeline.base import layout
from pipeline.base.config import PipelineConfig
from pipeline.base.logs import step_logger
from tasks.train import rendezvous
from tasks.train.checkpoints import read_checkpoint
from tasks.train.errors import TrainingError
from tasks.train.launcher import describe_exit

# --- pure core ------------------------------------------------------------------------------


def remaining_ranks(num_proc: int) -> int:
    """The ranks a restart uses: those that did not die (one did), at least one."""
    return max(1, num_proc - 1)


def survivors(config: PipelineConfig) -> PipelineConfig:
    """The gang of a restart. On one host: the ranks that did not die. Host 0 of a rendezvous
    job goes on alone, its own slots as a single-host job: the other hosts (one of them is
    gone or failing) are not this process's to restart."""
    if config.worker_index is None:
        return config.model_copy(update={"num_proc": remaining_ranks(config.num_proc)})
    host_zero = rendezvous.host_names(config.hosts)[0]
    plan = rendezvous.slot_plan(config.hosts, None, config.num_proc)
    own_slots = sum(1 for slot in plan if slot.hostname == host_zero)
    return config.model_copy(update={"worker_index": None, "hosts": None, "num_proc": own_slots})


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
            if error.rank is None or error.reported:  # no rank to spare, or its own error
                raise
            if current.worker_index is not None and _resume_epoch(run_dir) == 0:
                raise  # the job never trained together: a host missing from the start fails it
            if restarts >= config.max_restarts:
                if restarts == 0:
                    raise
                raise TrainingError(
                    f"gave up after {restarts} restart(s) (max_restarts={config.max_restarts}): "
                    f"{error}",
                    error.rank,
                    error.status,
                    error.reported,
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
    restarted = survivors(config)
    record = restart_record(restart_number, error, from_epoch, restarted.num_proc)
    (run_dir / layout.METRICS_DIR).mkdir(parents=True, exist_ok=True)
    with open(run_dir / layout.TRAIN_RESTARTS, "a") as restarts:
        restarts.write(json.dumps(record) + "\n")
    # No complete checkpoint yet: the restart starts over, as a fresh run would.
    return restarted.model_copy(update={"resume": from_epoch > 0})
