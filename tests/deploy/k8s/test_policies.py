"""k8s/: every rendered workload meets the policies (images, resources, security, secrets,
labels), and each policy reports its breakage."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from tests.support.k8s_checks import (
    KUSTOMIZATIONS,
    image_problems,
    label_problems,
    resource_problems,
    secret_problems,
    security_problems,
)
from tests.support.k8s_render import (
    find_object,
    pod_template,
)

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
