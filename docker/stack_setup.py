"""One-shot setup of the compose stack (docker/compose.yaml), run in the pipeline image.

What `docker-compose up` needs before the worker and the pipeline start, created or updated
(so a second `up` is harmless):
- the artifact store's S3 bucket (by the pipeline's own store, with create_bucket);
- the S3 credentials as Prefect Secret blocks;
- the docker work pool, whose job defaults fit the stack: the pipeline image and its
  entrypoint, the stack's network and volumes, the store settings, and the credentials as
  references to those Secret blocks (the pool never holds them in plain text). The image,
  volumes, network and container options are fixed, not variables, and `privileged` is off:
  the worker holds the Docker socket, so a deployment must not choose them.
The deployments of prefect.yaml are then registered on the pool by `prefect deploy`.
Reads: PIPELINE_ARTIFACT_STORE, PIPELINE_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, PIPELINE_IMAGE, STACK_POOL, STACK_NETWORK, PREFECT_API_URL.
"""

from __future__ import annotations

import os
from typing import Any

from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect_docker.worker import DockerWorker

from pipeline.base.config import PipelineConfig
from pipeline.base.store import open_store

# Secret block name per credential variable.
SECRET_BLOCKS = {
    "AWS_ACCESS_KEY_ID": "fashion-s3-access-key-id",
    "AWS_SECRET_ACCESS_KEY": "fashion-s3-secret-access-key",
}


# Job settings no deployment may choose: each could hand a flow run the host (privileged,
# host paths as volumes or binds through container_create_kwargs, the host's network) or run
# an image or command other than the pipeline's with the stack's credentials.
FIXED = (
    "image", "registry_credentials", "command", "networks", "network_mode", "volumes",
    "privileged", "container_create_kwargs",
)  # fmt: skip
SAFE_VALUES = {"privileged": False}


def pool_defaults(config: PipelineConfig, image: str, network: str) -> dict[str, Any]:
    """The job variables every flow run of the pool gets unless its deployment says otherwise."""
    return {
        "image": image,
        "image_pull_policy": "IfNotPresent",
        "networks": [network],
        "volumes": ["fashion-cache:/cache"],
        "auto_remove": True,
        # The image's entrypoint is `pipeline`; the worker's command is `prefect flow-run ...`.
        "container_create_kwargs": {"entrypoint": []},
        "env": {
            "PIPELINE_ARTIFACT_STORE": config.artifact_store,
            "PIPELINE_S3_ENDPOINT_URL": config.s3_endpoint_url,
            **{
                name: f"{{{{ prefect.blocks.secret.{block} }}}}"
                for name, block in SECRET_BLOCKS.items()
            },
        },
    }


def docker_pool_template(defaults: dict[str, Any]) -> dict[str, Any]:
    """prefect-docker's own base job template, with `defaults` as its variables' defaults,
    except that what could reach the host through the worker's Docker socket is fixed, not a
    variable: the FIXED names are written into the job configuration (from `defaults`, else
    the safe value in SAFE_VALUES, else left to the worker) and no longer offered, and the
    variables schema refuses any name it does not list."""
    template = DockerWorker.get_default_base_job_template()
    properties = template["variables"]["properties"]
    job = template["job_configuration"]
    for name, value in defaults.items():
        if name not in FIXED:
            properties[name]["default"] = value
    for name in FIXED:
        del properties[name]
        value = defaults.get(name, SAFE_VALUES.get(name))
        if value is None:
            job.pop(name)  # the worker's own default (its command, no network mode)
        else:
            job[name] = value
    template["variables"]["additionalProperties"] = False
    return template


def main() -> None:
    config = PipelineConfig(create_bucket=True)  # store and endpoint from PIPELINE_* variables
    open_store(config.artifact_store, **config.store_options()).ensure_writable()
    print(f"stack-setup: artifact store {config.artifact_store} is writable")

    for variable, block in SECRET_BLOCKS.items():
        Secret(value=os.environ[variable]).save(block, overwrite=True)
    pool = os.environ["STACK_POOL"]
    template = docker_pool_template(
        pool_defaults(config, os.environ["PIPELINE_IMAGE"], os.environ["STACK_NETWORK"])
    )
    with get_client(sync_client=True) as client:
        client.create_work_pool(
            WorkPoolCreate(name=pool, type="docker", base_job_template=template), overwrite=True
        )
    print(f"stack-setup: work pool {pool} is ready")


if __name__ == "__main__":
    main()
