"""k8s/work-pool/: the base job template Prefect accepts, and the flow-run Job it makes."""

from __future__ import annotations

import copy
import re

import pytest

from tests.support.k8s_checks import (
    KUBERNETES_VERSIONS,
    TEST_SECRETS,
    as_created,
    assert_all_passed,
    image_problems,
    resource_problems,
    secret_problems,
    security_problems,
    strict_validate,
)
from tests.support.k8s_render import (
    container_run,
    pod_template,
    render_flow_run_job,
)

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
