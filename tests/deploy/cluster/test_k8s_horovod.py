"""Multi-pod Horovod on a real cluster: the Indexed Job `fashion-horovod` of k8s/base/horovod.yaml.

Two pods find each other by DNS (`<job>-<index>.<service>`), train over Gloo with no ssh, and
pod 0 publishes. The published model is compared with a local `np=2` training of the same
config (1e-5). Then the leader/worker policies: a lost worker pod is survived (pod 0 goes on
alone, the Job's success policy completes it), and a lost leader pod is retried and the new
gang resumes the Job's run from its checkpoint in the store.

The test cluster has one node with 2 CPUs: the Job's two pods cannot each reserve the 1 CPU
their manifest requests beside the store, so the test lowers the requests to 500m (limits
unchanged). Tier `cluster`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

from pipeline.base.config import PipelineConfig
from tasks import dataset
from tasks.train.step import train as train_step
from tests.support.docker import DEBIAN_DATA
from tests.support.k8s_deploy import (
    OVERLAY,
    RUN_TIMEOUT_S,
    Deployment,
    artifacts,
    job_log,
    job_outcome,
    job_pods,
    latest_run,
    set_config,
    store_key,
)
from tests.support.prefect_server import wait_for

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(2400)]

JOB = "fashion-horovod"
# Enough epochs that a pod can be lost in the middle of the training (np=2: ~1 s each here).
EPOCHS = 10
INDEX_LABEL = "batch.kubernetes.io/job-completion-index"


@pytest.fixture(scope="module")
def horovod(dev: Deployment) -> Iterator[Deployment]:
    config = dev.config
    set_config(dev, PIPELINE_EPOCHS=str(EPOCHS))
    try:
        yield dev
    finally:
        set_config(dev, PIPELINE_EPOCHS=config["PIPELINE_EPOCHS"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Mapping[str, np.ndarray]:
    """The np=2 model trained on this host, same seed and hyper-parameters as the pods."""
    home = tmp_path_factory.mktemp("np2-reference")
    config = PipelineConfig(
        epochs=EPOCHS,
        num_proc=2,
        mirrors=[DEBIAN_DATA.as_uri() + "/"],
        data_dir=home / "data",
        work_dir=home / "work",
        artifact_store=(home / "store").as_uri(),
        run_id="reference",
    )
    dataset.prepare_dataset(config)
    train_step(config)
    return load_params(config.run_dir() / "model" / "model.params")


def load_params(path: Path) -> dict[str, np.ndarray]:
    return {name: array.asnumpy() for name, array in mx.nd.load(str(path)).items()}


def create_horovod_job(dev: Deployment) -> str:
    """The README's `kubectl create -k … -l fashion-pipeline/manual-run=horovod`, requests
    lowered to fit the one 2-CPU node; the Job's uid (its run id)."""
    dev.kubectl("delete", "job", JOB, "--ignore-not-found", "--cascade=foreground")
    rendered = dev.cluster.kubectl(
        "create", "-k", str(OVERLAY), "-l", "fashion-pipeline/manual-run=horovod",
        "--dry-run=client", "-o", "json",
    )  # fmt: skip
    job = json.loads(rendered.stdout)
    for container in job["spec"]["template"]["spec"]["containers"]:
        container["resources"]["requests"]["cpu"] = "500m"
    dev.kubectl("create", "-f", "-", input=json.dumps(job))
    return dev.json("get", "job", JOB)["metadata"]["uid"]


def pod_of_index(dev: Deployment, index: int) -> str | None:
    pods = dev.json("get", "pods", "-l", f"job-name={JOB},{INDEX_LABEL}={index}")["items"]
    running = [p for p in pods if p["status"].get("phase") == "Running"]
    return running[0]["metadata"]["name"] if running else None


def checkpoint_epoch(dev: Deployment, run_id: str) -> int:
    """The epoch of the run's checkpoint pointer in the store (0: none yet)."""
    bucket, key = store_key(dev, f"runs/{run_id}/checkpoints/checkpoint.json")
    try:
        body = dev.s3().get_object(Bucket=bucket, Key=key)["Body"].read()
    except dev.s3().exceptions.NoSuchKey:
        return 0
    return json.loads(body)["epoch"]


def lose_pod_mid_training(dev: Deployment, run_id: str, index: int) -> int:
    """Force-delete the pod of `index` once the run has a checkpoint and before it ends; the
    epoch of that checkpoint."""
    wait_for(lambda: pod_of_index(dev, index), RUN_TIMEOUT_S, f"pod {index} to run", interval=0.5)
    epoch = wait_for(lambda: checkpoint_epoch(dev, run_id), RUN_TIMEOUT_S, "a checkpoint", 0.25)
    assert epoch < EPOCHS, "the training ended before a pod could be lost"
    dev.kubectl("delete", "pod", pod_of_index(dev, index), "--grace-period=0", "--force")
    return epoch


def published(dev: Deployment, run_id: str, tmp_path: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """The run's manifest and model, once `pipeline artifacts verify` re-hashed the run."""
    assert latest_run(dev) == run_id
    verified = artifacts(dev, "verify", run_id)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    bucket, prefix = store_key(dev, f"runs/{run_id}/")
    manifest = json.loads(
        dev.s3().get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read()
    )
    model = tmp_path / "model.params"
    dev.s3().download_file(bucket, prefix + "model/model.params", str(model))
    return manifest, load_params(model)


def assert_same_model(model: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]):
    assert model.keys() == reference.keys()
    for name in reference:
        np.testing.assert_allclose(model[name], reference[name], rtol=0, atol=1e-5, err_msg=name)


def test_two_pods_train_as_two_horovod_hosts_and_publish_the_np2_model(
    horovod, reference, tmp_path
):
    run_id = create_horovod_job(horovod)
    outcome = job_outcome(horovod, JOB)
    assert outcome == "Complete", job_log(horovod, JOB)[-4000:]
    status = horovod.json("get", "job", JOB)["status"]
    assert status.get("completedIndexes") == "0,1" and not status.get("failed"), status
    manifest, model = published(horovod, run_id, tmp_path)
    assert manifest["config"]["num_proc"] == 2 and manifest["config"]["worker_index"] == 0
    assert manifest["restarts"] == []
    assert_same_model(model, reference)


def test_a_lost_worker_pod_is_survived_and_the_job_completes(horovod, reference, tmp_path):
    run_id = create_horovod_job(horovod)
    lose_pod_mid_training(horovod, run_id, index=1)
    outcome = job_outcome(horovod, JOB)
    log = job_log(horovod, JOB)
    assert outcome == "Complete", log[-4000:]
    job = horovod.json("get", "job", JOB)
    conditions = {c["type"] for c in job["status"]["conditions"] if c["status"] == "True"}
    # Done by the success policy (index 0 succeeded), not by both indexes.
    assert "SuccessCriteriaMet" in conditions, job["status"]
    assert "0" in job["status"].get("completedIndexes", "").split(","), job["status"]
    manifest, model = published(horovod, run_id, tmp_path)
    (restart,) = manifest["restarts"]
    assert restart["num_proc"] == 1 and restart["from_epoch"] >= 1, restart
    assert_same_model(model, reference)


def test_a_lost_leader_pod_is_retried_and_resumes_from_the_store(horovod, reference, tmp_path):
    run_id = create_horovod_job(horovod)
    lost_at = lose_pod_mid_training(horovod, run_id, index=0)
    outcome = job_outcome(horovod, JOB)
    pods = job_pods(horovod, JOB)
    leader = [p for p in pods if p["metadata"]["labels"][INDEX_LABEL] == "0"]
    log = job_log(horovod, JOB)
    assert outcome == "Complete", log[-4000:]
    # The new pod 0 continued the Job's run from the store, never from scratch.
    (new_leader,) = leader
    leader_log = horovod.kubectl("logs", new_leader["metadata"]["name"]).stdout
    restored = re.search(r"restored the checkpoint of epoch (\d+) from s3://", leader_log)
    assert restored and int(restored[1]) >= lost_at, leader_log[-4000:]
    status = horovod.json("get", "job", JOB)["status"]
    assert status.get("failed", 0) >= 1 and not status.get("failedIndexes"), status
    manifest, model = published(horovod, run_id, tmp_path)
    assert manifest["config"]["num_proc"] == 2
    assert_same_model(model, reference)
