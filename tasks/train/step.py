"""The train step's shell: check the run, write its config.json, start its ranks.

Three ways to start ranks, one `run_ranks` for all of them:
- on this host only (the default, `--num-proc N`): `mpirun` starts the ranks and Horovod
  exchanges over MPI's shared memory (`tasks.train.mpirun`), where Horovod was built with MPI;
  elsewhere every rank is started here with Horovod's Gloo variables and a rendezvous served on
  127.0.0.1 (no horovodrun: it costs ~5.5 s a run);
- a rendezvous job (`--worker-index`, a Kubernetes Indexed Job): host 0 serves the rendezvous,
  every host starts its own slots; no ssh;
- `horovodrun` over ssh, where other hosts are named (`--hosts`, `--hostfile`) without
  `--worker-index`.
"""

from __future__ import annotations

import os
import shutil
import socket
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path

from pipeline.base import layout
from pipeline.base.config import ConfigError, PipelineConfig
from pipeline.base.files import atomic_write
from pipeline.base.locks import exclusive_lock
from pipeline.base.logs import step_logger
from tasks.train import mpirun, rendezvous
from tasks.train.checkpoints import check_resumable, read_checkpoint
from tasks.train.errors import TrainingError
from tasks.train.launcher import Launch, run_ranks
from tasks.train.messages import EpochDone
from tasks.train.store_checkpoints import CheckpointMirror, checkpoint_store, restore_checkpoint
from tasks.train.supervisor import supervise

# The seed's per-batch operators (256x784 by 784x10) are too small to split across threads:
# measured on 2 cores, a second OpenMP thread (or engine worker) made the training loop 2.5x
# slower, spent on waking and joining threads. More threads only pay with a bigger model.
USEFUL_THREADS = 1
# How long a host of a rendezvous job waits for the others: for host 0's rendezvous to answer,
# and (as Gloo's timeout) for every rank to join. Pods of one Job start minutes apart at worst
# (image pulls, the dataset step); a host that never comes fails the job.
RENDEZVOUS_TIMEOUT_S = 120.0
# What a rank may see of the launcher's environment: the interpreter's, the libraries' and
# Horovod's own settings. Never credentials (AWS_*, PREFECT_API_KEY, ...): ranks need none, and
# horovodrun would write them into the ssh command line of every remote rank.
RANK_ENV_NAMES = frozenset(
    {"PATH", "HOME", "USER", "LOGNAME", "LANG", "TZ", "TMPDIR", "VIRTUAL_ENV", "LD_LIBRARY_PATH"}
)
RANK_ENV_PREFIXES = (
    "HOROVOD_", "MXNET_", "OMP_", "KMP_", "OPENBLAS_", "MKL_", "CUDA_", "NCCL_", "NVIDIA_",
    "PYTHON", "LC_",
)  # fmt: skip


def threads_per_rank(
    cpu_count: int, ranks_per_host: int, useful_threads: int = USEFUL_THREADS
) -> int:
    """CPU threads for each rank: the ranks of a host share its cores, and no rank gets more
    threads than the model's operators can use."""
    return max(1, min(useful_threads, cpu_count // ranks_per_host))


def rank_environment(config: PipelineConfig, base: Mapping[str, str]) -> dict[str, str]:
    """The ranks' environment: what they need of `base`, and fixed thread counts."""
    plan = rendezvous.slot_plan(config.hosts, config.hostfile, config.num_proc)
    threads = threads_per_rank(len(os.sched_getaffinity(0)), max(s.local_size for s in plan))
    kept = {
        name: value
        for name, value in base.items()
        if name in RANK_ENV_NAMES or name.startswith(RANK_ENV_PREFIXES)
    }
    return {
        **kept,
        # Ranks of one host share its cores instead of each starting one thread per core;
        # fixed thread counts also keep reductions in a fixed order (determinism).
        "OMP_NUM_THREADS": str(threads),
        "MXNET_CPU_WORKER_NTHREADS": str(threads),
        # Horovod's MXNet operators run on the engine's prioritized pool (4 threads by
        # default): one is enough for one allreduce in flight, more only compete for the cores.
        "MXNET_CPU_PRIORITY_NTHREADS": str(threads),
        # Deterministic operator implementations: same seed and N => bit-identical parameters.
        "MXNET_ENFORCE_DETERMINISM": "1",
        "PYTHONUNBUFFERED": "1",
    }


def uses_ssh(config: PipelineConfig) -> bool:
    """Whether horovodrun must start ranks on other hosts over ssh."""
    if config.worker_index is not None:
        return False
    if config.hostfile is not None:
        return True
    local = {*rendezvous.LOCAL_NAMES, socket.gethostname()}
    return config.hosts is not None and not set(rendezvous.host_names(config.hosts)) <= local


def _check_rendezvous_job(config: PipelineConfig) -> None:
    if config.hostfile is not None:
        raise ConfigError(
            f"hostfile {config.hostfile} cannot be used with worker_index: list the job's "
            "hosts in hosts, in index order"
        )
    names = rendezvous.host_names(config.hosts)
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(
            f"hosts {config.hosts!r} lists {', '.join(repeated)} more than once: with "
            "worker_index each entry is one host of the job"
        )
    slots = len(rendezvous.slot_plan(config.hosts, None, config.num_proc))
    offered = sum(int(item.split(":")[1]) for item in config.hosts.split(","))
    if offered != config.num_proc or slots != config.num_proc:
        raise ConfigError(
            f"num_proc={config.num_proc} but hosts {config.hosts!r} offer {offered} slots: "
            "with worker_index every slot of every host runs one rank, so they must be equal"
        )


def check_launchable(config: PipelineConfig) -> None:
    """Everything a user can get wrong that pydantic cannot see, before any process starts."""
    # Gloo looks up this machine's own name; where that fails, hvd.init() dies with SIGSEGV
    # ("Resource deadlock avoided") instead of an error (seen in containers whose /etc/hosts
    # lacks their hostname).
    hostname = socket.gethostname()
    try:
        socket.getaddrinfo(hostname, None)
    except OSError as exc:
        raise TrainingError(
            f"this machine's hostname {hostname!r} does not resolve ({exc}); Horovod's Gloo "
            "needs it: add it to /etc/hosts (docker: --add-host or --hostname)"
        ) from None
    if config.worker_index is not None:
        _check_rendezvous_job(config)
    if config.hostfile is not None and not config.hostfile.is_file():
        raise ConfigError(f"hostfile {config.hostfile} does not exist")
    rendezvous.slot_plan(config.hosts, config.hostfile, config.num_proc)
    # Rank 0 reads the checkpoint; the other hosts of a rendezvous job have none. "auto"
    # resumes only a run that has one.
    resumes = config.resume is True or (
        config.resume == "auto" and read_checkpoint(config.run_dir()) is not None
    )
    if resumes and config.is_coordinator():
        check_resumable(config)


def rank_command(run_dir: Path) -> list[str]:
    """The command line of one rank, the same on every host: the attempt's config is all it
    is given."""
    return [sys.executable, "-m", "tasks.train.rank", "--config", str(run_dir / layout.RANK_CONFIG)]


def rank_config(config: PipelineConfig) -> PipelineConfig:
    """The config the ranks read: the same, with the run and dataset directories absolute, as
    a rank on another host (horovodrun over ssh) needs them."""
    return config.model_copy(
        update={
            "work_dir": config.work_dir.expanduser().resolve(),
            "data_dir": config.data_dir.expanduser().resolve(),
        }
    )


def horovodrun_command(config: PipelineConfig, command: list[str]) -> list[str]:
    """The horovodrun command line that starts every rank over ssh."""
    executable = Path(sys.executable).with_name("horovodrun")
    horovodrun = str(executable) if executable.exists() else shutil.which("horovodrun")
    if horovodrun is None:
        raise TrainingError("horovodrun not found next to the Python interpreter or on PATH")
    # --disable-cache: horovodrun otherwise keeps its check results in ~/.horovod, which a
    # container with a read-only root filesystem (the Kubernetes manifests) cannot create.
    horovod = [horovodrun, "-np", str(config.num_proc), "--gloo", "--disable-cache"]
    if config.hostfile is not None:
        horovod += ["--hostfile", str(config.hostfile)]
    else:
        horovod += ["-H", config.hosts]
    return horovod + command


def run_local_job(config: PipelineConfig, command: list[str], env: dict[str, str], **kw) -> None:
    """Every rank on this host, meeting at a rendezvous on 127.0.0.1 (no network exposure)."""
    plan = rendezvous.slot_plan(config.hosts, None, config.num_proc)
    with rendezvous.rendezvous_server("127.0.0.1", 0, plan) as port:
        iface = env.get("HOROVOD_GLOO_IFACE") or rendezvous.route_interface("127.0.0.1")
        job_env = {**env, **rendezvous.job_variables("127.0.0.1", iface, port)}
        launches = [
            Launch(command, {**job_env, **rendezvous.rank_variables(slot)}, slot.rank)
            for slot in plan
        ]
        run_ranks(launches, **kw)


def run_host_job(config: PipelineConfig, command: list[str], env: dict[str, str], **kw) -> None:
    """This host's part of a rendezvous job (worker_index set): host 0 serves the rendezvous;
    every host waits until it answers, then runs its own slots with horovodrun's variables."""
    logger = step_logger(__name__)
    plan = rendezvous.slot_plan(config.hosts, None, config.num_proc)
    names = rendezvous.host_names(config.hosts)
    this_host, port = names[config.worker_index], config.rendezvous_port
    # Host 0 serves on every interface: the other hosts reach it under its name.
    serving = (
        rendezvous.rendezvous_server("", port, plan) if config.worker_index == 0 else nullcontext()
    )
    with serving:
        logger.info(
            "host %d: joining the Gloo rendezvous at %s:%d", config.worker_index, names[0], port
        )
        address = rendezvous.wait_for_rendezvous(names[0], port, RENDEZVOUS_TIMEOUT_S)
        # Set by the user, HOROVOD_GLOO_IFACE wins (e.g. where a host's own name resolves to
        # a loopback address, as Debian's /etc/hosts does).
        iface = env.get("HOROVOD_GLOO_IFACE") or rendezvous.route_interface(address)
        job_env = {
            # The ranks wait as long for each other as the hosts wait for the rendezvous.
            "HOROVOD_GLOO_TIMEOUT_SECONDS": str(round(RENDEZVOUS_TIMEOUT_S)),
            **env,
            **rendezvous.job_variables(address, iface, port),
        }
        slots = [slot for slot in plan if slot.hostname == this_host]
        logger.info(
            "host %d: ranks %s over %s", config.worker_index, [s.rank for s in slots], iface
        )
        launches = [
            Launch(command, {**job_env, **rendezvous.rank_variables(slot)}, slot.rank)
            for slot in slots
        ]
        run_ranks(launches, **kw)


def train(config: PipelineConfig, on_epoch: Callable[[EpochDone], None] | None = None) -> None:
    """Train with `config.num_proc` Horovod ranks into `config.run_dir()`, from the dataset
    cache `config.data_uri()`.

    With `config.worker_index` set only this host's ranks run here; the model is written on
    host 0 (`config.is_coordinator()`), the other hosts' run directories hold just config.json.
    On one host a rank that dies costs a restart (up to `config.max_restarts`), not the run.
    Host 0 copies each checkpoint to the artifact store, and a resume whose run directory has
    none restores it from there first.
    `on_epoch` receives rank 0's finished epochs, e.g. to show progress."""
    run_dir = config.run_dir().resolve()
    if not config.is_coordinator():
        check_launchable(config)
        with run_lock(config, run_dir):
            atomic_write(run_dir / layout.RUN_CONFIG, config.model_dump_json(indent=2))
            start_ranks(config, on_epoch)
        return
    store = checkpoint_store(config)
    if config.resume and read_checkpoint(run_dir) is None:
        epoch = restore_checkpoint(store, run_dir)
        if epoch is not None:
            step_logger(__name__).info(
                "restored the checkpoint of epoch %d from %s", epoch, store.uri
            )
    check_launchable(config)  # before anything is created: a bad option leaves no trace
    with run_lock(config, run_dir):
        # The run's one config: what the user asked for; restarts are recorded beside it.
        atomic_write(run_dir / layout.RUN_CONFIG, config.model_dump_json(indent=2))
        if not config.resume:  # a fresh run: restarts of an earlier attempt are not its own
            (run_dir / layout.TRAIN_RESTARTS).unlink(missing_ok=True)
        mirror = CheckpointMirror(store, run_dir, config.keep_checkpoints)

        def epoch_done(message: EpochDone) -> None:  # its checkpoint is written
            mirror.epoch_done()
            if on_epoch is not None:
                on_epoch(message)

        try:
            if config.worker_index is not None or not uses_ssh(config):  # host 0 or one host
                supervise(config, lambda attempt: start_ranks(attempt, epoch_done))
            else:
                start_ranks(config, epoch_done)
        finally:
            mirror.close()


@contextmanager
def run_lock(config: PipelineConfig, run_dir: Path) -> Iterator[None]:
    """One run per run directory for the whole training, restarts included: a second run with
    the same run id fails at once instead of deleting this one's checkpoints."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / layout.run_lock(config.worker_index)
    with exclusive_lock(lock, f"run {config.run_id!r} ({run_dir})"):
        yield


def start_ranks(config: PipelineConfig, on_epoch: Callable[[EpochDone], None] | None) -> None:
    """One attempt: write the ranks' config, start the ranks, wait for them."""
    check_launchable(config)  # again for a restart: it resumes from the checkpoint left
    run_dir = config.run_dir().resolve()
    env = rank_environment(config, os.environ)
    command = rank_command(run_dir)
    # The one typed config travels to the ranks as this file: this attempt's (a restart has
    # fewer ranks and resumes), never config.json, which keeps the config the user asked for.
    atomic_write(run_dir / layout.RANK_CONFIG, rank_config(config).model_dump_json(indent=2))
    if config.worker_index is not None:
        run_host_job(config, command, env, on_epoch=on_epoch)
    elif uses_ssh(config):
        run_ranks([Launch(horovodrun_command(config, command), env)], on_epoch=on_epoch)
    elif mpirun.available():
        run_ranks([mpirun.launch(config.num_proc, command, env)], on_epoch=on_epoch)
    else:
        run_local_job(config, command, env, on_epoch=on_epoch)
