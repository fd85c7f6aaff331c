"""The deployment's doors (issue 15, item 12), checked offline on the files that deploy it.

- compose: the Prefect API requires basic auth and every client sends it; no service is
  privileged or mounts a host path but the worker's Docker socket and read-only repo files;
- the compose stack's docker work pool: what reaches the host through the worker's socket
  (image, volumes, networks, privileged, container options, command) is fixed, not a variable,
  and the variables schema refuses those names; rendered as the worker renders it;
- the Kubernetes work pool: no free image, command or service account;
- NetworkPolicies: default deny (Ingress and Egress) plus the allow rules; the Gloo rendezvous
  port and the MPI workers' sshd answer only their own job's pods;
- the MPI image: no sshd host key in any layer; one is made per container at start.
"""

from __future__ import annotations

import base64
import copy
import importlib.util
import json
import os
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.base.config import PipelineConfig
from tests.support import REPO
from tests.support.k8s_render import (
    K8S_DIR,
    WORK_POOL_TEMPLATE,
    ManifestError,
    find_object,
    pod_templates,
    render,
    render_flow_run_job,
)
from tests.support.prefect_server import PREFECT, SERVER_START_S, background, wait_for
from tests.support.seaweedfs import free_port

COMPOSE_FILE = REPO / "docker" / "compose.yaml"
ENV_EXAMPLE = REPO / "docker" / ".env.example"
DOCKERFILE = REPO / "docker" / "Dockerfile"
START_SSHD = REPO / "docker" / "start-sshd.sh"
PREFECT_YAML = REPO / "prefect.yaml"
IMAGE = "fashion-pipeline:0.1.0"
# What a hostile deployment would ask the docker worker (which holds the Docker socket) for.
HOSTILE_DOCKER_VARIABLES = {
    "privileged": True,
    "volumes": ["/:/host"],
    "container_create_kwargs": {"binds": ["/:/host"], "privileged": True},
    "network_mode": "host",
    "image": "attacker/root-shell:1",
    "command": "sh -c 'cat /host/etc/shadow'",
    "registry_credentials": {"username": "x"},
    "networks": ["host"],
}
HOSTILE_K8S_VARIABLES = {
    "image": "attacker/root-shell:1",
    "command": "sh -c 'env'",
    "service_account_name": "cluster-admin",
}


def compose_services() -> dict[str, dict[str, Any]]:
    """compose.yaml's services with its YAML anchors merged (as docker-compose reads them)."""
    return yaml.safe_load(COMPOSE_FILE.read_text())["services"]


def load_stack_setup():
    """docker/stack_setup.py as a module (it is run as a script in the stack's setup service)."""
    spec = importlib.util.spec_from_file_location("stack_setup", REPO / "docker" / "stack_setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rendered(kustomization: str) -> list[dict[str, Any]]:
    try:
        return render(kustomization)
    except ManifestError as exc:  # kubectl missing: say so (a failure in CI)
        pytest.skip(str(exc))


def schema_errors(variables: dict[str, Any], schema: dict[str, Any]) -> list[str]:
    """What `prefect deploy` (Prefect's job-variable validation) says about `variables`."""
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    try:
        validate(variables, schema, raise_on_error=True)
    except ValidationError as exc:
        return [str(exc)]
    return []


# ----------------------------------------------------------------------------- compose


def test_compose_prefect_api_requires_auth_and_every_client_sends_it() -> None:
    services = compose_services()
    server_env = services["prefect-server"]["environment"]
    required = server_env["PREFECT_SERVER_API_AUTH_STRING"]
    assert required.startswith("${PREFECT_AUTH_STRING:?"), required  # no default: must be set
    clients = [
        name for name, s in services.items() if "PREFECT_API_URL" in s.get("environment", {})
    ]
    assert set(clients) == {"setup", "worker", "pipeline"}
    for name in clients:
        assert services[name]["environment"]["PREFECT_API_AUTH_STRING"] == required, name
    example = dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if "=" in line
    )
    user, _, password = example["PREFECT_AUTH_STRING"].partition(":")
    assert user and "change-me" in password
    assert example["PREFECT_AUTH_STRING"] not in COMPOSE_FILE.read_text()


def status_of(url: str, auth: str | None = None, body: bytes | None = None) -> int:
    headers = {"Content-Type": "application/json"}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    request = urllib.request.Request(url, data=body, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.integration
def test_a_prefect_server_configured_as_compose_does_refuses_unauthenticated_clients(
    tmp_path: Path,
) -> None:
    """A real `prefect server start` with the compose service's setting: anonymous calls get
    401, the health check (compose's healthcheck) still answers, and a client configured as
    the compose clients are (PREFECT_API_AUTH_STRING) works."""
    auth = "admin:a-long-random-password"
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("PIPELINE_", "PREFECT_"))}
    server_env = {
        **inherited,
        "PREFECT_HOME": str(tmp_path),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_SERVER_API_AUTH_STRING": auth,
    }
    command = [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with background(command, server_env, tmp_path / "server.log") as server:

        def healthy() -> bool:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-2000:]
            try:
                return status_of(f"{url}/health") == 200
            except OSError:  # not listening yet
                return False

        wait_for(healthy, SERVER_START_S, "the Prefect server to answer /api/health")
        assert status_of(f"{url}/work_pools/filter", body=b"{}") == 401
        assert status_of(f"{url}/work_pools/filter", "admin:wrong", b"{}") == 401
        assert status_of(f"{url}/work_pools/filter", auth, b"{}") == 200

        client_env = {**inherited, "PREFECT_HOME": str(tmp_path / "client"), "PREFECT_API_URL": url}
        listing = [PREFECT, "work-pool", "ls"]
        anonymous = subprocess.run(listing, env=client_env, capture_output=True, timeout=120)
        assert anonymous.returncode != 0
        client_env["PREFECT_API_AUTH_STRING"] = auth
        authenticated = subprocess.run(
            listing, env=client_env, capture_output=True, text=True, timeout=120
        )
        assert authenticated.returncode == 0, authenticated.stderr


def test_compose_mounts_no_host_path_but_the_workers_socket_and_read_only_repo_files() -> None:
    services = compose_services()
    for name, service in services.items():
        assert not service.get("privileged"), name
        assert "cap_add" not in service and "pid" not in service, name
        assert service.get("network_mode") != "host", name
        for volume in service.get("volumes", []):
            source, target, *mode = volume.split(":")
            if source.startswith(("/", ".")):  # a bind mount of a host path
                allowed = (name, source) == ("worker", "/var/run/docker.sock") or (
                    source.startswith(".") and mode == ["ro"]
                )
                assert allowed, f"{name} mounts {volume}"
    assert services["worker"]["volumes"] == ["/var/run/docker.sock:/var/run/docker.sock"]


# ----------------------------------------------------------------------------- docker work pool


@pytest.fixture(scope="module")
def docker_pool() -> dict[str, Any]:
    stack_setup = load_stack_setup()
    config = PipelineConfig(artifact_store="s3://models", s3_endpoint_url="http://seaweedfs:8333")
    defaults = stack_setup.pool_defaults(config, IMAGE, "fashion-pipeline")
    return stack_setup.docker_pool_template(defaults)


def test_docker_pool_offers_nothing_that_reaches_the_host(docker_pool) -> None:
    schema = docker_pool["variables"]
    assert set(HOSTILE_DOCKER_VARIABLES).isdisjoint(schema["properties"])
    assert schema["additionalProperties"] is False
    for name, value in HOSTILE_DOCKER_VARIABLES.items():
        assert schema_errors({name: value}, schema), f"{name} was accepted"
    # What the stack's deployments do set is still accepted.
    deployments = yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
    for deployment in deployments:
        if deployment["work_pool"]["name"] == "fashion-docker":
            variables = deployment["work_pool"].get("job_variables", {})
            assert schema_errors(variables, schema) == [], deployment["name"]


def test_docker_pool_renders_fixed_values_whatever_a_deployment_asks(docker_pool) -> None:
    """As the worker renders a job: defaults, overlaid with the deployment's variables, fill
    the placeholders (Prefect's apply_values); the result is prefect-docker's own model."""
    from prefect.utilities.templating import apply_values
    from prefect_docker.worker import DockerWorkerJobConfiguration

    properties = docker_pool["variables"]["properties"]
    values = {k: v["default"] for k, v in properties.items() if v.get("default") is not None}
    values.update(HOSTILE_DOCKER_VARIABLES)  # ignored: no placeholder names them any more
    populated = apply_values(copy.deepcopy(docker_pool["job_configuration"]), values)
    job = DockerWorkerJobConfiguration(**populated)
    assert job.privileged is False
    assert job.volumes == ["fashion-cache:/cache"]
    assert job.image == IMAGE
    assert job.networks == ["fashion-pipeline"]
    assert job.network_mode is None
    assert job.container_create_kwargs == {"entrypoint": []}
    assert job.command is None  # the worker's own `prefect flow-run execute`


# ----------------------------------------------------------------------------- k8s work pool


def test_k8s_pool_has_no_free_image_command_or_service_account() -> None:
    template = json.loads(WORK_POOL_TEMPLATE.read_text())
    schema = template["variables"]
    assert "command" not in schema["properties"]
    assert "service_account_name" not in schema["properties"]
    assert set(schema["properties"]["image"]["enum"]) <= {IMAGE, f"{IMAGE}-gpu"}
    assert schema["additionalProperties"] is False
    for name, value in HOSTILE_K8S_VARIABLES.items():
        assert schema_errors({name: value}, schema), f"{name} was accepted"
    assert "{{ command }}" not in json.dumps(template["job_configuration"])

    job = render_flow_run_job(template, HOSTILE_K8S_VARIABLES)  # as the worker would
    pod = job["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "fashion-pipeline-run"
    assert pod["containers"][0]["args"] == ["prefect", "flow-run", "execute"]


def s3_secret_holders(objects: list[dict[str, Any]]) -> dict[str, list[str]]:
    """{pod template: its command} of every container that references the S3 Secret."""
    holders = {}
    for where, template in pod_templates(objects):
        for container in template["spec"]["containers"]:
            refs = [
                env["valueFrom"]["secretKeyRef"]["name"]
                for env in container.get("env", [])
                if "secretKeyRef" in env.get("valueFrom", {})
            ]
            sources = container.get("envFrom", [])
            refs += [source["secretRef"]["name"] for source in sources if "secretRef" in source]
            if "fashion-pipeline-s3" in refs:
                command = container.get("command", []) + container.get("args", [])
                holders[f"{where}/{container['name']}"] = command
    return holders


def test_only_pods_that_publish_get_the_s3_secret() -> None:
    """The Prefect worker and the MPI workers (sshd only) get none; every pod that holds it
    runs `pipeline run`, which publishes (the Indexed Job's other pods share host 0's one pod
    template), or is SeaweedFS itself (dev overlay)."""
    for kustomization in ("overlays/dev", "mpijob"):
        for where, command in s3_secret_holders(rendered(kustomization)).items():
            assert command == ["pipeline", "run"] or where.startswith("StatefulSet/seaweedfs"), (
                where,
                command,
            )
    holders = {
        **s3_secret_holders(rendered("overlays/cpu")),
        **s3_secret_holders(rendered("mpijob")),
    }
    assert not any(where.startswith("Deployment/fashion-pipeline-worker") for where in holders)
    assert not any(where.startswith("MPIJob/fashion-mpi/Worker") for where in holders)
    assert any(where.startswith("MPIJob/fashion-mpi/Launcher") for where in holders)


# ----------------------------------------------------------------------------- NetworkPolicies


def policies(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "NetworkPolicy"}


def only_pods_labelled(rules: list[dict[str, Any]], side: str, labels: dict[str, str]) -> bool:
    """Every rule admits only pods of this namespace that carry `labels`."""
    peers = [peer for rule in rules for peer in rule.get(side, [None])]
    return bool(peers) and all(
        peer is not None
        and set(peer) == {"podSelector"}
        and labels.items() <= peer["podSelector"]["matchLabels"].items()
        for peer in peers
    )


@pytest.mark.parametrize("overlay", ["overlays/cpu", "overlays/gpu", "overlays/dev"])
def test_every_overlay_denies_by_default_and_the_rendezvous_answers_only_its_job(
    overlay: str,
) -> None:
    objects = rendered(overlay)
    found = policies(objects)
    deny = found["fashion-pipeline-default-deny"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}

    egress = found["fashion-pipeline-egress"]["egress"]
    dns = [rule for rule in egress if {"port": 53, "protocol": "UDP"} in rule["ports"]]
    assert dns and all("to" in rule for rule in dns)

    horovod = {
        "app.kubernetes.io/name": "fashion-pipeline",
        "app.kubernetes.io/component": "horovod",
    }
    peers = found["fashion-horovod-peers"]
    assert peers["podSelector"]["matchLabels"] == horovod
    assert peers["policyTypes"] == ["Ingress", "Egress"]
    assert only_pods_labelled(peers["ingress"], "from", horovod)
    assert only_pods_labelled(peers["egress"], "to", horovod)
    job = find_object(objects, "fashion-horovod", "Job")
    containers = job["spec"]["template"]["spec"]["containers"]
    ports = [port["containerPort"] for c in containers for port in c.get("ports", [])]
    assert ports == [29400]
    # No other policy lets anything in to the training pods.
    for name, spec in found.items():
        selected = spec["podSelector"].get("matchLabels", {})
        if name != "fashion-horovod-peers" and "ingress" in spec:
            assert not selected.items() <= job["spec"]["template"]["metadata"]["labels"].items()


def test_dev_seaweedfs_answers_only_the_pipelines_pods_on_its_s3_port() -> None:
    spec = policies(rendered("overlays/dev"))["seaweedfs-s3-clients"]
    assert spec["policyTypes"] == ["Ingress"]
    assert only_pods_labelled(
        spec["ingress"], "from", {"app.kubernetes.io/name": "fashion-pipeline"}
    )
    assert [p["port"] for rule in spec["ingress"] for p in rule["ports"]] == [8333]


def test_mpi_workers_sshd_answers_only_the_mpijobs_pods() -> None:
    mpi = {"app.kubernetes.io/name": "fashion-pipeline", "app.kubernetes.io/component": "mpi"}
    spec = policies(rendered("mpijob"))["fashion-mpi-peers"]
    assert spec["podSelector"]["matchLabels"] == mpi
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert only_pods_labelled(spec["ingress"], "from", mpi)
    assert only_pods_labelled(spec["egress"], "to", mpi)


# ----------------------------------------------------------------------------- MPI image


def dockerfile_stages() -> dict[str, list[str]]:
    """The instructions of each stage (continuation lines joined, comments dropped)."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.startswith("#")]
    instructions = re.sub(r"\\\n", " ", "\n".join(lines)).splitlines()
    stages: dict[str, list[str]] = {}
    current = None
    for instruction in filter(str.strip, instructions):
        match = re.match(r"FROM \S+ AS (\S+)", instruction)
        if match:
            current = match.group(1)
            stages[current] = []
        elif current is not None:
            stages[current].append(instruction)
    return stages


def test_mpi_image_bakes_no_host_key_and_makes_one_at_start() -> None:
    mpi = dockerfile_stages()["mpi"]
    runs = [i for i in mpi if i.startswith("RUN ")]
    assert runs and not any("ssh-keygen" in run for run in runs), runs
    assert any("rm -rf" in run and "/etc/ssh/ssh_host_*" in run for run in runs)  # Debian's
    assert any("HostKey /tmp/ssh/" in run for run in runs)

    script = START_SSHD.read_text()
    assert re.search(r"^ssh-keygen .*-f /tmp/ssh/ssh_host_ed25519_key$", script, re.M)
    assert script.rstrip().splitlines()[-1].startswith("exec /usr/sbin/sshd")
    assert "!docker/start-sshd.sh" in (REPO / ".dockerignore").read_text().splitlines()

    mpijob = yaml.safe_load((K8S_DIR / "mpijob" / "mpijob.yaml").read_text())
    worker = mpijob["spec"]["mpiReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert worker["command"] == ["/usr/local/bin/start-sshd"]
