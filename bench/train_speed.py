"""Benchmark of the train step against the seed's d2l loop and a numpy compute floor.

Rows, all training the seed model (Dense(10), Normal(0.01), SGD lr 0.1, batch 256) on the real
Fashion-MNIST and measuring test accuracy after every epoch, as the seed does:
  d2l loop     the seed's `train_ch3`: per-sample ToTensor transform, gluon DataLoader
               (d2l's 4 workers), un-hybridized net, `float(...)` metrics every batch
  trainer np=N this project's train step, `train(config)` with real horovodrun
  numpy floor  the same forward/backward/update in plain numpy, one process: what the
               arithmetic costs with no framework at all
Columns: s/epoch (median of the epochs), speed-up over the d2l loop, test accuracy after the
last epoch, peak RSS of one rank (VmHWM; the d2l row counts its main process, not its workers).
Targets: trainer >= 25x faster than the d2l loop, within 3x the numpy floor, <= 600 MB per rank,
and np=2 <= 2x the np=1 epoch time.

A second table puts Horovod's cost per step next to the limit: a raw two-process socket exchange
of the gradients' 31,400 bytes, one bare `hvd.allreduce` of them at np=2 (bench.exchange), and
the overhead per step inside training, (np=2 epoch - np=1 epoch / 2) / steps: what np=2 costs
beyond half the work of np=1. All rows of one run share the machine's load at that time.

The np=1 and np=2 rows run interleaved, `--repeats` pairs (np=1, np=2, np=1, np=2, ...), so
that a drift of the machine hits both; every row records the load average and the other
processes' CPU while it ran (bench.quiet), the pair table shows them, and rows timed on a busy
machine are marked and warned about. Only quiet figures belong in the README.

Every row runs in its own process, so the peak RSS is its own. It is CPU-heavy: run it alone.
Run: .venv/bin/python -m bench.train_speed [--epochs 3] [--repeats 3] [--d2l-workers 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

from bench.exchange import hvd_allreduce_mpi_us, hvd_allreduce_us, raw_exchange_us
from bench.quiet import Load, LoadWatch, load_before, warn_if_loaded
from bench.table import print_ratio_table
from pipeline.base import layout
from pipeline.base.config import PipelineConfig
from pipeline.base.uris import local_path
from tasks.dataset import DEBIAN_DATA_DIR, FashionMNIST, load_dataset, prepare_dataset
from tasks.train import mpirun
from tasks.train.sharding import epoch_permutation, global_batches
from tasks.train.step import train

BATCH_SIZE = 256
LR = 0.1
SIGMA = 0.01
TARGET_SPEEDUP = 25.0
TARGET_FLOOR_RATIO = 3.0
TARGET_RSS_MB = 600.0
TARGET_NP2_RATIO = 2.0
EXCHANGE_CALLS = 1000
GLOO = "2 gloo"  # the key of the np=2 rows over Gloo where MPI is used (for comparison)
MB = 2**20


def own_peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB  # Linux: KiB


def d2l_loop(data: FashionMNIST, epochs: int, workers: int) -> tuple[list[float], float]:
    """The seed's training loop, as d2l teaches it (softmax regression, concise version)."""
    from mxnet import autograd, gluon, init, nd
    from mxnet.gluon import nn
    from mxnet.gluon.data.vision import transforms

    def loader(images: np.ndarray, labels: np.ndarray, shuffle: bool) -> gluon.data.DataLoader:
        dataset = gluon.data.ArrayDataset(nd.array(images[..., None], dtype="uint8"), labels)
        return gluon.data.DataLoader(
            dataset.transform_first(transforms.ToTensor()),
            BATCH_SIZE,
            shuffle=shuffle,
            num_workers=workers,
        )

    def accuracy(y_hat: nd.NDArray, y: nd.NDArray) -> float:
        return float((y_hat.argmax(axis=1).astype(y.dtype) == y).sum().asscalar())

    train_iter = loader(data.train_images, data.train_labels.astype(np.float32), True)
    test_iter = loader(data.test_images, data.test_labels.astype(np.float32), False)
    net = nn.Sequential()
    net.add(nn.Dense(10))
    net.initialize(init.Normal(sigma=SIGMA))
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": LR})
    seconds, test_acc = [], 0.0
    for _ in range(epochs):
        start = time.perf_counter()
        metric = np.zeros(3)  # loss sum, correct, count
        for x, y in train_iter:
            with autograd.record():
                y_hat = net(x)
                batch_loss = loss(y_hat, y)
            batch_loss.backward()
            trainer.step(x.shape[0])
            metric += (float(batch_loss.sum().asscalar()), accuracy(y_hat, y), y.size)
        correct = sum(accuracy(net(x), y) for x, y in test_iter)
        test_acc = correct / len(data.test_labels)
        seconds.append(time.perf_counter() - start)
    return seconds, test_acc


def numpy_floor(data: FashionMNIST, epochs: int) -> tuple[list[float], float]:
    """Forward, softmax cross-entropy, backward and SGD update of the same model in numpy."""
    images = data.train_images.reshape(len(data.train_images), -1)
    labels = data.train_labels.astype(np.int64)
    test_x = data.test_images.reshape(len(data.test_images), -1)
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((images.shape[1], 10)) * SIGMA).astype(np.float32)
    bias = np.zeros(10, np.float32)
    seconds, test_acc = [], 0.0
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        order = epoch_permutation(len(images), 0, epoch)
        loss_sum, correct = 0.0, 0
        for begin in range(0, len(images), BATCH_SIZE):
            batch = order[begin : begin + BATCH_SIZE]
            x, y = images[batch].astype(np.float32) / 255, labels[batch]
            rows = np.arange(len(y))
            scores = x @ weight + bias
            scores -= scores.max(axis=1, keepdims=True)
            exp = np.exp(scores)
            prob = exp / exp.sum(axis=1, keepdims=True)
            loss_sum += float(-np.log(prob[rows, y]).sum())
            correct += int((scores.argmax(axis=1) == y).sum())
            prob[rows, y] -= 1  # d(loss)/d(scores), summed over the batch ...
            prob /= len(y)  # ... and averaged
            weight -= LR * (x.T @ prob)
            bias -= LR * prob.sum(axis=0)
        predicted = (test_x.astype(np.float32) / 255 @ weight + bias).argmax(axis=1)
        test_acc = float((predicted == data.test_labels).mean())
        seconds.append(time.perf_counter() - start)
    return seconds, test_acc


def run_in_child(variant: str, data_uri: str, args: argparse.Namespace) -> dict:
    """One in-process row, in a fresh process so that its peak RSS is its own."""
    command = [sys.executable, "-m", "bench.train_speed", "--variant", variant, "--data", data_uri]
    command += ["--epochs", str(args.epochs), "--d2l-workers", str(args.d2l_workers)]
    repo_root = Path(__file__).resolve().parents[1]
    finished = subprocess.run(command, check=True, capture_output=True, cwd=repo_root)
    return json.loads(finished.stdout)


def child_main(args: argparse.Namespace) -> None:
    data = load_dataset(args.data)
    if args.variant == "d2l":
        seconds, test_acc = d2l_loop(data, args.epochs, args.d2l_workers)
    else:
        seconds, test_acc = numpy_floor(data, args.epochs)
    print(json.dumps({"seconds": seconds, "test_accuracy": test_acc, "rss": own_peak_rss_mb()}))


class RankPeakRss(threading.Thread):
    """Polls the VmHWM (peak RSS, kept by the kernel) of the ranks of one run directory."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(daemon=True)
        # A rank's command line names its run only through its config file.
        self.config_file = str(run_dir / layout.RANK_CONFIG)
        self.peaks, self.done = {}, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            for process in psutil.process_iter(["cmdline"]):
                cmdline = process.info["cmdline"] or []
                if cmdline[1:3] == ["-m", "tasks.train.rank"] and self.config_file in cmdline:
                    try:
                        status = Path(f"/proc/{process.pid}/status").read_text()
                    except OSError:
                        continue  # it just ended; its last reading stands
                    hwm_kib = int(status.split("VmHWM:")[1].split()[0])
                    self.peaks[process.pid] = max(self.peaks.get(process.pid, 0), hwm_kib)


def trainer_row(
    num_proc: int, data_uri: str, work_dir: Path, epochs: int, gloo: bool = False
) -> dict:
    """The train step at `num_proc` ranks; `gloo`: this host's ranks over Gloo even where MPI
    is available (the launch the pipeline used before MPI, for comparison)."""
    config = PipelineConfig(
        num_proc=num_proc,
        epochs=epochs,
        work_dir=work_dir,
        data_dir=local_path(data_uri),
        run_id=f"np{num_proc}" + ("-gloo" if gloo else ""),
    )
    run_dir = config.run_dir().resolve()
    poller = RankPeakRss(run_dir)
    poller.start()
    mpi_available = mpirun.available
    try:
        if gloo:
            mpirun.available = lambda: False
        train(config)
    finally:
        mpirun.available = mpi_available
        poller.done.set()
        poller.join()
    records = [
        json.loads(line) for line in (run_dir / "metrics/train.jsonl").read_text().splitlines()
    ]
    return {
        "seconds": [record["seconds"] for record in records],
        "test_accuracy": records[-1]["test_accuracy"],
        "rss": max(poller.peaks.values()) / 1024,
    }


def interleaved_trainer_pairs(data_uri: str, work: Path, epochs: int, repeats: int) -> list:
    """np=1, np=2 and (where MPI is used) np=2 over Gloo, `repeats` times (ABCABC...: a drift
    of the machine hits all), each row timed inside a LoadWatch."""
    variants = {1: (1, False), 2: (2, False)}
    if mpirun.available():
        variants[GLOO] = (2, True)
    pairs = []
    for repeat in range(repeats):
        pair = {}
        for key, (num_proc, gloo) in variants.items():
            with LoadWatch() as load:
                row = trainer_row(num_proc, data_uri, work / f"repeat-{repeat}", epochs, gloo)
            pair[key] = {**row, "load": load}
        pairs.append(pair)
    return pairs


def merged_trainer_row(pairs: list, num_proc: int) -> dict:
    """One row of the main table from the repeats: the median epoch of each repeat."""
    rows = [pair[num_proc] for pair in pairs]
    return {
        "seconds": [statistics.median(row["seconds"]) for row in rows],
        "test_accuracy": rows[-1]["test_accuracy"],
        "rss": max(row["rss"] for row in rows),
    }


def print_pairs(pairs: list) -> float:
    """The interleaved np=1/np=2 pairs (and np=2 over Gloo) with their load; the median
    np=2/np=1 ratio."""
    gloo = GLOO in pairs[0]
    extra = " np=2 Gloo s/epoch | Gloo/np=1 |" if gloo else ""
    print(f"| pair | np=1 s/epoch | np=2 s/epoch | np=2/np=1 |{extra} load during the rows |")
    print("|---|---|---|---|" + ("---|---|" if gloo else "") + "---|")
    ratios = []
    for number, pair in enumerate(pairs, 1):
        np1, np2 = (statistics.median(pair[n]["seconds"]) for n in (1, 2))
        ratios.append(np2 / np1)
        cells = f"| {number} | {np1:.3f} | {np2:.3f} | {np2 / np1:.2f}x |"
        if gloo:
            over_gloo = statistics.median(pair[GLOO]["seconds"])
            cells += f" {over_gloo:.3f} | {over_gloo / np1:.2f}x |"
        loads = "; ".join(f"{key}: {row['load'].describe()}" for key, row in pair.items())
        print(f"{cells} {loads} |")
    print()
    return statistics.median(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per row (median taken)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved np=1/np=2 pairs")
    parser.add_argument("--d2l-workers", type=int, default=4, help="d2l DataLoader workers")
    parser.add_argument("--calls", type=int, default=EXCHANGE_CALLS, help="exchanges timed")
    parser.add_argument("--variant", choices=("d2l", "numpy"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        child_main(args)
        return

    loads: dict[str, Load] = {}
    start = load_before()
    with tempfile.TemporaryDirectory(prefix="train-speed-") as tmp:
        data_uri = prepare_dataset(
            PipelineConfig(mirrors=[DEBIAN_DATA_DIR.as_uri()], data_dir=Path(tmp) / "data")
        )
        d2l_name = f"d2l loop ({args.d2l_workers} workers)"
        with LoadWatch() as loads[d2l_name]:
            d2l_row = run_in_child("d2l", data_uri, args)
        pairs = interleaved_trainer_pairs(data_uri, Path(tmp) / "work", args.epochs, args.repeats)
        with LoadWatch() as loads["numpy floor"]:
            floor_row = run_in_child("numpy", data_uri, args)
        rows = {
            d2l_name: d2l_row,
            "trainer np=1": merged_trainer_row(pairs, 1),
            "trainer np=2": merged_trainer_row(pairs, 2),
            **({"trainer np=2, Gloo": merged_trainer_row(pairs, GLOO)} if GLOO in pairs[0] else {}),
            "numpy floor": floor_row,
        }
        for number, pair in enumerate(pairs, 1):
            loads.update({f"pair {number} np={n}": row["load"] for n, row in pair.items()})
        num_train = len(load_dataset(data_uri).train_labels)
        with LoadWatch() as loads["exchange rows"]:
            exchange = {
                "raw socket exchange": raw_exchange_us(args.calls),
                "hvd.allreduce, alone, Gloo": hvd_allreduce_us(args.calls, {}),
                **(
                    {"hvd.allreduce, alone, MPI": hvd_allreduce_mpi_us(args.calls)}
                    if mpirun.available()
                    else {}
                ),
            }
    print_tables(rows, pairs, exchange, num_train, args)
    loaded = warn_if_loaded(loads, start)
    ratio = statistics.median(
        statistics.median(p[2]["seconds"]) / statistics.median(p[1]["seconds"]) for p in pairs
    )
    verdict = "met" if ratio <= TARGET_NP2_RATIO else "MISSED"
    note = " (LOADED: not a quiet figure)" if loaded else " (quiet)"
    print(
        f"np=2 / np=1 epoch time, median of {len(pairs)} interleaved pairs: {ratio:.2f}x "
        f"(target <= {TARGET_NP2_RATIO:.0f}x): {verdict}{note}; "
        f"before the first row: {start.describe()}"
    )


def print_tables(rows: dict, pairs: list, exchange: dict, num_train: int, args) -> None:
    per_epoch = {name: statistics.median(row["seconds"]) for name, row in rows.items()}
    d2l = next(iter(per_epoch.values()))
    floor = per_epoch["numpy floor"]
    print(f"train step speed: {args.epochs} epochs per row, s/epoch = median of the epochs\n")
    print(f"| {'variant':<20} | s/epoch | vs d2l | vs floor | test acc | peak RSS/rank |")
    print(f"|{'-' * 22}|---------|--------|----------|----------|---------------|")
    for name, row in rows.items():
        seconds = per_epoch[name]
        print(
            f"| {name:<20} | {seconds:7.3f} | {d2l / seconds:5.1f}x | {seconds / floor:7.2f}x "
            f"| {row['test_accuracy']:8.4f} | {row['rss']:9.0f} MB |"
        )
    print()
    print_pairs(pairs)
    print_exchange_table(exchange, per_epoch, len(global_batches(num_train, BATCH_SIZE, 2)))
    for name in ("trainer np=1", "trainer np=2"):
        speedup, ratio, rss = d2l / per_epoch[name], per_epoch[name] / floor, rows[name]["rss"]
        verdict = "met" if (speedup >= TARGET_SPEEDUP and ratio <= TARGET_FLOOR_RATIO) else "MISSED"
        verdict = verdict if rss <= TARGET_RSS_MB else "MISSED"
        print(
            f"{name}: {speedup:.1f}x d2l (target >= {TARGET_SPEEDUP:.0f}x), {ratio:.2f}x floor "
            f"(target <= {TARGET_FLOOR_RATIO:.0f}x), {rss:.0f} MB (target <= "
            f"{TARGET_RSS_MB:.0f} MB): {verdict}"
        )


def print_exchange_table(exchange: dict, per_epoch: dict, steps: int) -> None:
    """Horovod's cost per step next to the raw exchange of the same bytes."""
    np1, np2 = per_epoch["trainer np=1"], per_epoch["trainer np=2"]
    rows = {
        **exchange,
        "np=2 overhead in training": (np2 - np1 / 2) / steps * 1e6,
        "np=1 compute per step": np1 / steps * 1e6,
    }
    raw = exchange["raw socket exchange"]
    print(f"gradient exchange at np=2 (7,850 float32), {steps} steps/epoch\n")
    print_ratio_table("per step", "us/step", rows, raw, "vs raw exchange", digits=0)
    print()


if __name__ == "__main__":
    main()
