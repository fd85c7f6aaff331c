"""Deployments on a real Prefect server with a real process worker (issue: orchestration).

One module, bounded in time: it starts `prefect server start` on 127.0.0.1 (SQLite in a temp
dir), deploys from prefect.yaml, starts `prefect worker`, and runs the deployments for real.
Every process it starts is stopped by it, also when a test fails.
"""

from __future__ import annotations

import json
import sys
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support.prefect_server import PREFECT, api, background, prefect, wait_for

DEBIAN_MIRROR = "file:///usr/share/datasets/fashion-mnist/"
POOL = "fashion-process"
RUN_TIMEOUT_S = 300

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def deployed(prefect_env, tmp_path_factory) -> Iterator[dict[str, str]]:
    """The process pool, the deployments of prefect.yaml on it, and a running worker."""
    prefect(prefect_env, "work-pool", "create", POOL, "--type", "process")
    prefect(prefect_env, "--no-prompt", "deploy", "--name", "nightly", "--name", "sweep")
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    command = [PREFECT, "worker", "start", "--pool", POOL, "--limit", "2"]
    with background(command, prefect_env, log):
        yield {**prefect_env, "WORKER_LOG": str(log)}


def deployment(env: dict[str, str], name: str) -> dict:
    return api(env, "GET", f"/deployments/name/{name}")


def start_run(env: dict[str, str], name: str, parameters: dict) -> str:
    flow_run = api(
        env,
        "POST",
        f"/deployments/{deployment(env, name)['id']}/create_flow_run",
        {"parameters": parameters},
    )
    return flow_run["id"]


def final_state(env: dict[str, str], flow_run_id: str, timeout: float = RUN_TIMEOUT_S) -> dict:
    def finished():
        state = api(env, "GET", f"/flow_runs/{flow_run_id}")["state"]
        return (
            state
            if state and state["type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
            else None
        )

    return wait_for(finished, timeout, f"flow run {flow_run_id} to finish", interval=2)


def small_config(tmp: Path, **overrides) -> dict:
    return {
        "epochs": 1,
        "mirrors": [DEBIAN_MIRROR],
        "data_dir": str(tmp / "data"),
        "work_dir": str(tmp / "work"),
        "artifact_store": (tmp / "artifacts").as_uri(),
        "min_test_accuracy": 0.7,
        **overrides,
    }


def artifacts_of(env: dict[str, str], flow_run_id: str) -> dict[str, dict]:
    found = api(
        env, "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
    )
    return {artifact["key"]: artifact for artifact in found if artifact["key"]}


def test_nightly_deployment_carries_its_cron_and_the_server_schedules_runs(deployed):
    nightly = deployment(deployed, "training_pipeline/nightly")
    (schedule,) = nightly["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *"
    assert schedule["schedule"]["timezone"] == "UTC"
    assert schedule["active"]

    def scheduled_runs():
        runs = api(
            deployed,
            "POST",
            "/flow_runs/filter",
            {
                "deployments": {"id": {"any_": [nightly["id"]]}},
                "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
            },
        )
        return runs

    runs = wait_for(scheduled_runs, 60, "the scheduler to create the nightly runs", interval=2)
    for run in runs:
        when = run["expected_start_time"]
        assert when[11:19] == "02:00:00", when  # 02:00 UTC, as the cron says


def test_worker_runs_the_deployment_to_completion_and_publishes(deployed, tmp_path):
    flow_run_id = start_run(
        deployed, "training_pipeline/nightly", {"config": small_config(tmp_path)}
    )
    state = final_state(deployed, flow_run_id)
    assert state["type"] == "COMPLETED", (state, Path(deployed["WORKER_LOG"]).read_text()[-3000:])

    store = tmp_path / "artifacts"
    latest = json.loads((store / "latest.json").read_text())
    manifest = json.loads((store / "runs" / latest["run_id"] / "manifest.json").read_text())
    assert manifest["flow_run_id"] == flow_run_id
    assert manifest["metrics"]["accuracy"] > 0.7
    assert {"evaluation-report", "per-class-metrics"} <= set(artifacts_of(deployed, flow_run_id))


@pytest.mark.s3
def test_worker_run_publishes_to_s3(deployed, s3_server, tmp_path):
    import boto3

    prefix = f"orchestration-{tmp_path.name}"
    config = small_config(
        tmp_path,
        artifact_store=f"s3://{s3_server.bucket}/{prefix}",
        s3_endpoint_url=s3_server.endpoint,
    )
    # The worker's flow runs take boto3's own credentials from the environment (job variables).
    env_vars = {
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
    }
    flow_run = api(
        deployed,
        "POST",
        f"/deployments/{deployment(deployed, 'training_pipeline/nightly')['id']}/create_flow_run",
        {"parameters": {"config": config}, "job_variables": {"env": env_vars}},
    )
    state = final_state(deployed, flow_run["id"])
    assert state["type"] == "COMPLETED", (state, Path(deployed["WORKER_LOG"]).read_text()[-3000:])

    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name="us-east-1",
    )
    latest = json.loads(
        s3.get_object(Bucket=s3_server.bucket, Key=f"{prefix}/latest.json")["Body"].read()
    )
    key = f"{prefix}/runs/{latest['run_id']}/manifest.json"
    manifest = json.loads(s3.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read())
    assert manifest["flow_run_id"] == flow_run["id"]


def training_processes(marker: str) -> list[psutil.Process]:
    """Live horovodrun / rank processes whose command line names `marker` (the run's work dir)."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if marker in cmdline and ("horovodrun" in cmdline or "tasks.train.rank" in cmdline):
            found.append(process)
    return found


def test_cancelling_a_run_while_training_leaves_no_horovod_process(deployed, tmp_path):
    config = small_config(tmp_path, epochs=500)
    flow_run_id = start_run(deployed, "training_pipeline/nightly", {"config": config})
    marker = str(tmp_path / "work")
    wait_for(lambda: training_processes(marker), 120, "training to start", interval=0.5)

    api(
        deployed,
        "POST",
        f"/flow_runs/{flow_run_id}/set_state",
        {"state": {"type": "CANCELLING"}, "force": True},
    )
    state = final_state(deployed, flow_run_id, timeout=120)
    assert state["type"] == "CANCELLED", state
    wait_for(
        lambda: not training_processes(marker), 30, "the Horovod processes to end", interval=0.5
    )


def test_two_by_two_sweep_compares_and_names_the_best_by_validation(deployed, tmp_path):
    parameters = {
        "grid": {"lr": [0.05, 0.2], "batch_size": [128, 256]},
        "config": small_config(tmp_path),
        "max_parallel": 2,
    }
    flow_run_id = start_run(deployed, "hyperparameter_sweep/sweep", parameters)
    state = final_state(deployed, flow_run_id)
    assert state["type"] == "COMPLETED", (state, Path(deployed["WORKER_LOG"]).read_text()[-3000:])

    artifacts = artifacts_of(deployed, flow_run_id)
    rows = json.loads(artifacts["sweep-comparison"]["data"])
    assert {(row["lr"], row["batch_size"]) for row in rows} == {
        (0.05, 128),
        (0.05, 256),
        (0.2, 128),
        (0.2, 256),
    }
    (best,) = [row for row in rows if row["best"]]
    assert best["val_accuracy"] == max(row["val_accuracy"] for row in rows)
    assert "validation" in artifacts["sweep-best"]["data"]
    published = json.loads(
        (tmp_path / "artifacts" / "runs" / best["run_id"] / "manifest.json").read_text()
    )
    assert published["metrics"]["accuracy"] == pytest.approx(best["test_accuracy"], abs=1e-4)


def test_pipeline_serve_registers_a_cron_deployment_with_the_given_options(prefect_env, tmp_path):
    command = [
        sys.executable,
        "-m",
        "pipeline.cli",
        "serve",
        "--cron",
        "30 3 * * *",
        "--name",
        "served",
        "--epochs",
        "2",
    ]
    with background(command, prefect_env, tmp_path / "serve.log") as serving:

        def registered():
            if serving.poll() is not None:
                pytest.fail(f"pipeline serve exited: {(tmp_path / 'serve.log').read_text()}")
            try:
                return deployment(prefect_env, "training_pipeline/served")
            except urllib.error.HTTPError:
                return None

        served = wait_for(registered, 120, "pipeline serve to register its deployment")
    assert served["schedules"][0]["schedule"]["cron"] == "30 3 * * *"
    assert served["parameters"] == {"config": {"epochs": 2}}
