"""Train step: the seed's softmax regression, data-parallel with Horovod.

Pure core (tested directly, no Horovod needed): `shard_bounds`, `global_batches`,
`epoch_permutation`, `split_validation`, `select_context`, `threads_per_rank`, `build_net`,
`epoch_record`, `best_epoch`, `train_summary`, `parse_output_line`, `failure_message`.
Rank side (`python -m tasks.train --config RUN_DIR/config.json --data URI --out RUN_DIR`):
`load_device_data`, `ScoredBatch` (the per-batch graph), `run_epoch`, `run_rank` (restore,
train, checkpoint every epoch, write the outputs).
Launcher: `train(config, data_uri)` validates, writes config.json, starts the ranks, streams
rank 0's output into the Prefect run log and turns a failed rank into `TrainingError`. The
ranks are started by `horovodrun --gloo` (which reaches other hosts over ssh), or, when
`config.worker_index` is set, by every host itself (a Kubernetes Indexed Job: no ssh): host 0
serves Horovod's Gloo rendezvous on `config.rendezvous_port`, each host starts its own slots of
the same host plan with the variables horovodrun would give them, and only host 0, which holds
rank 0 and the model, goes on to evaluate and publish (`is_coordinator`).

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
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext, suppress
from functools import partial
from pathlib import Path
from typing import IO, Any, NamedTuple

import horovod.mxnet as hvd
import mxnet as mx
import numpy as np
import psutil
from horovod.runner.common.util.hosts import (
    SlotInfo,
    get_host_assignments,
    parse_host_files,
    parse_hosts,
)
from horovod.runner.gloo_run import create_run_env_vars, create_slot_env_vars
from horovod.runner.http.http_server import RendezvousHandler, RendezvousHTTPServer
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
# How long a host of a rendezvous job (worker_index set) waits for the others: for host 0's
# rendezvous to answer, and (as Gloo's timeout) for every rank to join. Pods of one Job start
# minutes apart at worst (image pulls, the dataset step); a host that never comes fails the job.
RENDEZVOUS_TIMEOUT_S = 120.0
RENDEZVOUS_RETRY_S = 1.0

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
    """Entry point of one rank (started by horovodrun or by `run_host_ranks`)."""
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


def is_coordinator(config: PipelineConfig) -> bool:
    """Whether this host holds rank 0 and so the model, and goes on to evaluate and publish:
    always with horovodrun (it launches every host's ranks from here), else host 0."""
    return config.worker_index in (None, 0)


def host_plan(config: PipelineConfig) -> list[SlotInfo]:
    """Every rank's slot (host, rank, local and cross rank) as horovodrun assigns them, hosts
    filled in order; a function of the config alone, so every host computes the same plan."""
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
        return get_host_assignments(parse_hosts(hosts), config.num_proc, config.num_proc)
    except ValueError as exc:
        raise ConfigError(f"hosts {hosts!r}: {exc}") from exc


def ranks_per_host(config: PipelineConfig) -> int:
    """The most ranks placed on one host."""
    return max(slot.local_size for slot in host_plan(config))


def _check_rendezvous_job(config: PipelineConfig) -> None:
    if config.hostfile is not None:
        raise ConfigError(
            f"hostfile {config.hostfile} cannot be used with worker_index: list the job's "
            "hosts in hosts, in index order"
        )
    hosts = parse_hosts(config.hosts)
    names = [host.hostname for host in hosts]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ConfigError(
            f"hosts {config.hosts!r} lists {', '.join(repeated)} more than once: with "
            "worker_index each entry is one host of the job"
        )
    slots = sum(host.slots for host in hosts)
    if slots != config.num_proc:
        raise ConfigError(
            f"num_proc={config.num_proc} but hosts {config.hosts!r} offer {slots} slots: with "
            "worker_index every slot of every host runs one rank, so they must be equal"
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
    ranks_per_host(config)
    # Rank 0 reads the checkpoint; the other hosts of a rendezvous job have none.
    if config.resume and is_coordinator(config):
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


def rank_command(config: PipelineConfig, data_uri: str, run_dir: Path) -> list[str]:
    """The command line of one rank, the same on every host."""
    command = [sys.executable, "-m", "tasks.train", "--config", str(run_dir / "config.json")]
    command += ["--data", data_uri, "--out", str(run_dir)]
    return command + (["--resume"] if config.resume else [])


def horovodrun_command(config: PipelineConfig, data_uri: str, run_dir: Path) -> list[str]:
    """The horovodrun command line that starts all ranks."""
    executable = Path(sys.executable).with_name("horovodrun")
    horovodrun = str(executable) if executable.exists() else shutil.which("horovodrun")
    if horovodrun is None:
        raise TrainingError("horovodrun not found next to the Python interpreter or on PATH")
    # --disable-cache: horovodrun otherwise keeps its check results in ~/.horovod, which a
    # container with a read-only root filesystem (the Kubernetes manifests) cannot create.
    command = [horovodrun, "-np", str(config.num_proc), "--gloo", "--disable-cache"]
    if config.hostfile is not None:
        command += ["--hostfile", str(config.hostfile)]
    else:
        command += ["-H", config.hosts or f"localhost:{config.num_proc}"]
    return command + rank_command(config, data_uri, run_dir)


def rank_environment(config: PipelineConfig, base: dict[str, str]) -> dict[str, str]:
    """The ranks' environment (horovodrun forwards it to every rank)."""
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


class Launch(NamedTuple):
    """A process the launcher starts: horovodrun (`rank` None; it tags each line of its ranks
    with the rank and stream) or one rank (its own stdout and stderr)."""

    command: list[str]
    env: dict[str, str]
    rank: int | None = None


def _tag(rank: int, stream: str, text: str) -> tuple[int, str, str]:
    return rank, stream, text


def _forward_lines(
    stream: IO[str],
    parse: Callable[[str], tuple[int | None, str | None, str]],
    source: int,
    lines: queue.SimpleQueue,
) -> None:
    # One thread per pipe: a rank writing to a pipe nobody reads would stall.
    for raw in stream:
        lines.put((source, parse(raw.rstrip("\r\n"))))
    lines.put((source, None))  # this pipe is closed


def _exit_status(returncode: int) -> int:
    # As a shell (and horovodrun) reports it: killed by signal N is 128+N.
    return 128 - returncode if returncode < 0 else returncode


def _stop_running(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            _stop_process_tree(process)


def run_ranks(launches: list[Launch]) -> None:
    """Start `launches`, stream rank 0's lines to the step log, raise TrainingError naming the
    first rank that failed; every process is stopped at the end, also on error or interrupt."""
    logger = _step_logger()
    stderr_tails: dict[int, deque[str]] = defaultdict(lambda: deque(maxlen=STDERR_TAIL_LINES))
    launcher_lines: deque[str] = deque(maxlen=200)
    lines: queue.SimpleQueue = queue.SimpleQueue()
    processes: list[subprocess.Popen] = []
    open_pipes: list[int] = []
    exit_codes: list[int] = []
    try:
        for source, launch in enumerate(launches):
            process = subprocess.Popen(
                launch.command,
                env=launch.env,
                stdout=subprocess.PIPE,
                # horovodrun tags every rank line with its own <stdout>/<stderr>.
                stderr=subprocess.STDOUT if launch.rank is None else subprocess.PIPE,
                text=True,
                errors="replace",
                start_new_session=True,
            )
            processes.append(process)
            if launch.rank is None:
                pipes = [(process.stdout, parse_output_line)]
            else:
                pipes = [
                    (process.stdout, partial(_tag, launch.rank, "stdout")),
                    (process.stderr, partial(_tag, launch.rank, "stderr")),
                ]
            open_pipes.append(len(pipes))
            for pipe, parse in pipes:
                reader = threading.Thread(
                    target=_forward_lines, args=(pipe, parse, source, lines), daemon=True
                )
                reader.start()
        while any(open_pipes):
            source, line = lines.get()
            if line is None:
                open_pipes[source] -= 1
                if open_pipes[source] == 0:
                    code = _exit_status(processes[source].wait())
                    exit_codes.append(code)
                    rank = launches[source].rank
                    if code != 0 and rank is not None:
                        # What horovodrun reports and does when one of its ranks fails.
                        launcher_lines.append(f"Process {rank} exit with status code {code}.")
                        _stop_running(processes)
                continue
            rank, stream, text = line
            if rank is None:
                launcher_lines.append(text)
                logger.debug("horovodrun: %s", text)
                continue
            if stream == "stderr":
                stderr_tails[rank].append(text)
            if rank == 0:
                logger.log(logging.INFO if stream == "stdout" else logging.WARNING, text)
    finally:
        _stop_running(processes)
    failed = [code for code in exit_codes if code != 0]
    if failed:
        raise TrainingError(failure_message(failed[0], stderr_tails, launcher_lines))


@contextmanager
def rendezvous_server(port: int, plan: list[SlotInfo]) -> Iterator[None]:
    """Horovod's Gloo rendezvous for `plan` (the server horovodrun runs), on `port` of every
    interface, since the other hosts reach it under host 0's name; stopped on exit."""
    try:
        # RendezvousServer.start() would take a random port; the other hosts need a known one.
        server = RendezvousHTTPServer(("", port), RendezvousHandler, 0)
    except OSError as exc:
        raise TrainingError(
            f"cannot serve the Gloo rendezvous on port {port}: {exc.strerror}"
        ) from exc
    server.init(plan)
    thread = threading.Thread(target=server.serve_forever, name="gloo-rendezvous", daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def wait_for_rendezvous(host: str, port: int, timeout_s: float) -> str:
    """The IPv4 address of `host` once its rendezvous port accepts connections; retried for
    `timeout_s` seconds, since the hosts of a job start in any order."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            address = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
            with socket.create_connection((address, port), timeout=RENDEZVOUS_RETRY_S):
                return address
        except OSError as exc:  # not resolvable yet, or nothing listening yet
            error = exc
        left = deadline - time.monotonic()
        if left <= 0:
            raise TrainingError(
                f"no Gloo rendezvous at {host}:{port} after {timeout_s:g} s ({error}); "
                "host 0 (worker_index=0) of the job serves it"
            )
        time.sleep(min(RENDEZVOUS_RETRY_S, left))


def route_interface(address: str) -> str:
    """The network interface this host reaches `address` through (what Gloo must use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        # Connecting a UDP socket sends nothing: the kernel only picks route and source address.
        probe.connect((address, 9))
        source = probe.getsockname()[0]
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == source for a in addresses):
            return name
    raise TrainingError(
        f"no network interface holds {source}, this host's address towards {address}; "
        "set HOROVOD_GLOO_IFACE to the interface the hosts reach each other through"
    )


def run_host_ranks(config: PipelineConfig, command: list[str], env: dict[str, str]) -> None:
    """This host's part of a rendezvous job (worker_index set): host 0 serves the rendezvous;
    every host waits until it answers, then runs its own slots of the plan with the variables
    horovodrun would give them."""
    logger = _step_logger()
    plan = host_plan(config)
    hosts = parse_hosts(config.hosts)
    rendezvous_host, this_host = hosts[0].hostname, hosts[config.worker_index].hostname
    port = config.rendezvous_port
    serving = rendezvous_server(port, plan) if config.worker_index == 0 else nullcontext()
    with serving:
        logger.info(
            "host %d: joining the Gloo rendezvous at %s:%d",
            config.worker_index,
            rendezvous_host,
            port,
        )
        address = wait_for_rendezvous(rendezvous_host, port, RENDEZVOUS_TIMEOUT_S)
        # Set by the user, HOROVOD_GLOO_IFACE wins (e.g. where a host's own name resolves to
        # a loopback address, as Debian's /etc/hosts does).
        iface = env.get("HOROVOD_GLOO_IFACE") or route_interface(address)
        job_env = {
            # The ranks wait as long for each other as the hosts wait for the rendezvous.
            "HOROVOD_GLOO_TIMEOUT_SECONDS": str(round(RENDEZVOUS_TIMEOUT_S)),
            **env,
            # The address the wait reached, as horovodrun passes its own: resolved once.
            **create_run_env_vars(address, [iface], str(port)),
        }
        slots = [slot for slot in plan if slot.hostname == this_host]
        logger.info(
            "host %d: ranks %s over %s", config.worker_index, [slot.rank for slot in slots], iface
        )
        run_ranks(
            [
                Launch(command, {**job_env, **create_slot_env_vars(slot)}, slot.rank)
                for slot in slots
            ]
        )


def train(config: PipelineConfig, data_uri: str) -> str:
    """Train with `config.num_proc` Horovod ranks; return the run directory's file:// URI.

    With `config.worker_index` set only this host's ranks run here; the model is written on
    host 0 (`is_coordinator`), the other hosts' run directories hold just config.json."""
    check_launchable(config)
    run_dir = config.run_dir().resolve()
    env = rank_environment(config, dict(os.environ))
    if config.worker_index is None:
        start = partial(run_ranks, [Launch(horovodrun_command(config, data_uri, run_dir), env)])
    else:
        start = partial(run_host_ranks, config, rank_command(config, data_uri, run_dir), env)
    run_dir.mkdir(parents=True, exist_ok=True)
    # The one typed config travels to the ranks as this file.
    (run_dir / "config.json").write_text(config.model_dump_json(indent=2))
    start()
    return run_dir.as_uri()


if __name__ == "__main__":
    sys.exit(main())
