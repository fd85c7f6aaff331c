"""Train step: the seed's softmax regression, data-parallel with Horovod.

Pure core (tested directly, no Horovod needed): `shard_bounds`, `global_batches`,
`epoch_permutation`, `split_validation`, `select_context`, `threads_per_rank`, `build_net`,
`epoch_record`, `best_epoch`, `train_summary`, `parse_output_line`, `failure_message`.
Rank side (`python -m tasks.train --config RUN_DIR/config.json --data URI --out RUN_DIR`):
`load_device_data`, `ScoredBatch` (the per-batch graph), `run_epoch`, `run_rank` (restore,
train, checkpoint every epoch, write the outputs).
Launcher: `train(config, data_uri)` validates, writes config.json, runs `horovodrun --gloo`,
streams rank 0's output into the Prefect run log and turns a failed rank into `TrainingError`.

Global-batch semantics: every epoch all ranks draw the same permutation (from seed and epoch);
each global batch of `batch_size` samples is cut into `num_proc` contiguous shards
(`np.array_split` style); DistributedTrainer sums the per-rank gradient sums and divides by
N, and `trainer.step(n / N)` divides by n / N, so one update is the single-process update on
the same n samples. A last partial batch with fewer samples than ranks is dropped (at most
N - 1 samples an epoch), since a rank without samples has no gradient to contribute.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from contextlib import suppress
from pathlib import Path
from typing import Any, NamedTuple

import horovod.mxnet as hvd
import mxnet as mx
import numpy as np
import psutil
from horovod.runner.common.util.hosts import (
    get_host_assignments,
    parse_host_files,
    parse_hosts,
)
from mxnet import autograd, gluon, init, nd
from mxnet.gluon import nn

from pipeline.config import ConfigError, PipelineConfig
from pipeline.errors import PipelineError
from tasks.dataset import load_dataset

NUM_CLASSES = 10
NUM_FEATURES = 28 * 28
STDERR_TAIL_LINES = 20
# The seed's per-batch operators (256x784 by 784x10) are too small to split across threads:
# measured on 2 cores, a second OpenMP thread (or engine worker) made the training loop 2.5x
# slower, spent on waking and joining threads. More threads only pay with a bigger model.
USEFUL_THREADS = 1
CHECKPOINT_POINTER = "latest.json"
# Config fields that shape the training trajectory: a resumed run must use the same values.
TRAJECTORY_FIELDS = ("batch_size", "lr", "init_sigma", "seed", "validation_fraction")
# Independent random streams derived from the one seed (numpy SeedSequence spawn keys).
_SPLIT_STREAM, _SHUFFLE_STREAM = 0, 1
# horovodrun prefixes every rank line with "[RANK]<stdout>:" or "[RANK]<stderr>:".
_RANK_LINE_RE = re.compile(r"^\[(\d+)\]<(stdout|stderr)>:(.*)$")
_RANK_EXIT_RE = re.compile(r"^Process (\d+) exit with status code (-?\d+)\.")

log = logging.getLogger("tasks.train")


class TrainingError(PipelineError, RuntimeError):
    """A training run failed; the message names the failing rank and its last stderr lines."""


# ----------------------------------------------------------------------------- pure core


def shard_bounds(num_samples: int, num_ranks: int, rank: int) -> tuple[int, int]:
    """[lo, hi) of `rank`'s contiguous shard of `num_samples`, as np.array_split cuts them."""
    base, extra = divmod(num_samples, num_ranks)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def global_batches(num_samples: int, batch_size: int, num_ranks: int) -> list[tuple[int, int]]:
    """[start, stop) of each global batch of an epoch; a last batch smaller than the number
    of ranks is dropped because some rank would get no sample."""
    batches = [
        (start, min(start + batch_size, num_samples)) for start in range(0, num_samples, batch_size)
    ]
    if batches and batches[-1][1] - batches[-1][0] < num_ranks:
        batches.pop()
    return batches


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of `epoch` (1-based): the same on every rank, for any number of ranks."""
    stream = np.random.SeedSequence(seed, spawn_key=(_SHUFFLE_STREAM, epoch))
    return np.random.default_rng(stream).permutation(num_samples)


def split_validation(num_samples: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, validation) indices: a fixed seeded hold-out of `fraction` of the samples
    (at least one when fraction > 0)."""
    num_val = max(1, round(num_samples * fraction)) if fraction > 0 else 0
    stream = np.random.SeedSequence(seed, spawn_key=(_SPLIT_STREAM,))
    order = np.random.default_rng(stream).permutation(num_samples)
    return np.sort(order[num_val:]), np.sort(order[:num_val])


def select_context(num_gpus: int, local_rank: int) -> mx.Context:
    """One GPU per local rank when the host has GPUs, else the CPU."""
    if num_gpus == 0:
        return mx.cpu()
    if local_rank >= num_gpus:
        raise TrainingError(
            f"local rank {local_rank} has no GPU: this host has {num_gpus}; "
            "start at most one process per GPU on each host"
        )
    return mx.gpu(local_rank)


def threads_per_rank(
    cpu_count: int, ranks_per_host: int, useful_threads: int = USEFUL_THREADS
) -> int:
    """CPU threads for each rank: the ranks of a host share its cores, and no rank gets more
    threads than the model's operators can use."""
    return max(1, min(useful_threads, cpu_count // ranks_per_host))


def build_net(init_sigma: float, ctx: mx.Context) -> nn.HybridSequential:
    """The seed model: one Dense(10) on flattened 28x28 inputs, Normal(sigma) initialised."""
    net = nn.HybridSequential()
    net.add(nn.Dense(NUM_CLASSES, in_units=NUM_FEATURES))
    net.initialize(init.Normal(sigma=init_sigma), ctx=ctx)
    return net


def best_epoch(history: list[dict[str, Any]]) -> int:
    """The epoch whose model is kept: best validation accuracy (earliest on ties) when
    validation is on, else the last epoch."""
    if "val_accuracy" not in history[-1]:
        return history[-1]["epoch"]
    return max(history, key=lambda record: (record["val_accuracy"], -record["epoch"]))["epoch"]


def train_summary(history: list[dict[str, Any]], num_proc: int) -> dict[str, Any]:
    """metrics/train.json: the accuracies of the kept model, and the training time."""
    kept = history[best_epoch(history) - 1]
    return {
        "epochs": len(history),
        "train_accuracy": kept["train_accuracy"],
        "test_accuracy": kept["test_accuracy"],
        "val_accuracy": kept.get("val_accuracy"),
        "best_epoch": kept["epoch"],
        "num_proc": num_proc,
        "seconds": round(sum(record["seconds"] for record in history), 3),
    }


def format_epoch(record: dict[str, Any], epochs: int) -> str:
    """The human-readable epoch line rank 0 prints (and the launcher logs)."""
    val = f", val acc {record['val_accuracy']:.4f}" if "val_accuracy" in record else ""
    return (
        f"epoch {record['epoch']}/{epochs}: loss {record['loss']:.4f}, "
        f"train acc {record['train_accuracy']:.4f}, test acc {record['test_accuracy']:.4f}"
        f"{val}, {record['seconds']:.2f} s"
    )


def parse_output_line(line: str) -> tuple[int | None, str | None, str]:
    """(rank, "stdout"|"stderr", text) of a horovodrun output line; (None, None, line) for
    horovodrun's own lines."""
    match = _RANK_LINE_RE.match(line)
    if match is None:
        return None, None, line
    return int(match.group(1)), match.group(2), match.group(3)


def describe_exit(code: int) -> str:
    """Exit status as a shell reports it: 128+N means killed by signal N."""
    if code > 128:
        with suppress(ValueError):
            return f"status {code} ({signal.Signals(code - 128).name})"
    return f"status {code}"


def failure_message(
    returncode: int, stderr_tails: dict[int, Iterable[str]], launcher_lines: Iterable[str]
) -> str:
    """What went wrong, from horovodrun's report of the first rank that exited non-zero."""
    launcher_lines = list(launcher_lines)
    exits = [m for m in map(_RANK_EXIT_RE.match, launcher_lines) if m]
    if not exits:
        tail = "\n  ".join(launcher_lines[-STDERR_TAIL_LINES:]) or "(no output)"
        return f"horovodrun exited with {describe_exit(returncode)}; its last lines:\n  {tail}"
    rank, code = int(exits[0].group(1)), int(exits[0].group(2))
    tail = "\n  ".join(stderr_tails.get(rank, ())) or "(no stderr output)"
    return (
        f"training failed: rank {rank} exited with {describe_exit(code)}; "
        f"last stderr lines of rank {rank}:\n  {tail}"
    )


# ----------------------------------------------------------------------------- checkpoints


def _atomic_write(path: Path, write: Callable[[str], Any]) -> None:
    # A killed process leaves either the old file or the new one, never half of one.
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_checkpoint(checkpoint_dir: Path) -> dict[str, Any] | None:
    """The last complete checkpoint's pointer record, or None if there is none."""
    pointer = checkpoint_dir / CHECKPOINT_POINTER
    return json.loads(pointer.read_text()) if pointer.exists() else None


def save_checkpoint(
    checkpoint_dir: Path,
    net: gluon.Block,
    trainer: gluon.Trainer,
    history: list[dict[str, Any]],
    trajectory: dict[str, Any],
) -> None:
    """Parameters and trainer states of the epoch just finished, then the pointer (last, so
    it only ever names complete files). Files older than both this and the best epoch go."""
    epoch, best = history[-1]["epoch"], best_epoch(history)
    stem = f"epoch-{epoch:04d}"
    _atomic_write(checkpoint_dir / f"{stem}.params", net.save_parameters)
    _atomic_write(checkpoint_dir / f"{stem}.states", trainer.save_states)
    pointer = {
        "epoch": epoch,
        "params": f"{stem}.params",
        "states": f"{stem}.states",
        "best_epoch": best,
        "best_params": f"epoch-{best:04d}.params",
        "history": history,
        "trajectory": trajectory,
    }
    _atomic_write_text(checkpoint_dir / CHECKPOINT_POINTER, json.dumps(pointer, indent=2))
    keep = {CHECKPOINT_POINTER, pointer["params"], pointer["states"], pointer["best_params"]}
    for path in checkpoint_dir.glob("epoch-*"):
        if path.name not in keep:
            path.unlink()


def trajectory_of(config: PipelineConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in TRAJECTORY_FIELDS}


# ----------------------------------------------------------------------------- rank side


class ScoredBatch(gluon.HybridBlock):
    """(uint8 images, labels, batch index) -> (summed loss, correct count) of `net` on the
    indexed samples, as one cached graph.

    The model is so small that per-operator overhead, not arithmetic, sets the speed: one
    graph (static memory and shapes) per batch does the gather, the scaling, the forward pass,
    the loss and the metrics, instead of a dozen imperative calls. The data stays uint8 on the
    device (4x less memory) and is scaled to [0, 1] inside the graph.
    """

    def __init__(self, net: gluon.HybridBlock) -> None:
        super().__init__()
        self.net = net
        self.loss = gluon.loss.SoftmaxCrossEntropyLoss()

    def hybrid_forward(self, F, images, labels, index):
        images, labels = F.take(images, index), F.take(labels, index)
        scores = self.net(F.cast(images, "float32") / 255)
        correct = F.sum(F.broadcast_equal(F.argmax(scores, axis=1), labels))
        return F.sum(self.loss(scores, labels)), correct


def _count_correct(scored: ScoredBatch, images: nd.NDArray, labels: nd.NDArray) -> nd.NDArray:
    """Correct predictions on (a rank's shard of) a data set, as a device scalar."""
    if images.shape[0] == 0:  # no validation set, or fewer samples than ranks
        return nd.zeros((1,), ctx=images.context)
    everything = nd.arange(images.shape[0], ctx=images.context, dtype="int32")
    return scored(images, labels, everything)[1]


def _shard(array: np.ndarray, rank: int, size: int, ctx: mx.Context) -> nd.NDArray:
    lo, hi = shard_bounds(len(array), size, rank)
    return nd.array(array[lo:hi], ctx=ctx, dtype=array.dtype)


def _load_trainer_states(trainer: gluon.Trainer, states: bytes) -> None:
    # Trainer.load_states only reads files; rank 0's bytes come over the wire.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trainer.states"
        path.write_bytes(states)
        trainer.load_states(str(path))


class DeviceData(NamedTuple):
    """One rank's data on its device: the whole (uint8) training set, its evaluation shards."""

    train_x: nd.NDArray
    train_y: nd.NDArray
    test_x: nd.NDArray
    test_y: nd.NDArray
    val_x: nd.NDArray
    val_y: nd.NDArray


def load_device_data(
    data_uri: str, config: PipelineConfig, rank: int, size: int, ctx: mx.Context
) -> DeviceData:
    data = load_dataset(data_uri)
    train_idx, val_idx = split_validation(
        len(data.train_labels), config.validation_fraction, config.seed
    )
    images = data.train_images.reshape(-1, NUM_FEATURES)
    labels = data.train_labels.astype(np.float32)
    return DeviceData(
        # Every rank holds the whole training set: any sample can land in its shard of a batch.
        nd.array(images[train_idx], ctx=ctx, dtype=np.uint8),
        nd.array(labels[train_idx], ctx=ctx, dtype=np.float32),
        # Evaluation sets are sharded: each rank counts its part, the counts are summed.
        _shard(data.test_images.reshape(-1, NUM_FEATURES), rank, size, ctx),
        _shard(data.test_labels.astype(np.float32), rank, size, ctx),
        _shard(images[val_idx], rank, size, ctx),
        _shard(labels[val_idx], rank, size, ctx),
    )


def run_epoch(
    scored: ScoredBatch,
    trainer: gluon.Trainer,
    data: DeviceData,
    batches: list[tuple[int, int]],
    order: np.ndarray,
) -> np.ndarray:
    """Train one epoch over the global `batches` of `order`; return the summed (over ranks)
    loss, train/test/validation correct counts and the three sample counts."""
    rank, size, ctx = hvd.rank(), hvd.size(), data.train_x.context
    device_order = nd.array(order, ctx=ctx, dtype="int32")
    loss_sum, train_correct = nd.zeros((1,), ctx=ctx), nd.zeros((1,), ctx=ctx)
    trained = 0
    for start, stop in batches:
        lo, hi = shard_bounds(stop - start, size, rank)
        index = device_order[start + lo : start + hi]  # a view: no copy, no operator
        with autograd.record():
            batch_loss, batch_correct = scored(data.train_x, data.train_y, index)
        batch_loss.backward()
        # DistributedTrainer divides the summed gradients by N, so this yields the mean over
        # the whole global batch (see module docstring).
        trainer.step((stop - start) / size)
        # Accumulated on the device: no host sync until the end of the epoch.
        loss_sum += batch_loss
        train_correct += batch_correct
        trained += hi - lo
    local = nd.concat(
        loss_sum,
        train_correct,
        _count_correct(scored, data.test_x, data.test_y),
        _count_correct(scored, data.val_x, data.val_y),
        nd.array([trained, data.test_x.shape[0], data.val_x.shape[0]], ctx=ctx),
        dim=0,
    )
    # Sums of sums and of counts (not averages of averages), read once an epoch.
    return hvd.allreduce(local, op=hvd.Sum, name="epoch_metrics").asnumpy()


def epoch_record(epoch: int, totals: np.ndarray, validating: bool, seconds: float) -> dict:
    """One line of metrics/train.jsonl from an epoch's summed metrics."""
    loss, train_ok, test_ok, val_ok, n_train, n_test, n_val = totals.tolist()
    record = {
        "epoch": epoch,
        "loss": loss / n_train,
        "train_accuracy": train_ok / n_train,
        "test_accuracy": test_ok / n_test,
    }
    if validating:
        record["val_accuracy"] = val_ok / n_val
    record["seconds"] = round(seconds, 4)
    return record


def _restore(
    run_dir: Path, resume: bool, net: gluon.Block, trainer: gluon.Trainer, ctx: mx.Context
) -> list[dict[str, Any]]:
    """Start fresh or from the last checkpoint (read by rank 0, broadcast); the history."""
    checkpoint_dir, metrics_dir = run_dir / "checkpoints", run_dir / "metrics"
    restored = None
    if hvd.rank() == 0:
        checkpoint = read_checkpoint(checkpoint_dir) if resume else None
        if checkpoint is None:
            # A fresh run: checkpoints of an earlier attempt must never be resumed from.
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        else:
            net.load_parameters(str(checkpoint_dir / checkpoint["params"]), ctx=ctx)
            states = (checkpoint_dir / checkpoint["states"]).read_bytes()
            restored = (checkpoint["history"], states)
            print(f"resuming after epoch {checkpoint['epoch']} from {checkpoint_dir}")
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        metrics_dir.mkdir(parents=True, exist_ok=True)
        # train.jsonl always matches the history being continued.
        history = restored[0] if restored else []
        lines = "".join(json.dumps(record) + "\n" for record in history)
        _atomic_write_text(metrics_dir / "train.jsonl", lines)
    # Rank 0's initial (or restored) parameters are everyone's.
    hvd.broadcast_parameters(net.collect_params(), root_rank=0)
    if not resume:
        return []
    restored = hvd.broadcast_object(restored, root_rank=0, name="restored")
    if restored is None:
        return []
    history, states = restored
    _load_trainer_states(trainer, states)
    return history


def run_rank(config: PipelineConfig, data_uri: str, run_dir: Path, resume: bool) -> None:
    """One Horovod process: train, checkpoint each epoch, and (rank 0) write the outputs."""
    hvd.init()
    ctx = select_context(mx.context.num_gpus(), hvd.local_rank())
    # The only global RNG used (weight init); shuffling and the split use their own streams.
    mx.random.seed(config.seed)
    data = load_device_data(data_uri, config, hvd.rank(), hvd.size(), ctx)
    num_train, validating = data.train_x.shape[0], config.validation_fraction > 0

    net = build_net(config.init_sigma, ctx)
    scored = ScoredBatch(net)
    scored.hybridize(static_alloc=True, static_shape=True)
    trainer = hvd.DistributedTrainer(net.collect_params(), "sgd", {"learning_rate": config.lr})
    history = _restore(run_dir, resume, net, trainer, ctx)

    batches = global_batches(num_train, config.batch_size, hvd.size())
    for epoch in range(len(history) + 1, config.epochs + 1):
        started = time.perf_counter()
        order = epoch_permutation(num_train, config.seed, epoch)
        totals = run_epoch(scored, trainer, data, batches, order)
        history.append(epoch_record(epoch, totals, validating, time.perf_counter() - started))
        if hvd.rank() == 0:
            # Checkpoint first: an epoch that is reported is an epoch that can be resumed.
            save_checkpoint(run_dir / "checkpoints", net, trainer, history, trajectory_of(config))
            with open(run_dir / "metrics" / "train.jsonl", "a") as jsonl:
                jsonl.write(json.dumps(history[-1]) + "\n")
            print(format_epoch(history[-1], config.epochs))

    if hvd.rank() == 0:
        _write_outputs(net, run_dir, history, hvd.size(), ctx)
    hvd.shutdown()


def _write_outputs(
    net: gluon.HybridBlock,
    run_dir: Path,
    history: list[dict[str, Any]],
    num_proc: int,
    ctx: mx.Context,
) -> None:
    """The kept model (best epoch) in both formats, and the summary."""
    checkpoint_dir = run_dir / "checkpoints"
    checkpoint = read_checkpoint(checkpoint_dir)
    net.load_parameters(str(checkpoint_dir / checkpoint["best_params"]), ctx=ctx)
    # export() needs one forward pass of the hybridized net (none ran if nothing was left
    # to train after a resume).
    net(nd.zeros((1, NUM_FEATURES), ctx=ctx))
    model_dir = run_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    net.export(str(model_dir / "model"), epoch=0)
    net.save_parameters(str(model_dir / "model.params"))
    summary = train_summary(history, num_proc)
    _atomic_write_text(run_dir / "metrics" / "train.json", json.dumps(summary, indent=2))


def main(argv: list[str] | None = None) -> int:
    """Entry point of one rank (started by horovodrun)."""
    parser = argparse.ArgumentParser(description="One Horovod rank of the train step.")
    parser.add_argument("--config", type=Path, required=True, help="the run's config.json")
    parser.add_argument("--data", required=True, help="dataset cache URI")
    parser.add_argument("--out", type=Path, required=True, help="the run directory")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint")
    args = parser.parse_args(argv)
    try:
        config = PipelineConfig.model_validate_json(args.config.read_text())
        run_rank(config, args.data, args.out, args.resume)
    except (OSError, PipelineError) as exc:  # the user's to fix: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------- launcher


def ranks_per_host(config: PipelineConfig) -> int:
    """The most ranks horovodrun places on one host (hosts are filled in order)."""
    if config.hostfile is not None:
        try:
            hosts = parse_host_files(str(config.hostfile))
        except (IndexError, ValueError) as exc:
            raise ConfigError(
                f"hostfile {config.hostfile}: expected lines 'HOST slots=N' ({exc})"
            ) from exc
    else:
        hosts = config.hosts or f"localhost:{config.num_proc}"
    try:
        slots = get_host_assignments(parse_hosts(hosts), config.num_proc, config.num_proc)
    except ValueError as exc:
        raise ConfigError(f"hosts {hosts!r}: {exc}") from exc
    return max(slot.local_size for slot in slots)


def check_launchable(config: PipelineConfig) -> None:
    """Everything a user can get wrong that pydantic cannot see, before any process starts."""
    if config.hostfile is not None and not config.hostfile.is_file():
        raise ConfigError(f"hostfile {config.hostfile} does not exist")
    ranks_per_host(config)
    if config.resume:
        checkpoint_dir = config.run_dir() / "checkpoints"
        checkpoint = read_checkpoint(checkpoint_dir)
        if checkpoint is None:
            raise ConfigError(
                f"resume: {checkpoint_dir} holds no complete checkpoint; run without resume "
                "to start over"
            )
        if checkpoint["epoch"] > config.epochs:
            raise ConfigError(
                f"resume: the checkpoint in {checkpoint_dir} is after epoch "
                f"{checkpoint['epoch']}, beyond epochs={config.epochs}"
            )
        if checkpoint["trajectory"] != trajectory_of(config):
            raise ConfigError(
                f"resume: the checkpoint in {checkpoint_dir} was trained with "
                f"{checkpoint['trajectory']}, not {trajectory_of(config)}"
            )


def horovodrun_command(config: PipelineConfig, data_uri: str, run_dir: Path) -> list[str]:
    """The horovodrun command line that starts all ranks."""
    executable = Path(sys.executable).with_name("horovodrun")
    horovodrun = str(executable) if executable.exists() else shutil.which("horovodrun")
    if horovodrun is None:
        raise TrainingError("horovodrun not found next to the Python interpreter or on PATH")
    command = [horovodrun, "-np", str(config.num_proc), "--gloo"]
    if config.hostfile is not None:
        command += ["--hostfile", str(config.hostfile)]
    else:
        command += ["-H", config.hosts or f"localhost:{config.num_proc}"]
    command += [sys.executable, "-m", "tasks.train", "--config", str(run_dir / "config.json")]
    command += ["--data", data_uri, "--out", str(run_dir)]
    return command + (["--resume"] if config.resume else [])


def rank_environment(config: PipelineConfig, base: dict[str, str]) -> dict[str, str]:
    """horovodrun's environment (it forwards it to every rank)."""
    threads = threads_per_rank(len(os.sched_getaffinity(0)), ranks_per_host(config))
    return {
        **base,
        # Ranks of one host share its cores instead of each starting one thread per core;
        # fixed thread counts also keep reductions in a fixed order (determinism).
        "OMP_NUM_THREADS": str(threads),
        "MXNET_CPU_WORKER_NTHREADS": str(threads),
        # Deterministic operator implementations: same seed and N => bit-identical parameters.
        "MXNET_ENFORCE_DETERMINISM": "1",
        "PYTHONUNBUFFERED": "1",
    }


def _step_logger() -> logging.Logger | logging.LoggerAdapter:
    # Prefect is imported here, not at the top: the ranks import this module too and
    # should not pay for it.
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return log


def _stop_process_tree(process: subprocess.Popen) -> None:
    # Horovod's per-rank middleman calls setsid(), so the ranks are outside horovodrun's
    # process group: collect the whole tree before killing the group.
    tree: list[psutil.Process] = []
    with suppress(psutil.NoSuchProcess):
        tree = psutil.Process(process.pid).children(recursive=True)
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    for child in tree:
        with suppress(psutil.NoSuchProcess):
            child.kill()
    process.wait()
    psutil.wait_procs(tree, timeout=10)


def run_horovod(command: list[str], env: dict[str, str]) -> None:
    """Run horovodrun, stream rank 0's lines to the step log, raise TrainingError on failure."""
    logger = _step_logger()
    stderr_tails: dict[int, deque[str]] = defaultdict(lambda: deque(maxlen=STDERR_TAIL_LINES))
    launcher_lines: deque[str] = deque(maxlen=200)
    process = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # every rank line carries its own <stdout>/<stderr> tag
        text=True,
        errors="replace",
        start_new_session=True,
    )
    try:
        for raw in process.stdout:
            rank, stream, text = parse_output_line(raw.rstrip("\r\n"))
            if rank is None:
                launcher_lines.append(text)
                logger.debug("horovodrun: %s", text)
                continue
            if stream == "stderr":
                stderr_tails[rank].append(text)
            if rank == 0:
                logger.log(logging.INFO if stream == "stdout" else logging.WARNING, text)
        returncode = process.wait()
    finally:
        if process.poll() is None:
            _stop_process_tree(process)
    if returncode != 0:
        raise TrainingError(failure_message(returncode, stderr_tails, launcher_lines))


def train(config: PipelineConfig, data_uri: str) -> str:
    """Train with `config.num_proc` Horovod ranks; return the run directory's file:// URI."""
    check_launchable(config)
    run_dir = config.run_dir().resolve()
    command = horovodrun_command(config, data_uri, run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # The one typed config travels to the ranks as this file.
    (run_dir / "config.json").write_text(config.model_dump_json(indent=2))
    run_horovod(command, rank_environment(config, dict(os.environ)))
    return run_dir.as_uri()


if __name__ == "__main__":
    sys.exit(main())
