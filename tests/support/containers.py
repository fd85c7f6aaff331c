"""Helpers of the container tests: running a container of the pipeline image, reading what
it left in S3."""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path

from tests.support.docker import (
    DEBIAN_DATA,
    IMAGE,
    LABEL,
    REPO,
    docker,
)

MAX_IMAGE_BYTES = 1_200_000_000  # 1.2 GB
PIPELINE_UID = "10001"
MIRROR = "file:///mirror/"
MIRROR_MOUNT = ("-v", f"{DEBIAN_DATA}:/mirror:ro")
DOCKER_POOL = "fashion-docker"
STEPS = ("dataset", "train", "evaluate", "publish")
CONTAINER_TIMEOUT_S = 300
HADOLINT = Path(sys.executable).with_name("hadolint")
COMPOSE_FILE = REPO / "docker" / "compose.yaml"
ENV_EXAMPLE = REPO / "docker" / ".env.example"


def run_container(
    token: str,
    *args: str,
    options: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = CONTAINER_TIMEOUT_S,
) -> str:
    """Run the image once, labelled `token`; return its stdout (a failure fails the test)."""
    name = f"fashion-test-{token}-{uuid.uuid4().hex[:6]}"
    command = ["run", "--rm", "--name", name, "--label", f"{LABEL}={token}", *options, IMAGE]
    return docker(*command, *args, timeout=timeout, env=env).stdout


def last_line(output: str) -> str:
    return output.strip().splitlines()[-1]


def s3_step_environment(server, store_uri: str) -> tuple[list[str], dict[str, str]]:
    """`docker run` options and the client environment they read: the values travel as
    `-e NAME` (taken from the docker client's environment), so no secret is on a command line."""
    values = {
        "PIPELINE_ARTIFACT_STORE": store_uri,
        "PIPELINE_S3_ENDPOINT_URL": server.endpoint,
        "PIPELINE_EPOCHS": "1",
        "PIPELINE_MIN_TEST_ACCURACY": "0.7",
        "AWS_ACCESS_KEY_ID": server.access_key,
        "AWS_SECRET_ACCESS_KEY": server.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    options = ["--network", "host"]
    for name in values:
        options += ["-e", name]
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PIPELINE_"))}
    return options, {**inherited, **values}


def read_s3_json(server, key: str) -> dict:
    return json.loads(server.client().get_object(Bucket=server.bucket, Key=key)["Body"].read())
