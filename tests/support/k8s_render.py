"""Render the Kubernetes manifests offline and read what a container of them would run.

`render(kustomization)` runs `kubectl kustomize` and returns the objects. `container_run`
(pure) resolves one container of a rendered workload the way the kubelet starts it: image,
command and args (after `$(VAR)` expansion), the environment from `envFrom` and `env` with
Secret values and downward-API fields taken from the caller, the user, and the writable
volume mounts beside the read-only root filesystem. That is what running the container in
plain Docker needs. `render_flow_run_job` builds the Job the Prefect worker would submit for
a flow run, from the work pool's base job template and a deployment's job variables.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

K8S_DIR = Path(__file__).resolve().parents[2] / "k8s"
OVERLAYS = ("cpu", "gpu", "dev")
WORK_POOL_TEMPLATE = K8S_DIR / "work-pool" / "base-job-template.json"
JOB_UID_FIELD = "metadata.labels['batch.kubernetes.io/controller-uid']"
STAND_IN_JOB_UID = "0c7e9a52-5d1e-4d6b-9a43-2f0f8e1b7c11"

# Kubernetes expands $(NAME) in env values, command and args; "$$" is a literal "$".
_VAR_REF_RE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


class ManifestError(Exception):
    """The manifests (or the request for one of their containers) cannot be resolved."""


@dataclass(frozen=True)
class ContainerRun:
    """One container as the kubelet would start it."""

    image: str
    command: list[str] | None  # None: the image's ENTRYPOINT
    args: list[str] | None  # None: the image's CMD (or none, when command is set)
    env: dict[str, str]
    user: str | None  # "UID[:GID]" from the security contexts
    read_only_root: bool
    writable_paths: tuple[str, ...]  # emptyDir/volume mounts (tmpfs or volumes in Docker)
    ports: tuple[int, ...]


def tool_path(name: str) -> str:
    """A dev tool installed next to this interpreter (the venv), else one on PATH."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise ManifestError(
            f"{name} not found next to {sys.executable} or on PATH; install the dev "
            "dependencies (uv sync)"
        )
    return found


def render(kustomization: str | Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize` renders from a kustomization directory.

    A relative path is taken relative to k8s/, e.g. "overlays/cpu" or "mpijob".
    """
    directory = K8S_DIR / kustomization
    result = subprocess.run(
        [tool_path("kubectl"), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if result.returncode != 0:
        raise ManifestError(f"kubectl kustomize {directory} failed: {result.stderr.strip()}")
    return [obj for obj in yaml.safe_load_all(result.stdout) if obj]


def find_object(objects: list[dict[str, Any]], name: str, kind: str | None = None) -> dict:
    """The one object called `name` (of `kind`, where names repeat across kinds)."""
    matches = [
        obj
        for obj in objects
        if obj["metadata"].get("name") == name and kind in (None, obj["kind"])
    ]
    if len(matches) != 1:
        kinds = sorted(obj["kind"] for obj in matches)
        what = f"{kind} {name!r}" if kind else repr(name)
        raise ManifestError(f"expected one object {what}, found {len(matches)} {kinds}")
    return matches[0]


def pod_template(workload: Mapping[str, Any], replica: str | None = None) -> dict[str, Any]:
    """The pod template of a Deployment, StatefulSet, Job, CronJob or MPIJob (`replica`:
    "Launcher" or "Worker")."""
    kind, spec = workload["kind"], workload["spec"]
    if kind == "CronJob":
        return spec["jobTemplate"]["spec"]["template"]
    if kind == "MPIJob":
        replicas = spec["mpiReplicaSpecs"]
        if replica not in replicas:
            raise ManifestError(
                f"MPIJob replica must be one of {sorted(replicas)}, not {replica!r}"
            )
        return replicas[replica]["template"]
    if "template" not in spec:
        raise ManifestError(f"{kind} {workload['metadata'].get('name')!r} has no pod template")
    return spec["template"]


def pod_templates(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """("Kind/name[/replica]", pod template) of every workload among `objects`."""
    found = []
    for obj in objects:
        meta = obj["metadata"]
        where = f"{obj['kind']}/{meta.get('name') or meta.get('generateName')}"
        if obj["kind"] == "MPIJob":
            for replica in obj["spec"]["mpiReplicaSpecs"]:
                found.append((f"{where}/{replica}", pod_template(obj, replica)))
        elif obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob"):
            found.append((where, pod_template(obj)))
    return found


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(NAME) expansion; unknown names stay as they are."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR_REF_RE.sub(replace, text)


def _config_map_data(objects: list[dict[str, Any]], name: str) -> dict[str, str] | None:
    maps = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name]
    return dict(maps[0].get("data") or {}) if maps else None


def _source(
    kind: str, name: str, objects: list[dict[str, Any]], secrets: Mapping[str, Mapping[str, str]]
) -> Mapping[str, str] | None:
    if kind == "configMap":
        return _config_map_data(objects, name)
    return secrets.get(name)


def _resolve_env(
    spec: Mapping[str, Any],
    objects: list[dict[str, Any]],
    secrets: Mapping[str, Mapping[str, str]],
    fields: Mapping[str, str],
) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in spec.get("envFrom", []):
        kind = "configMap" if "configMapRef" in item else "secret"
        ref = item[f"{kind}Ref"]
        data = _source(kind, ref["name"], objects, secrets)
        if data is None:
            if ref.get("optional"):
                continue
            raise ManifestError(f"envFrom: no {kind} {ref['name']!r} given or rendered")
        env.update({item.get("prefix", "") + key: value for key, value in data.items()})
    for item in spec.get("env", []):
        name = item["name"]
        if "value" in item:
            env[name] = expand(item["value"], env)
            continue
        source = item.get("valueFrom", {})
        if "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            if path not in fields:
                raise ManifestError(f"env {name}: give a value for the field {path!r}")
            env[name] = fields[path]
            continue
        kind = "configMap" if "configMapKeyRef" in source else "secret"
        ref = source.get(f"{kind}KeyRef")
        if ref is None:
            raise ManifestError(f"env {name}: unsupported source {sorted(source)}")
        data = _source(kind, ref["name"], objects, secrets) or {}
        if ref["key"] in data:
            env[name] = data[ref["key"]]
        elif not ref.get("optional"):
            raise ManifestError(f"env {name}: no value for {kind} {ref['name']}/{ref['key']}")
    return env


def container_run(
    objects: list[dict[str, Any]],
    workload: str | Mapping[str, Any],
    *,
    kind: str | None = None,
    container: str | None = None,
    replica: str | None = None,
    secrets: Mapping[str, Mapping[str, str]] | None = None,
    fields: Mapping[str, str] | None = None,
) -> ContainerRun:
    """Resolve one container of a rendered workload.

    workload: the workload's name among `objects` (or the object itself); kind: its kind,
    where names repeat; container: its name, where the pod has several; replica: an MPIJob's
    "Launcher" or "Worker". secrets: {secret name: {key: value}} standing in for the Secrets
    (optional references to missing keys are left out, as Kubernetes does); fields: values of
    downward-API fieldRefs by fieldPath, e.g.
    {"metadata.annotations['batch.kubernetes.io/job-completion-index']": "0"};
    metadata.namespace defaults to the workload's namespace and a Job's controller-uid label
    to STAND_IN_JOB_UID. ConfigMaps come from `objects`.
    """
    obj = find_object(objects, workload, kind) if isinstance(workload, str) else workload
    pod = pod_template(obj, replica)["spec"]
    containers = pod["containers"]
    chosen = [c for c in containers if container in (None, c["name"])]
    if len(chosen) != 1:
        names = [c["name"] for c in containers]
        raise ManifestError(f"choose one container of {names}, not {container!r}")
    spec = chosen[0]
    namespace = obj["metadata"].get("namespace")
    known_fields = {"metadata.namespace": namespace} if namespace else {}
    if obj["kind"] in ("Job", "CronJob"):  # the Job controller labels its pods with its uid
        known_fields[JOB_UID_FIELD] = STAND_IN_JOB_UID
    env = _resolve_env(spec, objects, secrets or {}, {**known_fields, **(fields or {})})

    def expanded(key: str) -> list[str] | None:
        return [expand(part, env) for part in spec[key]] if key in spec else None

    context = {**pod.get("securityContext", {}), **spec.get("securityContext", {})}
    user = None
    if "runAsUser" in context:
        group = context.get("runAsGroup")
        user = f"{context['runAsUser']}" + (f":{group}" if group is not None else "")
    writable = {
        volume["name"]
        for volume in pod.get("volumes", [])
        if {"emptyDir", "persistentVolumeClaim", "ephemeral"} & volume.keys()
    }
    # A StatefulSet's claim templates are volumes of its pods as well.
    claims = obj["spec"].get("volumeClaimTemplates", []) if obj["kind"] == "StatefulSet" else []
    writable |= {claim["metadata"]["name"] for claim in claims}
    return ContainerRun(
        image=spec["image"],
        command=expanded("command"),
        args=expanded("args"),
        env=env,
        user=user,
        read_only_root=bool(context.get("readOnlyRootFilesystem")),
        writable_paths=tuple(
            mount["mountPath"]
            for mount in spec.get("volumeMounts", [])
            if mount["name"] in writable and not mount.get("readOnly")
        ),
        ports=tuple(p["containerPort"] for p in spec.get("ports", [])),
    )


def render_flow_run_job(
    base_job_template: Mapping[str, Any],
    job_variables: Mapping[str, Any],
    flow_run_name: str = "sample-flow-run",
) -> dict[str, Any]:
    """The Job manifest the Prefect kubernetes worker submits for a flow run.

    As the worker does: the variables' defaults overlaid with the deployment's job variables
    fill the template's placeholders (prefect's `apply_values`), the worker's configuration
    model validates the result, and `prepare_for_flow_run` adds the flow run's environment,
    labels and command. Offline: no Prefect API and no cluster are contacted.
    """
    # Imported here: Prefect is slow to import and only this function needs it.
    from prefect.client.schemas.objects import FlowRun
    from prefect.utilities.templating import apply_values
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    properties = base_job_template["variables"]["properties"]
    # Variables without a default are left out, so that their placeholders drop their key.
    variables = {
        name: schema["default"]
        for name, schema in properties.items()
        if schema.get("default") is not None
    }
    variables.update(job_variables)
    populated = apply_values(copy.deepcopy(base_job_template["job_configuration"]), variables)
    configuration = KubernetesWorkerJobConfiguration(**populated)
    flow_run = FlowRun(id=uuid.uuid4(), flow_id=uuid.uuid4(), name=flow_run_name)
    configuration.prepare_for_flow_run(flow_run)
    return configuration.job_manifest
