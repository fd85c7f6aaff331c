"""Prefect's Kubernetes worker on a real cluster: the worker Deployment of k8s/base/worker.yaml
polls the work pool `fashion-k8s` of a real Prefect server and runs each flow run as a Job.

The Prefect server runs in the namespace (tests/support/cluster/prefect-server.yaml): pods reach
it by its Service name, as they would a team's server or Prefect Cloud, on this cluster and on
yours alike; this host reaches it through `kubectl port-forward`. The Secret
fashion-pipeline-prefect names it, as k8s/secrets/prefect.example.env tells a user to.
Tier `cluster`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.k8s_deploy import (
    NAMESPACE,
    READY_TIMEOUT_S,
    Deployment,
    artifacts,
    job_outcome,
    latest_run,
    port_forward,
    server_manifest,
)
from tests.support.prefect_server import REPO, api, background, prefect, wait_for
from tests.support.seaweedfs import free_port

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(2400)]

SERVER_MANIFEST = Path(__file__).parents[2] / "support" / "cluster" / "prefect-server.yaml"
IN_CLUSTER_API = "http://prefect-server:4200/api"
DEPLOYMENT = "training_pipeline/kubernetes"
FLOW_RUN_TIMEOUT_S = 600
# The image the pool allows beside the CPU one; not loaded into the test cluster.
MISSING_IMAGE = "fashion-pipeline:0.1.0-gpu"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


@pytest.fixture(scope="module")
def worker(dev: Deployment, tmp_path_factory) -> Iterator[dict[str, str]]:
    """The in-cluster Prefect server, the Secret that names it, the worker Deployment running
    and its pool created; yields the environment of a `prefect` CLI on this host."""
    home = tmp_path_factory.mktemp("k8s-prefect")
    server = server_manifest(dev, SERVER_MANIFEST)
    dev.kubectl("apply", "-f", "-", input=server)
    secret_file = home / "prefect.env"  # as k8s/secrets/prefect.example.env describes it
    secret_file.write_text(f"PREFECT_API_URL={IN_CLUSTER_API}\n")
    create = ["create", "secret", "generic", "fashion-pipeline-prefect"]
    dev.kubectl(*create, f"--from-env-file={secret_file}")
    port = free_port()
    forward = port_forward(dev.cluster, "prefect-server", port, 4200)
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    env = {
        **inherited,
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_HOME": str(home / "prefect-home"),
        "PIPELINE_PROJECT_DIR": str(REPO),
    }
    try:
        wait = f"--timeout={READY_TIMEOUT_S}s"
        dev.kubectl(
            "rollout", "status", "deploy/prefect-server", wait, timeout=READY_TIMEOUT_S + 10
        )
        # The worker waited for the Secret (CreateContainerConfigError); start it afresh.
        dev.kubectl("rollout", "restart", "deploy/fashion-pipeline-worker")
        dev.kubectl(
            "rollout",
            "status",
            "deploy/fashion-pipeline-worker",
            wait,
            timeout=READY_TIMEOUT_S + 10,
        )
        with background(forward, dict(os.environ), home / "port-forward.log"):
            wait_for(lambda: pool_exists(env), READY_TIMEOUT_S, "the worker to create its pool")
            yield env
    finally:
        # Later pods run with Prefect's temporary server again, as before this module.
        dev.kubectl("delete", "secret", "fashion-pipeline-prefect", "--ignore-not-found")
        dev.kubectl("scale", "deploy/fashion-pipeline-worker", "--replicas=0")
        dev.kubectl("delete", "-f", "-", input=server)


def pool_exists(env: dict[str, str]) -> bool:
    try:
        return api(env, "GET", "/work_pools/fashion-k8s")["type"] == "kubernetes"
    except OSError:  # not yet created (404) or the forward not yet up
        return False


def run_deployment(env: dict[str, str], *job_variables: str) -> dict:
    """`prefect deployment run` of the README's k8s deployment; the flow run, once terminal."""
    deployment = api(env, "GET", f"/deployments/name/{DEPLOYMENT}")
    started = time.time()
    options = [item for variable in job_variables for item in ("--job-variable", variable)]
    prefect(env, "deployment", "run", DEPLOYMENT, *options)
    query = {
        "deployments": {"id": {"any_": [deployment["id"]]}},
        "sort": "EXPECTED_START_TIME_DESC",
    }
    (flow_run, *_) = api(env, "POST", "/flow_runs/filter", {**query, "limit": 1})

    def finished() -> dict | None:
        current = api(env, "GET", f"/flow_runs/{flow_run['id']}")
        return current if current["state"]["type"] in TERMINAL else None

    result = wait_for(finished, FLOW_RUN_TIMEOUT_S, f"flow run {flow_run['id']}", interval=3)
    result["waited_s"] = time.time() - started
    return result


def flow_run_logs(env: dict[str, str], flow_run_id: str) -> str:
    query = {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200}
    return "\n".join(entry["message"] for entry in api(env, "POST", "/logs/filter", query))


@pytest.fixture(scope="module")
def deployed(worker: dict[str, str]) -> dict[str, str]:
    """`prefect deploy` of the `kubernetes` entry of prefect.yaml, as the README says."""
    prefect(worker, "--no-prompt", "deploy", "--name", "kubernetes", timeout=300)
    return worker


def test_a_deployment_run_becomes_a_kubernetes_job_and_records_its_artifacts(dev, deployed):
    before = latest_run(dev)
    flow_run = run_deployment(deployed)
    logs = flow_run_logs(deployed, flow_run["id"])
    assert flow_run["state"]["type"] == "COMPLETED", (flow_run["state"], logs[-3000:])
    # The worker created the Job through the API server, in its namespace.
    selector = f"prefect.io/flow-run-id={flow_run['id']}"
    (job,) = dev.json("get", "jobs", "-l", selector)["items"]
    # The flow run reports its end before its container exits and the Job completes.
    assert job_outcome(dev, job["metadata"]["name"], timeout=120) == "Complete"
    found = api(
        deployed,
        "POST",
        "/artifacts/filter",
        {"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}},
    )
    by_key = {artifact["key"]: artifact for artifact in found}
    assert by_key["evaluation-report"]["type"] == "markdown"
    assert float(by_key["training-progress"]["data"]) == pytest.approx(100.0)
    # The run was published to the namespace's store and verifies.
    run_id = latest_run(dev)
    assert run_id != before and artifacts(dev, "verify", run_id).returncode == 0


def service_account_kubeconfig(dev: Deployment, home: Path) -> Path:
    """A kubeconfig that authenticates as the worker's ServiceAccount (a fresh token)."""
    token = dev.kubectl("create", "token", "fashion-pipeline-worker", "--duration=10m").stdout
    admin = json.loads(dev.cluster.kubectl("config", "view", "--raw", "-o", "json").stdout)
    cluster = admin["clusters"][0]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": "worker", "user": {"token": token.strip()}}],
        "contexts": [{"name": "worker", "context": {"cluster": cluster["name"], "user": "worker"}}],
        "current-context": "worker",
    }
    path = home / "worker.kubeconfig"
    path.write_text(json.dumps(config))
    path.chmod(0o600)
    return path


def test_the_workers_rights_end_at_its_namespace(dev, worker, tmp_path):
    kubeconfig = service_account_kubeconfig(dev, tmp_path)

    def as_worker(*args: str):
        return dev.cluster.kubectl("--kubeconfig", str(kubeconfig), *args, check=False)

    # What it needs, in its namespace: create and follow Jobs, read pods and their logs.
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "rights-probe"},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": []}}},
    }
    allowed = as_worker("-n", NAMESPACE, "get", "jobs,pods")
    assert allowed.returncode == 0, allowed.stderr
    for verb, resource in (("create", "jobs"), ("watch", "jobs"), ("get", "pods/log")):
        assert as_worker("-n", NAMESPACE, "auth", "can-i", verb, resource).stdout.strip() == "yes"
    # Anything else is refused by the API server, as a real request.
    for args, body in (
        (("-n", "default", "get", "jobs"), None),
        (("-n", "kube-system", "get", "pods"), None),
        (("-n", NAMESPACE, "get", "secrets"), None),
        (("-n", "default", "create", "-f", "-"), json.dumps(job)),
    ):
        refused = dev.cluster.kubectl(
            "--kubeconfig", str(kubeconfig), *args, input=body, check=False
        )
        assert refused.returncode != 0 and "forbidden" in refused.stderr.lower(), (args, refused)


def test_a_flow_run_whose_pod_cannot_start_ends_crashed_and_says_why(dev, deployed):
    deadline = 60
    flow_run = run_deployment(
        deployed, f"image={MISSING_IMAGE}", f"active_deadline_seconds={deadline}"
    )
    logs = flow_run_logs(deployed, flow_run["id"])
    assert flow_run["state"]["type"] in {"CRASHED", "FAILED"}, (flow_run["state"], logs[-2000:])
    # Bounded by the Job's deadline (plus the worker's pickup), not waiting forever.
    assert flow_run["waited_s"] < deadline + 180, flow_run["waited_s"]
    assert MISSING_IMAGE in logs and "pull" in logs.lower(), logs[-3000:]
