"""The manifests rendered once a module, and the Job the Prefect worker would submit."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from tests.support.k8s_checks import KUSTOMIZATIONS, PREFECT_YAML, as_created, tool
from tests.support.k8s_render import (
    WORK_POOL_TEMPLATE,
    render,
    render_flow_run_job,
)


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Every kustomization, rendered once for the module."""
    tool("kubectl")
    return {name: render(name) for name in KUSTOMIZATIONS}


@pytest.fixture(scope="session")
def base_job_template() -> dict[str, Any]:
    return json.loads(WORK_POOL_TEMPLATE.read_text())


@pytest.fixture(scope="session")
def deployment_job_variables() -> dict[str, Any]:
    deployments = yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
    (deployment,) = [d for d in deployments if d["work_pool"]["name"] == "fashion-k8s"]
    return deployment["work_pool"]["job_variables"]


@pytest.fixture(scope="session")
def flow_run_job(base_job_template, deployment_job_variables) -> dict[str, Any]:
    """The Job the worker would submit for a flow run of the proposed deployment, with a
    sample command and environment on top of its job variables."""
    variables = {
        **deployment_job_variables,
        "command": "prefect flow-run execute",
        "env": {**deployment_job_variables.get("env", {}), "PIPELINE_EPOCHS": "1"},
    }
    return as_created(render_flow_run_job(base_job_template, variables))
