"""Fixtures of the deployment tests: the Docker engine, and the images built from the work tree
(helpers in tests/support/docker.py)."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from tests.support.docker import (
    IMAGE,
    SEAWEEDFS_IMAGE,
    build_image,
    remove_labelled,
)


@pytest.fixture(scope="session")
def docker_engine() -> None:
    """A Docker engine that answers, else the test skips, saying why."""
    if shutil.which("docker") is None:
        pytest.skip("no docker client on PATH (Debian: apt-get install docker.io)")
    try:
        info = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("no Docker engine answers: `docker info` timed out after 30 s")
    if info.returncode != 0:
        pytest.skip(f"no Docker engine answers: {info.stderr.strip()[-300:]}")


@pytest.fixture(scope="session")
def image(docker_engine, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The runtime image, built from the work tree."""
    log = tmp_path_factory.mktemp("image") / "build.log"
    return build_image(IMAGE, "docker/Dockerfile", log, target="runtime")


@pytest.fixture(scope="session")
def seaweedfs_image(docker_engine, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The dev overlay's S3 store image (docker/seaweedfs.Dockerfile)."""
    log = tmp_path_factory.mktemp("seaweedfs-image") / "build.log"
    return build_image(SEAWEEDFS_IMAGE, "docker/seaweedfs.Dockerfile", log, timeout=600)


@pytest.fixture
def docker_objects(docker_engine) -> Iterator[str]:
    """The label value of this test's containers and volumes; all of them go at the end."""
    token = uuid.uuid4().hex[:10]
    try:
        yield token
    finally:
        remove_labelled(token)
