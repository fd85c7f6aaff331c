"""S3 throughput: this project's artifact store vs plain single-stream boto3 calls.

Starts a local SeaweedFS server (the tests' launcher), then moves one 100 MB file and 1,000
small files up and down both ways:
  store   pipeline.base.store.s3.S3Store: boto3's transfer manager (TransferConfig: multipart, 10
          threads), SHA-256 checksums sent with every request and checked by the server; the
          timed upload includes computing the whole-file SHA-256 (stored as metadata), the
          timed download includes verifying it;
  plain   one put_object / get_object per file, one after the other, like `aws s3 cp`
          without concurrency (boto3's default CRC32 checksums only).
Each cell is the median of --repeats runs; the ratio is store / plain from the same run.

    uv run python -m bench.s3_throughput [--repeats 3] [--small-files 1000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.base.config import PipelineConfig
from pipeline.base.files import file_sha256
from pipeline.base.store import ObjectInfo, open_store
from pipeline.base.store.s3 import S3Store
from tests.support.seaweedfs import S3Server, seaweedfs

MB = 2**20
LARGE_BYTES = 100 * MB
SMALL_BYTES = 16 * 1024


def make_files(root: Path, count: int, size: int) -> dict[str, Path]:
    root.mkdir(parents=True)
    files = {}
    for i in range(count):
        path = root / f"f{i:05d}.bin"
        path.write_bytes(os.urandom(size))
        files[path.name] = path
    return files


def store_upload(store: S3Store, files: dict[str, Path]) -> None:
    store.upload({key: (path, file_sha256(path)) for key, path in files.items()})


def store_download(store: S3Store, expected: dict[str, ObjectInfo], dest: Path) -> None:
    store.fetch(expected, dest)  # digests as a manifest lists them; verified after download


def plain_upload(client, bucket: str, prefix: str, files: dict[str, Path]) -> None:
    for key, path in files.items():
        with path.open("rb") as body:
            client.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=body)


def plain_download(client, bucket: str, prefix: str, files: dict[str, Path], dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for key in files:
        response = client.get_object(Bucket=bucket, Key=f"{prefix}/{key}")
        with (dest / key).open("wb") as out:
            shutil.copyfileobj(response["Body"], out, MB)


def median_rates(
    contenders: dict[str, Callable[[int], None]], megabytes: float, repeats: int
) -> dict[str, float]:
    """MB/s of each contender, median of `repeats`; runs alternate so both see the same load."""
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    for attempt in range(repeats):
        for name, action in contenders.items():
            start = time.perf_counter()
            action(attempt)
            seconds[name].append(time.perf_counter() - start)
    return {name: megabytes / statistics.median(times) for name, times in seconds.items()}


def measure(
    server: S3Server, work: Path, label: str, files: dict[str, Path], repeats: int
) -> list[tuple[str, str, float, float]]:
    name = f"{len(files)}-files"
    config = PipelineConfig(
        artifact_store=f"s3://{server.bucket}/store-{name}", s3_endpoint_url=server.endpoint
    )
    store = open_store(config.artifact_store, **config.store_options())
    assert isinstance(store, S3Store)
    client = server.client()
    plain_prefix = f"plain-{name}"
    megabytes = sum(path.stat().st_size for path in files.values()) / MB
    expected = {key: ObjectInfo(p.stat().st_size, file_sha256(p)) for key, p in files.items()}

    def fresh(path: Path) -> Path:
        shutil.rmtree(path, ignore_errors=True)
        return path

    up = median_rates(
        {
            "store": lambda i: store_upload(store, files),
            "plain": lambda i: plain_upload(client, server.bucket, plain_prefix, files),
        },
        megabytes,
        repeats,
    )
    down = median_rates(
        {
            "store": lambda i: store_download(store, expected, fresh(work / f"{name}-s{i}")),
            "plain": lambda i: plain_download(
                client, server.bucket, plain_prefix, files, fresh(work / f"{name}-p{i}")
            ),
        },
        megabytes,
        repeats,
    )
    return [
        (label, "upload", up["store"], up["plain"]),
        (label, "download", down["store"], down["plain"]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small-files", type=int, default=1000)
    args = parser.parse_args()
    load = os.getloadavg()[0]  # a busy machine skews both sides; say how busy it was

    with tempfile.TemporaryDirectory(prefix="s3-bench-") as tmp:
        work = Path(tmp)
        large = make_files(work / "large", 1, LARGE_BYTES)
        small = make_files(work / "small", args.small_files, SMALL_BYTES)
        with seaweedfs(work / "seaweedfs") as server:
            # boto3's own environment variables, as a user would set them.
            os.environ["AWS_ACCESS_KEY_ID"] = server.access_key
            os.environ["AWS_SECRET_ACCESS_KEY"] = server.secret_key
            os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
            rows = measure(server, work, "1 x 100 MB", large, args.repeats)
            rows += measure(server, work, f"{args.small_files} x 16 KB", small, args.repeats)

    print(
        f"\nSeaweedFS on 127.0.0.1, {os.cpu_count()} CPUs (load average {load:.1f} before); "
        f"median of {args.repeats} runs, MB/s"
    )
    header = f"{'workload':<16}{'direction':<11}{'store':>9}{'plain':>9}{'store/plain':>13}"
    print(header)
    print("-" * len(header))
    for name, direction, store_rate, plain_rate in rows:
        ratio = store_rate / plain_rate
        print(f"{name:<16}{direction:<11}{store_rate:>9.1f}{plain_rate:>9.1f}{ratio:>12.2f}x")


if __name__ == "__main__":
    main()
