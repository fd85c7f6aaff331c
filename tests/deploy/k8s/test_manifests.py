"""k8s/: every overlay renders, passes strict validation and yamllint; the MPIJob matches
its vendored schema; the secret examples list every key (offline, in seconds)."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from typing import Any

import jsonschema
import pytest

from tests.support.k8s_checks import (
    KUBERNETES_VERSIONS,
    KUSTOMIZATIONS,
    MPIJOB_SCHEMA,
    as_kubernetes_objects,
    assert_all_passed,
    containers_of,
    strict_validate,
    tool,
)
from tests.support.k8s_render import (
    K8S_DIR,
    OVERLAYS,
    find_object,
)

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
