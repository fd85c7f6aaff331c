"""One Horovod rank of the train step: `python -m tasks.train.rank --config RANK_CONFIG`.

Read top to bottom like Horovod's `examples/mxnet` scripts; every line that makes the training
distributed is marked `# [hvd]`. The launcher (`tasks.train.launcher`) starts one such process
per rank with Horovod's Gloo variables set. The config file is the one typed config (the run
directory and the dataset cache are its `run_dir()` and `data_uri()`); the rank answers on its
stdout, with typed messages only (`tasks.train.messages`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import horovod.mxnet as hvd
import mxnet as mx
import numpy as np
from mxnet import autograd, gluon, nd

from pipeline.base import layout
from pipeline.base.config import ConfigError, PipelineConfig
from pipeline.base.errors import PipelineError
from pipeline.base.files import atomic_save, atomic_write
from tasks.dataset import load_dataset
from tasks.train.checkpoints import (
    Checkpoint,
    checkpoint_dir,
    checkpoint_names,
    file_sha256,
    read_checkpoint,
    trajectory_of,
    verify_files,
    write_pointer,
)
from tasks.train.history import best_epoch, epoch_record, train_summary
from tasks.train.messages import LAUNCHER_PID, EpochDone, Note, RankChannel, RankFailed
from tasks.train.model import (
    NUM_FEATURES,
    ScoredBatch,
    build_net,
    count_correct,
    optimizer_state,
    restore_optimizer,
    select_context,
)
from tasks.train.sharding import epoch_permutation, global_batches, shard_bounds, split_validation

ORPHAN_CHECK_S = 1.0


class DeviceData(NamedTuple):
    """One rank's data on its device: the whole (uint8) training set, its evaluation shards."""

    train_x: nd.NDArray
    train_y: nd.NDArray
    test_x: nd.NDArray
    test_y: nd.NDArray
    val_x: nd.NDArray
    val_y: nd.NDArray


def _shard(array: np.ndarray, rank: int, size: int, ctx: mx.Context) -> nd.NDArray:
    lo, hi = shard_bounds(len(array), size, rank)
    return nd.array(array[lo:hi], ctx=ctx, dtype=array.dtype)


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
) -> list[float]:
    """Train one epoch over the global `batches` of `order`; return the summed (over ranks)
    loss, train/test/validation correct counts and the three sample counts."""
    rank, size, ctx = hvd.rank(), hvd.size(), data.train_x.context  # [hvd]
    device_order = nd.array(order, ctx=ctx, dtype="int32")
    loss_sum, train_correct = nd.zeros((1,), ctx=ctx), nd.zeros((1,), ctx=ctx)
    trained = 0
    for start, stop in batches:
        lo, hi = shard_bounds(stop - start, size, rank)  # [hvd] this rank's part of the batch
        index = device_order[start + lo : start + hi]  # a view: no copy, no operator
        with autograd.record():
            batch_loss, batch_correct = scored(data.train_x, data.train_y, index)
        batch_loss.backward()
        # [hvd] DistributedTrainer allreduces (sums, then divides by N) the gradients, so this
        # step is the mean over the whole global batch (see tasks.train.sharding).
        trainer.step((stop - start) / size)
        # Accumulated on the device: no host sync until the end of the epoch.
        loss_sum += batch_loss
        train_correct += batch_correct
        trained += hi - lo
    local = nd.concat(
        loss_sum,
        train_correct,
        count_correct(scored, data.test_x, data.test_y),
        count_correct(scored, data.val_x, data.val_y),
        nd.array([trained, data.test_x.shape[0], data.val_x.shape[0]], ctx=ctx),
        dim=0,
    )
    # [hvd] Sums of sums and of counts (not averages of averages), read once an epoch.
    return hvd.allreduce(local, op=hvd.Sum, name="epoch_metrics").asnumpy().tolist()


def save_checkpoint(
    run_dir: Path, net: gluon.Block, trainer: gluon.Trainer, history: list, config: PipelineConfig
) -> None:
    """The epoch just finished: weights, optimizer state, then the pointer (last)."""
    epoch, best = history[-1]["epoch"], best_epoch(history)
    directory = checkpoint_dir(run_dir)
    arrays, optimizer_layout, counters = optimizer_state(trainer)
    names = checkpoint_names(epoch, best)
    atomic_save(directory / names["params"], net.save_parameters)
    atomic_save(directory / names["optimizer"], lambda path: nd.save(path, arrays))
    checkpoint = Checkpoint(
        epoch=epoch,
        **names,
        optimizer_layout=optimizer_layout,
        optimizer_counters=counters,
        best_epoch=best,
        digests={name: file_sha256(directory / name) for name in names.values()},
        history=history,
        trajectory=trajectory_of(config),
    )
    write_pointer(run_dir, checkpoint)


def first_line(exc: BaseException) -> str:
    """MXNet's messages carry a C++ stack trace after the first line."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _read_restore_point(run_dir: Path, resume: bool | str) -> tuple[Checkpoint, dict] | None:
    """Rank 0: the checkpoint to continue from and its optimizer arrays, or None (fresh)."""
    checkpoint = read_checkpoint(run_dir) if resume else None
    if checkpoint is None:
        # A fresh run: checkpoints of an earlier attempt must never be resumed from.
        shutil.rmtree(checkpoint_dir(run_dir), ignore_errors=True)
        return None
    # Checked again here, right before MXNet reads them: the launcher's check is not the last
    # word when another process can write the work directory.
    verify_files(run_dir, checkpoint)
    try:
        arrays = nd.load(str(checkpoint_dir(run_dir) / checkpoint.optimizer))
    except mx.base.MXNetError as exc:
        problem = first_line(exc)
        raise ConfigError(f"resume: {checkpoint.optimizer} cannot be read: {problem}") from None
    arrays = arrays if isinstance(arrays, dict) else {}  # an empty file loads as []
    return checkpoint, {name: array.asnumpy() for name, array in arrays.items()}


def restore(
    run_dir: Path, resume: bool | str, net: gluon.Block, trainer: gluon.Trainer, ctx: mx.Context
) -> list[dict[str, Any]]:
    """Start fresh or from the last checkpoint (read by rank 0, broadcast); the history.
    Every rank gets the same `resume` (True or "auto": rank 0 tells whether there is a point
    to continue from), so all of them take part in the same broadcasts."""
    point = None
    if hvd.rank() == 0:  # [hvd] one rank reads, every rank receives
        point = _read_restore_point(run_dir, resume)
        if point is not None:
            params = checkpoint_dir(run_dir) / point[0].params
            try:
                net.load_parameters(str(params), ctx=ctx)
            except (mx.base.MXNetError, AssertionError) as exc:  # wrong names or shapes
                raise ConfigError(f"resume: {params} cannot be read: {first_line(exc)}") from None
        checkpoint_dir(run_dir).mkdir(parents=True, exist_ok=True)
        (run_dir / layout.METRICS_DIR).mkdir(parents=True, exist_ok=True)
        # train.jsonl always matches the history being continued.
        history = point[0].history if point else []
        atomic_write(run_dir / layout.TRAIN_HISTORY, "".join(json.dumps(r) + "\n" for r in history))
    hvd.broadcast_parameters(net.collect_params(), root_rank=0)  # [hvd] rank 0's weights
    if not resume:
        return []
    # [hvd] JSON-able values and numpy arrays only: broadcast_object pickles, but what it
    # carries here was validated and built by rank 0 itself, never read from disk as pickle.
    shared = None if point is None else (point[0].model_dump(mode="json"), point[1])
    shared = hvd.broadcast_object(shared, root_rank=0, name="restored")
    if shared is None:
        return []
    checkpoint, arrays = Checkpoint.model_validate(shared[0]), shared[1]
    arrays = {name: nd.array(value, ctx=ctx, dtype=value.dtype) for name, value in arrays.items()}
    restore_optimizer(trainer, arrays, checkpoint.optimizer_layout, checkpoint.optimizer_counters)
    return checkpoint.history


def run_rank(config: PipelineConfig, channel: RankChannel) -> None:
    """One Horovod process: train, checkpoint each epoch, and (rank 0) write the outputs."""
    run_dir = config.run_dir()
    hvd.init()  # [hvd] join the job: Gloo rendezvous with the other ranks
    ctx = select_context(mx.context.num_gpus(), hvd.local_rank())  # [hvd] one GPU per rank
    # The only global RNG used (weight init); shuffling and the split use their own streams.
    mx.random.seed(config.seed)
    data = load_device_data(config.data_uri(), config, hvd.rank(), hvd.size(), ctx)  # [hvd]
    num_train, validating = data.train_x.shape[0], config.validation_fraction > 0

    net = build_net(config.init_sigma, ctx)
    scored = ScoredBatch(net)
    scored.hybridize(static_alloc=True, static_shape=True)
    # [hvd] the trainer that allreduces gradients before each update; num_groups=1: all of
    # them in one grouped allreduce (one fused Gloo exchange a step, not one per parameter).
    trainer = hvd.DistributedTrainer(
        net.collect_params(), "sgd", {"learning_rate": config.lr}, num_groups=1
    )
    history = restore(run_dir, config.resume, net, trainer, ctx)
    if history and hvd.rank() == 0:
        resumed = f"resuming after epoch {history[-1]['epoch']} from {checkpoint_dir(run_dir)}"
        channel.send(Note(text=resumed))

    batches = global_batches(num_train, config.batch_size, hvd.size())
    for epoch in range(len(history) + 1, config.epochs + 1):
        started = time.perf_counter()
        order = epoch_permutation(num_train, config.seed, epoch)  # the same on every rank
        totals = run_epoch(scored, trainer, data, batches, order)
        history.append(epoch_record(epoch, totals, validating, time.perf_counter() - started))
        if hvd.rank() == 0:  # [hvd] one writer
            # Checkpoint first: an epoch that is reported is an epoch that can be resumed.
            save_checkpoint(run_dir, net, trainer, history, config)
            with open(run_dir / layout.TRAIN_HISTORY, "a") as jsonl:
                jsonl.write(json.dumps(history[-1]) + "\n")
            channel.send(EpochDone(epoch=epoch, epochs=config.epochs, record=history[-1]))

    if hvd.rank() == 0:
        write_outputs(net, run_dir, history, hvd.size(), ctx)
    hvd.shutdown()  # [hvd]


def write_outputs(
    net: gluon.HybridBlock, run_dir: Path, history: list, num_proc: int, ctx: mx.Context
) -> None:
    """The kept model (best epoch) in both formats, and the summary."""
    checkpoint = read_checkpoint(run_dir)
    net.load_parameters(str(checkpoint_dir(run_dir) / checkpoint.best_params), ctx=ctx)
    # export() needs one forward pass of the hybridized net (none ran if nothing was left
    # to train after a resume).
    net(nd.zeros((1, NUM_FEATURES), ctx=ctx))
    (run_dir / layout.MODEL_DIR).mkdir(parents=True, exist_ok=True)
    net.export(str(run_dir / layout.MODEL_PREFIX), epoch=0)
    net.save_parameters(str(run_dir / layout.MODEL_STATE))
    summary = train_summary(history, num_proc)
    atomic_write(run_dir / layout.TRAIN_SUMMARY, json.dumps(summary, indent=2))


def exit_with_parent() -> None:
    """End this rank when the launcher that started it is gone (even SIGKILLed): an orphan
    would go on training into the run directory and race a later --resume. The launcher is
    the parent, or the process LAUNCHER_PID names where mpirun sits between them."""
    parent = os.getppid()
    launcher = int(os.environ.get(LAUNCHER_PID, parent))

    def watch() -> None:
        while os.getppid() == parent and _running(launcher):
            time.sleep(ORPHAN_CHECK_S)
        os._exit(143)

    threading.Thread(target=watch, name="orphan-watch", daemon=True).start()


def _running(pid: int) -> bool:
    """Whether process `pid` is alive (an exited one not yet reaped is not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return not stat.read().rsplit(") ", 1)[-1].startswith(("Z", "X"))
    except FileNotFoundError:
        return False


def main(argv: list[str] | None = None) -> int:
    """Entry point of one rank (started by the launcher, or by horovodrun across ssh hosts)."""
    parser = argparse.ArgumentParser(description="One Horovod rank of the train step.")
    parser.add_argument(
        "--config", type=Path, required=True, help="this attempt's config (RANK_CONFIG)"
    )
    args = parser.parse_args(argv)
    channel = RankChannel()
    exit_with_parent()
    try:
        config = PipelineConfig.model_validate_json(args.config.read_text())
        run_rank(config, channel)
    except (OSError, PipelineError) as exc:  # the user's to fix: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        channel.send(RankFailed(message=str(exc)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
