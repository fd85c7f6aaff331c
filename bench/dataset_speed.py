"""Benchmark of the dataset step: cold fetch, warm verification, load, peak memory.

Serves Debian's copy of Fashion-MNIST from a local HTTP mirror on 127.0.0.1 and prints one
table. Targets: warm verify + load <= 0.5 s; peak memory during load <= 2x the decompressed size.
The baseline row is the foundation design (a .gz cache that is gunzipped, hashed and parsed on
every use), measured in the same run, so the ratio compares like with like.

Run: .venv/bin/python bench/dataset_speed.py [--repeat N]
"""

from __future__ import annotations

import argparse
import functools
import gzip
import hashlib
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from pipeline.base.config import PipelineConfig
from tasks.dataset import DEBIAN_DATA_DIR, FILES, load_dataset, parse_idx, prepare_dataset

TARGET_WARM_SECONDS = 0.5
TARGET_MEMORY_RATIO = 2.0
MB = 1e6


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def median_seconds(action: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_bytes(action: Callable[[], object]) -> int:
    tracemalloc.start()
    try:
        result = action()  # held until the peak is read: the arrays are the point
        peak = tracemalloc.get_traced_memory()[1]
        del result
    finally:
        tracemalloc.stop()
    return peak


def load_from_gz(gz_dir: Path) -> list:
    """The foundation design: decompress each cached .gz, hash it, parse it."""
    arrays = []
    for spec in FILES.values():
        raw = gzip.decompress((gz_dir / spec.name).read_bytes())
        assert hashlib.sha256(raw).hexdigest() == spec.sha256
        arrays.append(parse_idx(raw, spec.name, spec.shape))
    return arrays


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per timing (median)")
    args = parser.parse_args()
    if not (DEBIAN_DATA_DIR / FILES["train_images"].name).exists():
        print(f"error: needs Debian's dataset-fashion-mnist in {DEBIAN_DATA_DIR}", file=sys.stderr)
        return 1

    gz_bytes = sum((DEBIAN_DATA_DIR / spec.name).stat().st_size for spec in FILES.values())
    idx_bytes = sum(spec.nbytes for spec in FILES.values())
    handler = functools.partial(QuietHandler, directory=str(DEBIAN_DATA_DIR))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    mirror = f"http://127.0.0.1:{httpd.server_address[1]}/"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            runs = iter(range(args.repeat))

            def cold_fetch() -> str:
                config = PipelineConfig(mirrors=[mirror], data_dir=Path(tmp) / f"c{next(runs)}")
                return prepare_dataset(config)

            cold = median_seconds(cold_fetch, min(args.repeat, 3))
            config = PipelineConfig(mirrors=[mirror], data_dir=Path(tmp) / "c0")
            uri = prepare_dataset(config)
            warm = median_seconds(lambda: prepare_dataset(config), args.repeat)
            load = median_seconds(lambda: load_dataset(uri), args.repeat)
            baseline = median_seconds(lambda: load_from_gz(DEBIAN_DATA_DIR), args.repeat)
            load_peak = peak_bytes(lambda: load_dataset(uri))
            baseline_peak = peak_bytes(lambda: load_from_gz(DEBIAN_DATA_DIR))
    finally:
        httpd.shutdown()
        httpd.server_close()

    def verdict(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    rows = [
        (
            "cold fetch, 127.0.0.1 HTTP mirror",
            f"{cold:.3f} s",
            f"{gz_bytes / MB / cold:.1f} MB/s gz",
            "",
        ),
        ("warm verify (prepare_dataset)", f"{warm:.3f} s", f"{idx_bytes / MB / warm:.0f} MB/s", ""),
        (
            "load into arrays (load_dataset)",
            f"{load:.3f} s",
            f"{idx_bytes / MB / load:.0f} MB/s",
            "",
        ),
        (
            "warm verify + load",
            f"{warm + load:.3f} s",
            "",
            f"<= {TARGET_WARM_SECONDS} s  {verdict(warm + load <= TARGET_WARM_SECONDS)}",
        ),
        (
            "baseline: gunzip + hash + parse .gz",
            f"{baseline:.3f} s",
            f"{baseline / (warm + load):.1f}x verify+load",
            "",
        ),
        (
            "peak memory during load",
            f"{load_peak / MB:.1f} MB",
            f"{load_peak / idx_bytes:.2f}x decompressed",
            f"<= {TARGET_MEMORY_RATIO:g}x  {verdict(load_peak <= TARGET_MEMORY_RATIO * idx_bytes)}",
        ),
        (
            "baseline peak memory",
            f"{baseline_peak / MB:.1f} MB",
            f"{baseline_peak / idx_bytes:.2f}x decompressed",
            "",
        ),
    ]
    print(
        f"Fashion-MNIST: {gz_bytes / MB:.1f} MB gzip -> {idx_bytes / MB:.1f} MB IDX; "
        f"median of {args.repeat} runs (cold fetch: {min(args.repeat, 3)})"
    )
    header = ("measure", "value", "rate / ratio", "target")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
