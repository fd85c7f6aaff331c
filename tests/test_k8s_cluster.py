"""The Kubernetes manifests on a real cluster, used the way k8s/README.md tells a user to.

The dev overlay is applied as the README's "Deploy" section says (standing objects, the S3
Secret from an env file); the test then plays the cluster's owner where this cluster has no
such service: a PersistentVolume for SeaweedFS's claim where no default StorageClass exists,
and a Fashion-MNIST mirror inside the namespace (pods here cannot reach the public ones; the
ConfigMap's PIPELINE_MIRRORS points at it). The store is read back through
`kubectl port-forward` with boto3 and the pipeline's own `pipeline artifacts` CLI.

Tier `cluster` (`pytest -m cluster`): the cluster comes from tests/k8s_cluster.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
import yaml
from botocore.config import Config

from tests.docker_support import DEBIAN_DATA
from tests.k8s_cluster import KUBECTL, Cluster, footprint_differences, host_footprint
from tests.prefect_server import background, wait_for
from tests.support.k8s_render import K8S_DIR, find_object, render
from tests.support.seaweedfs import free_port

# The first test's setup may build the images (minutes on a cold Docker cache).
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(2400)]

NAMESPACE = "fashion-pipeline"
OVERLAY = Path(os.environ.get("PIPELINE_TEST_K8S_OVERLAY", K8S_DIR / "overlays" / "dev"))
MIRROR_MANIFEST = Path(__file__).parent / "support" / "cluster" / "dataset-mirror.yaml"
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


def start_mirror(deployment: Deployment) -> None:
    """The test's dataset mirror in the namespace, serving Debian's copy of the data set."""
    image = find_object(deployment.objects, "fashion-pipeline-nightly", "CronJob")
    image = image["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["image"]
    objects = list(yaml.safe_load_all(MIRROR_MANIFEST.read_text()))
    objects[0]["spec"]["template"]["spec"]["containers"][0]["image"] = image
    deployment.kubectl("apply", "-f", "-", input="\n---\n".join(map(yaml.safe_dump, objects)))
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
    patch = {"data": {"PIPELINE_MIRRORS": json.dumps([MIRROR_URL])}}
    deployment.kubectl("patch", "configmap", "fashion-pipeline-config", "-p", json.dumps(patch))


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


@pytest.fixture(scope="module")
def dev(k8s_cluster: Cluster, tmp_path_factory) -> Iterator[Deployment]:
    """The dev overlay deployed as the README says, its store forwarded to 127.0.0.1."""
    if not DEBIAN_DATA.is_dir():
        pytest.skip(f"{DEBIAN_DATA} missing (Debian: apt-get install dataset-fashion-mnist)")
    own = k8s_cluster.state_dir is None
    if own and k8s_cluster.kubectl("get", "namespace", NAMESPACE, check=False).returncode == 0:
        pytest.fail(f"namespace {NAMESPACE} exists on your cluster; the tests create and delete it")
    home = tmp_path_factory.mktemp("k8s-dev")
    port = free_port()
    forward = [str(KUBECTL), "--kubeconfig", str(k8s_cluster.kubeconfig), "-n", NAMESPACE]
    forward += ["port-forward", "--address", "127.0.0.1", "svc/seaweedfs", f"{port}:8333"]
    try:
        deployment = deploy_dev(k8s_cluster, home, port)
        with background(forward, dict(os.environ), home / "port-forward.log"):
            wait_for(lambda: _answers(deployment), 60, "the store through kubectl port-forward")
            yield deployment
    finally:
        if own:  # a local cluster goes down whole at the end of the session
            k8s_cluster.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)


def _answers(deployment: Deployment) -> bool:
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
    try:
        body = deployment.s3().get_object(Bucket=bucket, Key=key)["Body"].read()
    except deployment.s3().exceptions.NoSuchKey:
        return None
    except deployment.s3().exceptions.NoSuchBucket:
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


# --- the tests ---------------------------------------------------------------------------------


def test_the_teardown_check_sees_a_running_cluster(k8s_cluster):
    """The check run after `cluster.sh down` (tests/k8s_cluster.py) can fail: while the cluster
    runs, it finds its processes, bridge, iptables chains and changed sysctls."""
    if k8s_cluster.state_dir is None:
        pytest.skip("your own cluster: nothing was brought up here, nothing is torn down")
    found = " ".join(
        footprint_differences(k8s_cluster.host_before, host_footprint(k8s_cluster.state_dir))
    )
    for trace in ("processes left behind", "kube-apiserver", "kubelet", "bridges left behind"):
        assert trace in found, found
    assert "KUBE-" in found and "sysctl " in found, found


def test_the_readme_apply_is_admitted_and_the_server_holds_the_manifests(dev):
    standing = [
        o
        for o in dev.objects
        if "fashion-pipeline/manual-run" not in o["metadata"].get("labels", {})
    ]
    # Every standing object went through validation, defaulting and admission...
    assert len(dev.applied.splitlines()) == len(standing), dev.applied
    assert all(line.endswith(" created") for line in dev.applied.splitlines()), dev.applied
    # ...and what the server stores, defaults included, is what the manifests say.
    diff = dev.cluster.kubectl(
        "diff", "-k", str(OVERLAY), "-l", "!fashion-pipeline/manual-run", check=False
    )
    assert diff.returncode == 0, diff.stdout[-3000:] + diff.stderr[-2000:]
    labels = dev.cluster.json("get", "namespace", NAMESPACE)["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"


def test_pod_security_admission_rejects_a_privileged_pod(dev):
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "privileged-probe"},
        "spec": {
            "containers": [
                {
                    "name": "probe",
                    "image": "fashion-pipeline:0.1.0",
                    "securityContext": {"privileged": True},
                }
            ]
        },
    }
    refused = dev.kubectl("apply", "-f", "-", input=json.dumps(pod), check=False)
    assert refused.returncode != 0
    assert 'violates PodSecurity "restricted:latest"' in refused.stderr, refused.stderr
    assert "privileged" in refused.stderr
    absent = dev.kubectl("get", "pod", "privileged-probe", check=False)
    assert absent.returncode != 0 and "NotFound" in absent.stderr


def create_run_once(dev: Deployment) -> None:
    """The README's manual run (after deleting a finished one, as it says)."""
    dev.kubectl("delete", "job", "fashion-pipeline-once", "--ignore-not-found", "--wait=true")
    dev.cluster.kubectl("create", "-k", str(OVERLAY), "-l", "fashion-pipeline/manual-run=once")


def running_pod(dev: Deployment, job: str) -> str:
    def running() -> str | None:
        pods = [p for p in job_pods(dev, job) if p["status"].get("phase") == "Running"]
        return pods[0]["metadata"]["name"] if pods else None

    return wait_for(running, READY_TIMEOUT_S, f"a running pod of job {job}", interval=0.5)


def test_run_once_runs_as_uid_10001_read_only_and_publishes_a_verified_run(dev):
    before = latest_run(dev)
    create_run_once(dev)
    pod = running_pod(dev, "fashion-pipeline-once")
    # The running container, as the kernel sees it: the image's user, a read-only root.
    probe = dev.kubectl(
        "exec", pod, "--", "sh", "-c", "id -u; touch /probe 2>&1; echo rc=$?", check=False
    )
    assert probe.stdout.splitlines()[0] == UID, probe.stdout + probe.stderr
    assert "Read-only file system" in probe.stdout and "rc=1" in probe.stdout, probe.stdout

    outcome = job_outcome(dev, "fashion-pipeline-once")
    log = job_log(dev, "fashion-pipeline-once")
    assert outcome == "Complete", log[-4000:]
    run_id = assert_published_and_verified(dev, before)
    assert f"published run {run_id}" in log
    listed = artifacts(dev, "list")
    assert run_id in listed.stdout, listed.stdout + listed.stderr


def scheduled_jobs(dev: Deployment) -> list[str]:
    """Jobs the CronJob's controller created on schedule (not `create job --from`)."""
    jobs = dev.json("get", "jobs")["items"]
    return [
        j["metadata"]["name"]
        for j in jobs
        if any(o["kind"] == "CronJob" for o in j["metadata"].get("ownerReferences", []))
        and "cronjob.kubernetes.io/instantiate" not in j["metadata"].get("annotations", {})
    ]


def test_the_cronjob_runs_on_demand_and_on_its_own_schedule(dev):
    cronjob = "cronjob/fashion-pipeline-nightly"
    schedule = dev.json("get", cronjob)["spec"]["schedule"]
    before = latest_run(dev)
    dev.kubectl("create", "job", f"--from={cronjob}", "nightly-by-hand")
    assert job_outcome(dev, "nightly-by-hand") == "Complete", job_log(dev, "nightly-by-hand")
    by_hand = assert_published_and_verified(dev, before)

    assert not scheduled_jobs(dev)
    every_minute = {"spec": {"schedule": "* * * * *"}}
    dev.kubectl("patch", cronjob, "-p", json.dumps(every_minute))
    try:
        (job, *_) = wait_for(lambda: scheduled_jobs(dev), 150, "the CronJob to fire", interval=2)
    finally:
        dev.kubectl("patch", cronjob, "-p", json.dumps({"spec": {"schedule": schedule}}))
    assert dev.json("get", cronjob)["spec"]["schedule"] == schedule
    assert job_outcome(dev, job) == "Complete", job_log(dev, job)
    assert_published_and_verified(dev, by_hand)


def set_config(dev: Deployment, **data: str) -> None:
    dev.kubectl("patch", "configmap", "fashion-pipeline-config", "-p", json.dumps({"data": data}))


def training_run(dev: Deployment, published: set[str]) -> str | None:
    """A run that has stored a checkpoint pointer (it is training) and no manifest yet."""
    for run_id, names in run_prefixes(dev).items():
        pointer, manifest = "checkpoints/checkpoint.json" in names, "manifest.json" in names
        if run_id not in published and pointer and not manifest:
            return run_id
    return None


def test_a_pod_killed_mid_training_is_retried_and_one_complete_run_is_published(dev):
    config = find_object(dev.objects, "fashion-pipeline-config", "ConfigMap")["data"]
    before = latest_run(dev)
    published = {r for r, names in run_prefixes(dev).items() if "manifest.json" in names}
    # Long enough a training to be caught in the middle (5 epochs take ~1 s here).
    set_config(dev, PIPELINE_EPOCHS="40")
    try:
        create_run_once(dev)
        first = running_pod(dev, "fashion-pipeline-once")
        killed = wait_for(lambda: training_run(dev, published), RUN_TIMEOUT_S, "training")
        dev.kubectl("delete", "pod", first, "--grace-period=0", "--force")
    finally:
        set_config(dev, PIPELINE_EPOCHS=config["PIPELINE_EPOCHS"])

    outcome = job_outcome(dev, "fashion-pipeline-once")
    status = dev.json("get", "job", "fashion-pipeline-once")["status"]
    assert outcome == "Complete", job_log(dev, "fashion-pipeline-once")[-4000:]
    # The Job's policy (backoffLimit 1) gave the run one more pod, and it was needed.
    assert status.get("failed") == 1 and status.get("succeeded") == 1, status
    run_id = assert_published_and_verified(dev, before)
    assert run_id != killed
    runs = run_prefixes(dev)
    # The killed run published nothing but its resumable checkpoints; only complete runs list.
    assert runs[killed] and all(name.startswith("checkpoints/") for name in runs[killed])
    complete = {r for r, names in runs.items() if "manifest.json" in names}
    assert complete == published | {run_id}
    listed = artifacts(dev, "list").stdout
    assert run_id in listed and killed not in listed, listed


def test_without_the_s3_secret_the_pod_fails_with_one_error_line(dev):
    secret = dev.json("get", "secret", "fashion-pipeline-s3")
    dev.kubectl("delete", "secret", "fashion-pipeline-s3")
    try:
        create_run_once(dev)
        outcome = job_outcome(dev, "fashion-pipeline-once")
    finally:
        restored = {k: secret[k] for k in ("apiVersion", "kind", "data", "type")}
        restored["metadata"] = {"name": "fashion-pipeline-s3"}
        dev.kubectl("apply", "-f", "-", input=json.dumps(restored))
    assert outcome == "Failed"
    pods = job_pods(dev, "fashion-pipeline-once")
    assert len(pods) == 2, [p["metadata"]["name"] for p in pods]  # the first try and its retry
    for pod in pods:
        log = pod_log(dev, pod)
        errors = [line for line in log.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "Traceback" not in log, log[-3000:]
        terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        assert terminated["exitCode"] != 0
