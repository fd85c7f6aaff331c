"""The one typed configuration of the pipeline.

`PipelineConfig` holds every knob. It is built once (defaults < environment variables
`PIPELINE_*` < CLI flags), handed whole to the flow, to every step and, as a JSON file,
to every Horovod rank. Nothing else parses options.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlparse

from pydantic import AfterValidator, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pipeline.base.errors import PipelineError
from pipeline.base.uris import check_store_uri, to_uri

DEFAULT_MIRRORS = [
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    "file:///usr/share/datasets/fashion-mnist/",
]

MIRROR_SCHEMES = ("http", "https", "file")
# The hyper-parameters a sweep may vary, with their types: the sweep, its CLI flag and its
# deployment all read this one list.
SWEEPABLE: dict[str, type] = {"lr": float, "batch_size": int, "epochs": int}
# Horovod host syntax: "host:slots" items separated by commas, e.g. "localhost:2,node2:4".
_HOSTS_RE = re.compile(r"^[A-Za-z0-9_.\-]+:[1-9][0-9]*(,[A-Za-z0-9_.\-]+:[1-9][0-9]*)*$")


class ConfigError(PipelineError, ValueError):
    """A configuration value that cannot work; the message says which and why."""


def _check_mirror(uri: str) -> str:
    scheme = urlparse(uri).scheme
    if scheme not in MIRROR_SCHEMES:
        raise ValueError(
            f"mirror {uri!r} has unsupported scheme {scheme!r}; use one of {MIRROR_SCHEMES}"
        )
    return uri if uri.endswith("/") else uri + "/"


def _check_store(uri: str) -> str:
    check_store_uri(uri, ValueError)
    return uri.rstrip("/")


def _check_hosts(hosts: str | None) -> str | None:
    if hosts is not None and not _HOSTS_RE.match(hosts):
        raise ValueError(
            f"hosts {hosts!r} is not Horovod host syntax; expected HOST:SLOTS[,HOST:SLOTS...], "
            "e.g. localhost:2"
        )
    return hosts


MirrorURI = Annotated[str, AfterValidator(_check_mirror)]
StoreURI = Annotated[str, AfterValidator(_check_store)]


def _per_attempt(step: str, retried: bool) -> str:
    """The description of a `<step>_timeout`: a bound on each attempt, never on the total."""
    first = f"seconds each attempt of the {step} step may take before it is stopped"
    if not retried:
        return f"{first} (the step is not retried: its one attempt is the whole step)"
    return (
        f"{first}; the step is retried on a transient error and each retry gets as long "
        "again (not a bound on all attempts together)"
    )


class PipelineConfig(BaseSettings):
    """Every knob of the pipeline. Field descriptions are the CLI's help text."""

    model_config = SettingsConfigDict(
        env_prefix="PIPELINE_", extra="forbid", validate_assignment=True, frozen=False
    )

    # --- dataset ---
    mirrors: list[MirrorURI] = Field(
        default_factory=lambda: list(DEFAULT_MIRRORS),
        description="ordered download mirrors (http://, https://, file://); each file is tried "
        "on each mirror in turn until one serves bytes that match the pinned SHA-256",
    )
    data_dir: Path = Field(
        default=Path("~/.cache/fashion-pipeline/fashion-mnist").expanduser(),
        description="dataset cache directory; verified files are kept here and reused",
    )
    offline: bool = Field(
        default=False, description="use only the dataset cache; never contact a mirror"
    )
    download_timeout: float = Field(
        default=10.0, gt=0, description="connect and read timeout per request, seconds"
    )
    download_retries: int = Field(
        default=2, ge=0, le=10, description="retries per file per mirror, with backoff"
    )

    # --- training (the seed's hyper-parameters) ---
    epochs: int = Field(default=5, ge=1, description="training epochs")
    batch_size: int = Field(
        default=256, ge=1, description="global batch size, split across the Horovod processes"
    )
    lr: float = Field(default=0.1, gt=0, description="SGD learning rate")
    init_sigma: float = Field(
        default=0.01, gt=0, description="std-dev of the Normal weight initialisation"
    )
    seed: int = Field(default=0, ge=0, description="random seed (init and shuffling)")
    validation_fraction: float = Field(
        default=0.0,
        ge=0.0,
        lt=0.5,
        description="fraction of the training set held out for validation; when > 0 the best "
        "epoch by validation accuracy is kept as the model",
    )
    num_proc: int = Field(default=1, ge=1, description="number of Horovod processes (ranks)")
    hosts: Annotated[str | None, AfterValidator(_check_hosts)] = Field(
        default=None,
        description="Horovod hosts HOST:SLOTS[,...]; default localhost:NUM_PROC",
    )
    hostfile: Path | None = Field(
        default=None, description="Horovod hostfile (one 'host slots=N' per line)"
    )
    worker_index: int | None = Field(
        default=None,
        ge=0,
        description="multi-host training without ssh (Kubernetes Indexed Job): this host's index "
        "in --hosts; index 0 hosts Horovod's Gloo rendezvous, the others join it. Unset: "
        "horovodrun launches every rank",
    )
    rendezvous_port: int = Field(
        default=29400, ge=1, le=65535, description="port of the Gloo rendezvous on host 0"
    )
    resume: bool | Literal["auto"] = Field(
        default=False,
        description="resume training from the run's last complete checkpoint (the run "
        "directory's, else the artifact store's); 'auto' (PIPELINE_RESUME=auto): resume when "
        "the run has one, else start fresh, e.g. a retried Kubernetes pod of a fixed run id",
    )
    max_restarts: int = Field(
        default=2,
        ge=0,
        le=100,
        description="times a single-host training whose rank died is restarted, from its last "
        "complete checkpoint with the ranks that remain; 0: a dead rank fails the step",
    )
    keep_checkpoints: int = Field(
        default=2,
        ge=1,
        le=1_000_000,
        description="epochs whose checkpoint files the artifact store keeps for a run (the "
        "newest ones, plus whatever the last checkpoint pointer names, which --resume needs); "
        "older ones are deleted once a newer pointer is stored",
    )

    # --- artifacts and quality gate ---
    work_dir: Path = Field(
        default=Path("work"),
        description="local staging directory; each run works in WORK_DIR/RUN_ID",
    )
    artifact_store: StoreURI = Field(
        default="file://artifacts",
        description="where runs are published: file://PATH or s3://BUCKET/PREFIX",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="S3-compatible endpoint (else boto3's own AWS_ENDPOINT_URL / profile)",
    )
    create_bucket: bool = Field(
        default=False, description="create the S3 bucket if it does not exist"
    )
    s3_connect_timeout: float = Field(
        default=5.0, gt=0, le=600, description="seconds to open a connection to the S3 endpoint"
    )
    s3_read_timeout: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="seconds an S3 request may wait for the endpoint's next bytes; with "
        "s3_max_attempts this bounds every S3 call (a hung endpoint costs at most their product "
        "plus backoff)",
    )
    s3_max_attempts: int | None = Field(
        default=None,
        ge=1,
        le=10,
        description="attempts per S3 request (connection errors, timeouts, 5xx); default: "
        "boto3's own (AWS_MAX_ATTEMPTS, the profile's max_attempts, else 3)",
    )
    s3_call_deadline: float = Field(
        default=60.0,
        gt=0,
        le=86400,
        description="seconds one store call (a read, a write, a listing) may take in all, every "
        "attempt and backoff included, whatever s3_max_attempts says (keep it below the step "
        "timeouts: then a hung endpoint fails a step as a store error, not a timeout)",
    )
    # exclude: a webhook URL is a credential; it never goes into config.json, a manifest, a
    # failure record or a rank's environment.
    notify_url: str | None = Field(
        default=None,
        exclude=True,
        description="Apprise URL (json://, slack://, mailto://, ...) called when a run fails or "
        "misses the quality gate",
    )
    min_test_accuracy: float = Field(
        default=0.80,
        ge=0.0,
        le=1.0,
        description="quality gate: runs below this test accuracy are stored but never "
        "promoted to latest, and the flow run fails",
    )
    step_runner: Literal["inline", "deployments"] = Field(
        default="inline",
        description="inline: every step runs in this flow run's process; deployments: each "
        "step runs as its own flow run of --step-deployment (e.g. its own container on a "
        "Prefect docker work pool)",
    )
    # Each is Prefect's timeout of ONE attempt of the step's task: a retried step (dataset and
    # publish retry transient errors) gets it again, so it never bounds all attempts together.
    dataset_timeout: float = Field(default=1800, gt=0, description=_per_attempt("dataset", True))
    train_timeout: float = Field(
        default=24 * 3600,
        gt=0,
        description=_per_attempt("train", False),
    )
    evaluate_timeout: float = Field(default=3600, gt=0, description=_per_attempt("evaluate", False))
    publish_timeout: float = Field(default=3600, gt=0, description=_per_attempt("publish", True))
    step_start_timeout: float = Field(
        default=900,
        gt=0,
        description="deployments runner: seconds a step's flow run may wait to start (a worker "
        "to pick it up, an image to pull), on top of its step timeout times its attempts "
        "(and retry delays): the runner waits that long for the step's whole flow run",
    )
    step_deployment: str = Field(
        default="pipeline-step/step-docker",
        description="the per-step deployment (FLOW/DEPLOYMENT) that --step-runner deployments uses",
    )
    run_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
        description="run id; default: a new UTC timestamp-based id",
    )

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        if self.num_proc > self.batch_size:
            raise ValueError(
                f"num_proc={self.num_proc} is larger than batch_size={self.batch_size}: "
                "every process needs at least one sample per batch"
            )
        if self.hosts is not None:
            slots = sum(int(item.split(":")[1]) for item in self.hosts.split(","))
            if slots < self.num_proc:
                raise ValueError(
                    f"hosts {self.hosts!r} offer {slots} slots, fewer than num_proc={self.num_proc}"
                )
        if self.worker_index is not None:
            if self.hosts is None:
                raise ValueError("worker_index needs hosts: every host of the job, in index order")
            if self.worker_index >= len(self.hosts.split(",")):
                raise ValueError(
                    f"worker_index={self.worker_index} is outside hosts {self.hosts!r}"
                )
        if not self.mirrors and not self.offline:
            raise ValueError("no mirrors configured; give at least one or use offline mode")
        return self

    def is_coordinator(self) -> bool:
        """Whether this host holds rank 0 and so the model, and goes on to evaluate and publish:
        every single-host or launcher-driven run, and host 0 of a rendezvous job."""
        return self.worker_index in (None, 0)

    def store_options(self) -> dict[str, object]:
        """What the artifact store needs besides its URI (`open_store(uri, **options)`)."""
        return {
            "endpoint_url": self.s3_endpoint_url,
            "create_bucket": self.create_bucket,
            "timeouts": self.s3_timeouts(),
        }

    def s3_timeouts(self) -> tuple[float, float, int | None, float]:
        """(connect timeout, read timeout, attempts or None for boto3's) of every S3 request,
        and the deadline of a whole store call, whatever the attempts."""
        return (
            self.s3_connect_timeout,
            self.s3_read_timeout,
            self.s3_max_attempts,
            self.s3_call_deadline,
        )

    def step_timeout(self, step: str) -> float:
        """The seconds step `step` (dataset, train, evaluate, publish) may take."""
        return float(getattr(self, f"{step}_timeout"))

    def run_dir(self) -> Path:
        """The local working directory of this run (staging for publish)."""
        if self.run_id is None:
            raise ConfigError("run_id is not set yet; the flow assigns one at start")
        return self.work_dir / self.run_id

    # The URIs the steps exchange are functions of the config, so a step started on its own
    # (its own container, its own Kubernetes job) finds its inputs without being told.
    def data_uri(self) -> str:
        """The dataset cache the dataset step fills."""
        return to_uri(self.data_dir)

    def run_dir_uri(self) -> str:
        """The run directory the train step fills and evaluate and publish read."""
        # Resolved first, as the train step resolves it: a work dir named '~...' stays relative.
        return to_uri(self.run_dir().resolve())
