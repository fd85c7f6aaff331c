"""Faults caused for real (issue 15): a hung S3 endpoint, a full disk, a failed run's record and
its notification. Each test bounds its own time and stops what it started."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prefect import flow
from prefect.testing.utilities import prefect_test_harness

from pipeline import cli
from pipeline.base.config import PipelineConfig
from pipeline.base.errors import PipelineError
from pipeline.flow import StepFailed, StepRunner, training_pipeline
from tasks.evaluate.gate import QualityGateFailed, check_gate, quality_gate
from tasks.publish.failure import failures_reported
from tests.support.publish import make_run_dir
from tests.support.seaweedfs import free_port
from tests.support.steps import for_run

DEBIAN_MIRROR = "file:///usr/share/datasets/fashion-mnist/"


@pytest.fixture(scope="module")
def prefect_api() -> Iterator[None]:
    with prefect_test_harness(server_startup_timeout=300):  # a loaded CI machine is slow
        yield


class Receiver:
    """A real webhook receiver on 127.0.0.1: records every JSON body POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def apprise_url(self) -> str:
        return f"json://127.0.0.1:{self.httpd.server_address[1]}/hooks/pipeline"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        server.thread.join(timeout=10)


# --- item 3: every network call and every step has a deadline ---------------------------------


@pytest.mark.timeout(120)
def test_hung_s3_endpoint_ends_within_the_configured_deadline(
    hung_endpoint: str, fake_credentials: None, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("PIPELINE_S3_READ_TIMEOUT", "1")
    monkeypatch.setenv("PIPELINE_S3_MAX_ATTEMPTS", "2")
    start = time.monotonic()
    code = cli.main(
        [
            "artifacts",
            "--artifact-store",
            "s3://bucket/p",
            "--s3-endpoint-url",
            hung_endpoint,
            "list",
        ]
    )
    elapsed = time.monotonic() - start
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and err.startswith(
        f"error: cannot reach S3 endpoint {hung_endpoint}"
    )
    assert "gave up after 2 attempts" in err and "Read timeout" in err
    # 2 attempts x 1 s, plus standard mode's backoff (< 1 s per retry) and the imports.
    assert 2 <= elapsed < 15, elapsed


# Thread method: Prefect's own step timeout uses SIGALRM, which the signal method also uses.
@pytest.mark.timeout(600, method="thread")
def test_a_step_past_its_timeout_is_stopped_as_one_clear_failure(
    prefect_api: None,
    hung_endpoint: str,
    fake_credentials: None,
    data_uri: str,
    tmp_path: Path,
) -> None:
    """With S3 timeouts too generous to help (2 s x 10 attempts, plus backoff, per request),
    the publish step's own deadline of 3 s ends each attempt."""
    config = PipelineConfig(
        artifact_store="s3://bucket/p",
        s3_endpoint_url=hung_endpoint,
        s3_read_timeout=2,
        s3_max_attempts=10,
        publish_timeout=3,
        work_dir=tmp_path / "work",
        run_id="run-hung",
    )
    run_dir = make_run_dir(config, created=time.time())

    @flow(retries=0)
    def publish_only() -> None:
        StepRunner(for_run(config, data_uri, run_dir))("publish")

    start = time.monotonic()
    with pytest.raises(StepFailed, match="publish did not finish within its publish_timeout"):
        publish_only()
    elapsed = time.monotonic() - start
    # Prefect retries the publish task twice (10 s apart): three deadlines, two delays; one
    # attempt alone would take the S3 settings' 10 x 2 s plus backoff without the deadline.
    assert elapsed < 3 * 3 + 2 * 10 + 25, elapsed


# --- a failure leaves a record and can call someone -------------------------------------------


@pytest.mark.timeout(600, method="thread")
def test_a_failed_run_stores_failure_json_and_notifies(
    prefect_api: None, receiver: Receiver, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    config = PipelineConfig(
        offline=True,  # and an empty cache: the dataset step fails, as a real run would
        data_dir=tmp_path / "empty-cache",
        work_dir=tmp_path / "work",
        artifact_store=store.as_uri(),
        notify_url=receiver.apprise_url,
        dataset_timeout=60,
        run_id="run-fails",
    )
    with pytest.raises(PipelineError) as info:
        training_pipeline(config)
    record = json.loads((store / "runs" / "run-fails" / "failure.json").read_text())
    assert record["run_id"] == "run-fails" and record["step"] == "dataset"
    assert record["error"] == str(info.value) and record["error_type"] == type(info.value).__name__
    assert record["config"]["run_id"] == "run-fails"
    assert "notify_url" not in record["config"]  # a webhook URL is a credential
    assert record["started_at"] <= record["failed_at"]
    [message] = receiver.bodies
    assert message["title"] == "pipeline run run-fails failed in step dataset"
    assert str(info.value).splitlines()[0] in message["message"]
    assert "failure.json" in message["message"]


def test_a_missed_quality_gate_notifies(receiver: Receiver, tmp_path: Path) -> None:
    config = PipelineConfig(
        artifact_store=(tmp_path / "store").as_uri(),
        notify_url=receiver.apprise_url,
        run_id="run-below-gate",
    )
    metrics = {"accuracy": 0.5, "gate": quality_gate(0.5, 0.8)}
    with pytest.raises(QualityGateFailed), failures_reported(config, StepRunner(config)):
        check_gate(metrics)
    [message] = receiver.bodies
    assert message["title"] == "pipeline run run-below-gate missed the quality gate"
    record = json.loads((tmp_path / "store/runs/run-below-gate/failure.json").read_text())
    assert record["step"] == "gate" and record["rank"] is None


def test_a_receiver_that_is_down_never_hides_the_error(tmp_path: Path) -> None:
    config = PipelineConfig(
        artifact_store=(tmp_path / "store").as_uri(),
        notify_url=f"json://127.0.0.1:{free_port()}/nobody-listens",
        run_id="run-x",
    )
    start = time.monotonic()
    with pytest.raises(QualityGateFailed), failures_reported(config, StepRunner(config)):
        check_gate({"accuracy": 0.5, "gate": quality_gate(0.5, 0.8)})
    assert time.monotonic() - start < 30
    assert (tmp_path / "store/runs/run-x/failure.json").is_file()
