"""The pipeline image: its size and user, the steps each in its own container, Horovod in
containers (a lost host, a resume from SeaweedFS), the MPI image, hadolint."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from pipeline.base.config import PipelineConfig
from tasks.dataset import prepare_dataset
from tests.support.containers import (
    CONTAINER_TIMEOUT_S,
    HADOLINT,
    MAX_IMAGE_BYTES,
    MIRROR,
    MIRROR_MOUNT,
    PIPELINE_UID,
    STEPS,
    last_line,
    read_s3_json,
    run_container,
    s3_step_environment,
)
from tests.support.docker import (
    BUILD_TIMEOUT_S,
    DEBIAN_DATA,
    IMAGE,
    LABEL,
    REPO,
    docker,
    image_size,
)
from tests.support.steps import trained

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
