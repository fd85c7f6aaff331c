"""The Kubernetes manifests on a real cluster, used the way k8s/README.md tells a user to:
apply, admission, a run once, the CronJob on demand and on its schedule, a pod killed
mid-training, a missing Secret.

Tier `cluster`: the cluster and the deployed dev overlay (`dev`) come from
tests/deploy/cluster/conftest.py (helpers: tests/support/k8s_cluster.py, k8s_deploy.py).
"""

from __future__ import annotations

import json
import re

import pytest

from tests.support.k8s_cluster import footprint_differences, host_footprint
from tests.support.k8s_deploy import (
    NAMESPACE,
    OVERLAY,
    RUN_TIMEOUT_S,
    UID,
    Deployment,
    artifacts,
    assert_published_and_verified,
    create_run_once,
    job_log,
    job_outcome,
    job_pods,
    latest_run,
    pod_log,
    run_prefixes,
    running_pod,
    set_config,
    training_run,
)
from tests.support.prefect_server import wait_for

# The first test's setup may build the images (minutes on a cold Docker cache).
pytestmark = [pytest.mark.cluster, pytest.mark.timeout(2400)]


# --- the tests ---------------------------------------------------------------------------------


def test_the_teardown_check_sees_a_running_cluster(k8s_cluster):
    """The check run after `cluster.sh down` (tests/support/k8s_cluster.py) can fail: while the
    cluster runs, it finds its processes, bridge, iptables chains and changed sysctls."""
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


def test_a_pod_killed_mid_training_is_retried_and_resumes_the_same_run(dev):
    config = dev.config
    before = latest_run(dev)
    published = {r for r, names in run_prefixes(dev).items() if "manifest.json" in names}
    # Long enough a training to be caught in the middle (5 epochs take ~1 s here). Kept until
    # the Job has ended: the retried pod reads the ConfigMap when it is created, and a resume
    # with fewer epochs than its checkpoint is (rightly) refused.
    set_config(dev, PIPELINE_EPOCHS="40")
    try:
        create_run_once(dev)
        job_uid = dev.json("get", "job", "fashion-pipeline-once")["metadata"]["uid"]
        first = running_pod(dev, "fashion-pipeline-once")
        killed = wait_for(lambda: training_run(dev, published), RUN_TIMEOUT_S, "training")
        dev.kubectl("delete", "pod", first, "--grace-period=0", "--force")
        outcome = job_outcome(dev, "fashion-pipeline-once")
    finally:
        set_config(dev, PIPELINE_EPOCHS=config["PIPELINE_EPOCHS"])

    status = dev.json("get", "job", "fashion-pipeline-once")["status"]
    log = job_log(dev, "fashion-pipeline-once")
    assert outcome == "Complete", log[-4000:]
    # The Job's policy (backoffLimit 1) gave the run one more pod, and it was needed.
    assert status.get("failed") == 1 and status.get("succeeded") == 1, status
    # The run is the Job's: the second pod continued it from its checkpoint in the store.
    assert killed == job_uid
    restored = re.search(r"restored the checkpoint of epoch (\d+) from s3://", log)
    assert restored and 1 <= int(restored[1]) < 40, log[-4000:]
    run_id = assert_published_and_verified(dev, before)
    assert run_id == job_uid
    # Nothing partial is left in the store: every run there is complete.
    runs = run_prefixes(dev)
    assert all("manifest.json" in names for names in runs.values()), runs.keys()
    assert set(runs) == published | {run_id}
    assert run_id in artifacts(dev, "list").stdout


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
