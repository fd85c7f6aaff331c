"""The dev overlay deployed on a real cluster the way k8s/README.md tells a user to, and what
the cluster tests read back: Jobs, pods, logs and the S3 store (through `kubectl
port-forward`, with boto3 and the pipeline's own `pipeline artifacts` CLI).

Where the test cluster lacks what a cluster's owner would provide, the tests provide it: a
PersistentVolume for SeaweedFS's claim where no default StorageClass exists, and a
Fashion-MNIST mirror inside the namespace (pods here cannot reach the public ones; the
ConfigMap's PIPELINE_MIRRORS points at it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
import yaml
from botocore.config import Config

from tests.support.docker import DEBIAN_DATA
from tests.support.k8s_cluster import KUBECTL, Cluster
from tests.support.k8s_render import K8S_DIR, find_object, render
from tests.support.prefect_server import wait_for

NAMESPACE = "fashion-pipeline"
OVERLAY = Path(os.environ.get("PIPELINE_TEST_K8S_OVERLAY", K8S_DIR / "overlays" / "dev"))
MIRROR_MANIFEST = Path(__file__).parent / "cluster" / "dataset-mirror.yaml"
MIRROR_URL = "http://fashion-mnist-mirror:8080/"
# Stand-ins for the Secret's values (k8s/secrets/s3.example.env lists its keys).
S3_SECRET = {"AWS_ACCESS_KEY_ID": "cluster-test-key", "AWS_SECRET_ACCESS_KEY": "cluster-test-pw"}
PIPELINE = str(Path(sys.executable).with_name("pipeline"))
UID = "10001"
RUN_TIMEOUT_S = 300
READY_TIMEOUT_S = 180


@dataclass(frozen=True)
class Deployment:
    """The applied dev overlay and a way into its S3 store from this host."""

    cluster: Cluster
    applied: str  # what `kubectl apply` printed
    objects: list[dict]  # the overlay, rendered
    store_uri: str  # s3://BUCKET/PREFIX of the ConfigMap
    s3_env: dict[str, str]  # environment of a `pipeline artifacts` call through the forward

    def kubectl(self, *args: str, **options) -> subprocess.CompletedProcess:
        return self.cluster.kubectl("-n", NAMESPACE, *args, **options)

    def json(self, *args: str) -> dict:
        return self.cluster.json("-n", NAMESPACE, *args)

    @property
    def config(self) -> dict[str, str]:
        """The overlay's ConfigMap, as rendered (the pipeline's settings before any patch)."""
        return find_object(self.objects, "fashion-pipeline-config", "ConfigMap")["data"]

    def s3(self):
        return boto3.client(
            "s3",
            endpoint_url=self.s3_env["PIPELINE_S3_ENDPOINT_URL"],
            aws_access_key_id=S3_SECRET["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_SECRET["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
        )


# --- what the cluster's owner provides ---------------------------------------------------------


def provide_storage(cluster: Cluster, claims: int) -> None:
    """Where no StorageClass is the default (this cluster has no provisioner), a hostPath
    PersistentVolume per claim, as an administrator would provision them."""
    classes = cluster.json("get", "storageclass")["items"]
    default = "storageclass.kubernetes.io/is-default-class"
    if any(c["metadata"].get("annotations", {}).get(default) == "true" for c in classes):
        return
    if cluster.state_dir is None:
        pytest.fail("your cluster has no default StorageClass for SeaweedFS's volume claim")
    for index in range(claims):
        path = cluster.state_dir / "volumes" / f"store-{index}"
        path.mkdir(parents=True)
        os.chown(path, int(UID), int(UID))
        volume = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {"name": f"fashion-pipeline-test-{index}"},
            "spec": {
                "capacity": {"storage": "10Gi"},
                "accessModes": ["ReadWriteOnce"],
                "hostPath": {"path": str(path), "type": "Directory"},
            },
        }
        cluster.kubectl("apply", "-f", "-", input=json.dumps(volume))


def pipeline_image(deployment: Deployment) -> str:
    """The pipeline image the overlay runs (its test servers run it too)."""
    cronjob = find_object(deployment.objects, "fashion-pipeline-nightly", "CronJob")
    return cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["image"]


def server_manifest(deployment: Deployment, path: Path) -> str:
    """A test server's manifest (its first object a Deployment) running the pipeline image."""
    objects = list(yaml.safe_load_all(path.read_text()))
    objects[0]["spec"]["template"]["spec"]["containers"][0]["image"] = pipeline_image(deployment)
    return "\n---\n".join(map(yaml.safe_dump, objects))


def port_forward(cluster: Cluster, service: str, local: int, remote: int) -> list[str]:
    """`kubectl port-forward` of a Service of the namespace to 127.0.0.1:`local`."""
    return [
        str(KUBECTL), "--kubeconfig", str(cluster.kubeconfig), "-n", NAMESPACE,
        "port-forward", "--address", "127.0.0.1", f"svc/{service}", f"{local}:{remote}",
    ]  # fmt: skip


def start_mirror(deployment: Deployment) -> None:
    """The test's dataset mirror in the namespace, serving Debian's copy of the data set."""
    deployment.kubectl("apply", "-f", "-", input=server_manifest(deployment, MIRROR_MANIFEST))
    deployment.kubectl(
        "rollout",
        "status",
        "deploy/fashion-mnist-mirror",
        f"--timeout={READY_TIMEOUT_S}s",
        timeout=READY_TIMEOUT_S + 10,
    )
    (pod,) = deployment.kubectl(
        "get", "pod", "-l", "app.kubernetes.io/name=fashion-mnist-mirror", "-o", "name"
    ).stdout.split()
    for path in sorted(DEBIAN_DATA.glob("*.gz")):
        deployment.kubectl(
            "exec",
            "-i",
            pod,
            "--",
            "sh",
            "-c",
            f"cat > /srv/mirror/{path.name}",
            input=path.read_bytes(),
        )
    set_config(deployment, PIPELINE_MIRRORS=json.dumps([MIRROR_URL]))


def deploy_dev(cluster: Cluster, home: Path, store_port: int) -> Deployment:
    """README "Deploy" steps 2-5 with the dev overlay, plus the test's dataset mirror."""
    objects = render(OVERLAY)
    applied = cluster.kubectl("apply", "-k", str(OVERLAY), "-l", "!fashion-pipeline/manual-run")
    secret_file = home / "s3.env"  # as k8s/secrets/s3.example.env tells a user to write it
    secret_file.write_text("".join(f"{k}={v}\n" for k, v in S3_SECRET.items()))
    create_secret = ["create", "secret", "generic", "fashion-pipeline-s3"]
    cluster.kubectl("-n", NAMESPACE, *create_secret, f"--from-env-file={secret_file}")
    store_uri = find_object(objects, "fashion-pipeline-config", "ConfigMap")["data"][
        "PIPELINE_ARTIFACT_STORE"
    ]
    s3_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PIPELINE_"))},
        **S3_SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "PIPELINE_ARTIFACT_STORE": store_uri,
        "PIPELINE_S3_ENDPOINT_URL": f"http://127.0.0.1:{store_port}",
    }
    deployment = Deployment(cluster, applied.stdout, objects, store_uri, s3_env)
    provide_storage(cluster, claims=1)
    start_mirror(deployment)
    wait = [f"--timeout={READY_TIMEOUT_S}s"]
    deployment.kubectl(
        "rollout", "status", "statefulset/seaweedfs", *wait, timeout=READY_TIMEOUT_S + 10
    )
    return deployment


def store_answers(deployment: Deployment) -> bool:
    try:
        deployment.s3().list_buckets()
        return True
    except Exception:
        return False


# --- jobs, pods and the store ------------------------------------------------------------------


def job_outcome(deployment: Deployment, job: str, timeout: float = RUN_TIMEOUT_S) -> str:
    """ "Complete" or "Failed", once the Job has one of these conditions."""

    def finished() -> str | None:
        conditions = deployment.json("get", "job", job).get("status", {}).get("conditions", [])
        done = [c["type"] for c in conditions if c["status"] == "True"]
        return next((c for c in ("Complete", "Failed") if c in done), None)

    return wait_for(finished, timeout, f"job {job} to complete or fail", interval=2)


def job_pods(deployment: Deployment, job: str) -> list[dict]:
    selector = f"batch.kubernetes.io/job-name={job}"
    return deployment.json("get", "pods", "-l", selector)["items"]


def pod_log(deployment: Deployment, pod: dict) -> str:
    return deployment.kubectl("logs", pod["metadata"]["name"]).stdout


def job_log(deployment: Deployment, job: str) -> str:
    return "".join(pod_log(deployment, pod) for pod in job_pods(deployment, job))


def store_key(deployment: Deployment, name: str) -> tuple[str, str]:
    bucket, _, prefix = deployment.store_uri.removeprefix("s3://").partition("/")
    return bucket, f"{prefix}/{name}" if prefix else name


def latest_run(deployment: Deployment) -> str | None:
    bucket, key = store_key(deployment, "latest.json")
    s3 = deployment.s3()
    try:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except (s3.exceptions.NoSuchKey, s3.exceptions.NoSuchBucket):
        return None
    return json.loads(body)["run_id"]


def run_prefixes(deployment: Deployment) -> dict[str, set[str]]:
    """Every run id under runs/, with the names of its objects (relative to the run)."""
    bucket, prefix = store_key(deployment, "runs/")
    runs: dict[str, set[str]] = {}
    pages = deployment.s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    for page in pages:
        for item in page.get("Contents", []):
            run_id, _, name = item["Key"].removeprefix(prefix).partition("/")
            runs.setdefault(run_id, set()).add(name)
    return runs


def artifacts(deployment: Deployment, *args: str) -> subprocess.CompletedProcess:
    """`pipeline artifacts ARGS` against the cluster's store, from this host."""
    return subprocess.run(
        [PIPELINE, "artifacts", *args],
        env=deployment.s3_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_published_and_verified(deployment: Deployment, before: str | None) -> str:
    """latest.json names a new run, and every object of that run re-hashes to its manifest."""
    run_id = latest_run(deployment)
    assert run_id is not None and run_id != before, (before, run_id)
    verified = artifacts(deployment, "verify", run_id)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    return run_id


def create_run_once(dev: Deployment) -> None:
    """The README's manual run (after deleting a finished one, as it says)."""
    dev.kubectl(
        "delete", "job", "fashion-pipeline-once", "--ignore-not-found", "--cascade=foreground"
    )
    dev.cluster.kubectl("create", "-k", str(OVERLAY), "-l", "fashion-pipeline/manual-run=once")


def running_pod(dev: Deployment, job: str) -> str:
    def running() -> str | None:
        pods = [p for p in job_pods(dev, job) if p["status"].get("phase") == "Running"]
        return pods[0]["metadata"]["name"] if pods else None

    return wait_for(running, READY_TIMEOUT_S, f"a running pod of job {job}", interval=0.5)


def set_config(dev: Deployment, **data: str) -> None:
    dev.kubectl("patch", "configmap", "fashion-pipeline-config", "-p", json.dumps({"data": data}))


def training_run(dev: Deployment, published: set[str]) -> str | None:
    """A run that has stored a checkpoint pointer (it is training) and no manifest yet."""
    for run_id, names in run_prefixes(dev).items():
        pointer, manifest = "checkpoints/checkpoint.json" in names, "manifest.json" in names
        if run_id not in published and pointer and not manifest:
            return run_id
    return None
