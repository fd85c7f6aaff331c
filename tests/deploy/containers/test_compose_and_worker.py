"""docker/compose.yaml and the Prefect Docker worker: a flow run puts each step in its own
container; the compose stack validates, starts in order, takes credentials only from .env."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from pipeline.base.config import PipelineConfig
from tests.support.containers import (
    COMPOSE_FILE,
    DOCKER_POOL,
    ENV_EXAMPLE,
    MIRROR,
    STEPS,
    read_s3_json,
    run_container,
)
from tests.support.docker import (
    DEBIAN_DATA,
    LABEL,
    REPO,
    docker,
)
from tests.support.prefect_server import PREFECT, api, background, prefect

# --- a flow run through a Prefect server and a docker worker -------------------------------


@pytest.fixture(scope="module")
def docker_worker(prefect_env, docker_engine, tmp_path_factory) -> Iterator[dict[str, str]]:
    """A docker work pool on the module's Prefect server, and a worker polling it."""
    prefect(prefect_env, "work-pool", "create", DOCKER_POOL, "--type", "docker")
    log = tmp_path_factory.mktemp("docker-worker") / "worker.log"
    env = {**prefect_env, "PREFECT_WORKER_QUERY_SECONDS": "2"}
    command = [PREFECT, "worker", "start", "--pool", DOCKER_POOL, "--type", "docker"]
    with background(command, env, log):
        yield {**prefect_env, "WORKER_LOG": str(log)}


@pytest.mark.s3
def test_flow_run_puts_each_step_in_its_own_container(
    image, docker_worker, docker_objects, cache_volume, s3_env
):
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.types.entrypoint import EntrypointType

    from pipeline.flow import pipeline_step, training_pipeline

    prefix = f"flow-{docker_objects}"
    job_variables = {
        "image_pull_policy": "Never",
        "network_mode": "host",  # the Prefect and S3 servers listen on the host's 127.0.0.1
        "volumes": [f"{cache_volume}:/cache", f"{DEBIAN_DATA}:/mirror:ro"],
        "env": {
            "PREFECT_HOME": "/tmp/prefect",  # the image's, not the worker's (which it forwards)
            "AWS_ACCESS_KEY_ID": s3_env.access_key,
            "AWS_SECRET_ACCESS_KEY": s3_env.secret_key,
            "AWS_DEFAULT_REGION": "us-east-1",
        },
        "labels": {LABEL: docker_objects},
        # Kept after they exit, so the test can inspect them; the test removes them.
        "auto_remove": False,
        "container_create_kwargs": {
            # The image's entrypoint is `pipeline`; the worker's command is `prefect flow-run ...`.
            "entrypoint": [],
            # The worker adds host.docker.internal to the container's hosts; with the host's
            # network Docker then writes a fresh /etc/hosts without the host's own name, and
            # Horovod's Gloo, which resolves it, crashes (SIGSEGV in hvd.init).
            "extra_hosts": {socket.gethostname(): "127.0.0.1"},
        },
    }
    config = PipelineConfig(
        epochs=1,
        mirrors=[MIRROR],
        artifact_store=f"s3://{s3_env.bucket}/{prefix}",
        s3_endpoint_url=s3_env.endpoint,
        min_test_accuracy=0.7,
        step_runner="deployments",
        step_deployment="pipeline-step/step-docker",
    )
    with temporary_settings({PREFECT_API_URL: docker_worker["PREFECT_API_URL"]}):
        step_deployment_id = pipeline_step.deploy(
            name="step-docker",
            work_pool_name=DOCKER_POOL,
            image=image,
            build=False,
            push=False,
            job_variables=job_variables,
            # The package is installed in the image: the flow is imported by module path.
            entrypoint_type=EntrypointType.MODULE_PATH,
            print_next_steps=False,
        )
        state = training_pipeline(config=config, return_state=True)
        # Deliver this process's logs and events while the module's server is still up
        # (else they are retried against a stopped server when the interpreter exits).
        APILogHandler().flush()
        EventsWorker.drain_all(timeout=30)
    worker_log = Path(docker_worker["WORKER_LOG"]).read_text(errors="replace")[-4000:]
    assert state.is_completed(), (state, worker_log)
    summary = state.result()
    parent_id = str(state.state_details.flow_run_id)

    children = api(
        docker_worker,
        "POST",
        "/flow_runs/filter",
        {"flow_runs": {"parent_flow_run_id": {"any_": [parent_id]}}},
    )
    by_step = {run["parameters"]["step"]: run for run in children}
    assert sorted(by_step) == sorted(STEPS) and len(children) == len(STEPS), children
    for run in children:
        assert run["deployment_id"] == str(step_deployment_id)
        assert run["state"]["type"] == "COMPLETED", (run["state"], worker_log)

    # Each child flow run ran in a container of its own, from the image, and exited 0.
    ids = docker("ps", "-aq", "--filter", f"label={LABEL}={docker_objects}").stdout.split()
    containers = json.loads(docker("inspect", *ids).stdout) if ids else []
    assert sorted(c["Config"]["Labels"]["io.prefect.flow-run-id"] for c in containers) == sorted(
        run["id"] for run in children
    )
    for container in containers:
        assert container["Config"]["Image"] == image
        assert container["State"]["ExitCode"] == 0, container["Name"]

    manifest = read_s3_json(s3_env, f"{prefix}/runs/{summary.run_id}/manifest.json")
    assert manifest["flow_run_id"] == by_step["publish"]["id"]
    assert manifest["metrics"]["accuracy"] > 0.7
    assert summary.published_uri == f"s3://{s3_env.bucket}/{prefix}/runs/{summary.run_id}"
    assert read_s3_json(s3_env, f"{prefix}/latest.json")["run_id"] == summary.run_id


@pytest.mark.s3
def test_compose_setup_prepares_bucket_pool_and_secrets_and_can_run_again(
    image,
    prefect_env,
    docker_objects,
    s3_server,
):
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_docker.worker import DockerWorkerJobConfiguration

    bucket = f"stack-{docker_objects}"
    pool = f"stack-{docker_objects}"
    values = {
        "PREFECT_API_URL": prefect_env["PREFECT_API_URL"],
        "PIPELINE_ARTIFACT_STORE": f"s3://{bucket}",
        "PIPELINE_S3_ENDPOINT_URL": s3_server.endpoint,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
        "PIPELINE_IMAGE": image,
        "STACK_POOL": pool,
        "STACK_NETWORK": "fashion-pipeline",
    }
    options = ["--network", "host", "--entrypoint", "python", "-w", "/stack"]
    options += ["-v", f"{REPO / 'docker' / 'stack_setup.py'}:/stack/stack_setup.py:ro"]
    for name in values:
        options += ["-e", name]
    env = {**os.environ, **values}
    try:
        for _ in range(2):  # as compose runs it on every `up`
            output = run_container(docker_objects, "stack_setup.py", options=options, env=env)
            assert f"work pool {pool} is ready" in output
        s3_server.client().head_bucket(Bucket=bucket)

        async def rendered_job() -> DockerWorkerJobConfiguration:
            async with get_client() as client:
                template = (await client.read_work_pool(pool)).base_job_template
                return await DockerWorkerJobConfiguration.from_template_and_values(
                    template, {}, client=client
                )

        with temporary_settings({PREFECT_API_URL: prefect_env["PREFECT_API_URL"]}):
            job = anyio.run(rendered_job)
        stored = json.dumps(api(prefect_env, "GET", f"/work_pools/{pool}"))
    finally:
        s3_server.client().delete_bucket(Bucket=bucket)
    # The pool holds references to Secret blocks; a worker's job gets the values.
    assert s3_server.secret_key not in stored
    assert job.env["AWS_SECRET_ACCESS_KEY"] == s3_server.secret_key
    assert job.env["AWS_ACCESS_KEY_ID"] == s3_server.access_key
    assert job.env["PIPELINE_ARTIFACT_STORE"] == f"s3://{bucket}"
    assert job.image == image
    assert job.networks == ["fashion-pipeline"]
    assert job.container_create_kwargs == {"entrypoint": []}


def compose(*args: str, env_file: Path) -> subprocess.CompletedProcess:
    executable = shutil.which("docker-compose")
    if executable is None:
        pytest.skip("docker-compose not found (Debian: apt-get install docker-compose)")
    # Only the env file speaks: nothing from this process's environment is interpolated.
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
    return subprocess.run(
        [executable, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_compose_file_validates_and_starts_the_stack_in_order():
    result = compose("config", env_file=ENV_EXAMPLE)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert set(services) == {"seaweedfs", "prefect-server", "setup", "worker", "pipeline"}

    for name, service in services.items():
        repository, _, tag = service["image"].rpartition(":")
        assert repository and tag and tag != "latest", f"{name}: image {service['image']!r}"
    for name in ("seaweedfs", "prefect-server", "worker"):
        assert services[name]["healthcheck"]["test"], name

    def conditions(name: str) -> dict[str, str]:
        return {dep: spec["condition"] for dep, spec in services[name]["depends_on"].items()}

    healthy = "service_healthy"
    assert conditions("setup") == {"seaweedfs": healthy, "prefect-server": healthy}
    assert conditions("worker")["setup"] == "service_completed_successfully"
    assert conditions("pipeline") == {
        "seaweedfs": healthy,
        "prefect-server": healthy,
        "worker": healthy,
        "setup": "service_completed_successfully",
    }
    assert any(
        volume.startswith("/var/run/docker.sock:") for volume in services["worker"]["volumes"]
    )
    assert services["pipeline"]["environment"]["PIPELINE_ARTIFACT_STORE"].startswith("s3://")


def test_compose_credentials_come_only_from_the_env_file(tmp_path):
    example = dict(
        line.split("=", 1)
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    text = COMPOSE_FILE.read_text()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert example[name] not in text, f"{name}'s example value is written into compose.yaml"

    # Without the credentials, compose refuses to start and names what is missing.
    empty = tmp_path / "empty.env"
    empty.write_text("")
    result = compose("config", env_file=empty)
    assert result.returncode != 0
    assert "AWS_SECRET_ACCESS_KEY" in result.stderr or "AWS_ACCESS_KEY_ID" in result.stderr

    # The real env file is never committed.
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "docker/.env"], cwd=REPO, timeout=30
    ).returncode
    assert ignored == 0, "docker/.env is not ignored by git"
