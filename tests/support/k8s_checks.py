"""Offline checks of the rendered manifests: the dev tools (kubectl, kubernetes-validate,
yamllint), strict validation, and the policies every workload must meet."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.k8s_render import (
    K8S_DIR,
    OVERLAYS,
    ManifestError,
    pod_template,
    pod_templates,
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
