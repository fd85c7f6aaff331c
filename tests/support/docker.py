"""The Docker engine and the pipeline image (their fixtures are in tests/deploy/conftest.py).

Without an engine, the tests that need one skip, saying why (a failure in CI, where
PIPELINE_TESTS_NO_SKIP=1). `image` builds the runtime image from the work tree once a session
(the legacy builder, layers cached by the engine), so container tests run the current code;
`seaweedfs_image` builds the dev overlay's S3 store.
Every container and volume a test creates carries the label io.fashion-pipeline.test=<token>
(`docker_objects`) and is removed at the end of the test, also when it fails.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# PIPELINE_TEST_IMAGE: another tag, e.g. one per work tree where several build at once.
IMAGE = os.environ.get("PIPELINE_TEST_IMAGE", "fashion-pipeline:0.1.0")
# The dev overlay's S3 store (k8s/overlays/dev/seaweedfs.yaml).
SEAWEEDFS_IMAGE = "fashion-pipeline-seaweedfs:4.48"
LABEL = "io.fashion-pipeline.test"
DEBIAN_DATA = Path("/usr/share/datasets/fashion-mnist")
BUILD_TIMEOUT_S = 1800


def docker(
    *args: str, timeout: float = 120, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`docker ARGS`; a failure fails the test with docker's output."""
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    if result.returncode != 0:
        pytest.fail(
            f"docker {' '.join(args)} exited with {result.returncode}:\n"
            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


def remove_labelled(token: str) -> None:
    """Remove every container, then every volume, labelled with `token`."""
    selector = f"label={LABEL}={token}"
    for kind, remove in (("container", ["rm", "-f"]), ("volume", ["volume", "rm", "-f"])):
        found = subprocess.run(
            ["docker", kind, "ls", "-aq" if kind == "container" else "-q", "--filter", selector],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.split()
        if found:
            subprocess.run(["docker", *remove, *found], capture_output=True, timeout=120)


def build_image(
    tag: str,
    dockerfile: str,
    log: Path,
    target: str | None = None,
    timeout: float = BUILD_TIMEOUT_S,
) -> str:
    """`docker build` of `dockerfile` from the work tree (layers cached by the engine)."""
    command = ["docker", "build", "-f", dockerfile, "-t", tag]
    if target:
        command += ["--target", target]
    # The legacy builder: Debian's docker.io client has no buildx.
    with log.open("wb") as out:
        built = subprocess.run(
            [*command, "."],
            cwd=REPO,
            env={**os.environ, "DOCKER_BUILDKIT": "0"},
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    if built.returncode != 0:
        pytest.fail(
            f"docker build of {tag} exited with {built.returncode} (log: {log}); where no "
            f"registry is reachable, build the base image first (docker/bootstrap-base.sh):\n"
            f"{log.read_text(errors='replace')[-3000:]}"
        )
    return tag


def image_size(reference: str) -> int:
    return int(docker("image", "inspect", "--format", "{{.Size}}", reference).stdout)
