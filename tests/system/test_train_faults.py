"""Faults and attacks on the train step, each caused for real (issue 15, items 4, 5, 6, 10).

- secrets: a real training whose launcher holds AWS_SECRET_ACCESS_KEY and PREFECT_API_KEY; the
  ranks' own /proc/PID/environ and cmdline are read while they run;
- signals: a real SIGTERM to `pipeline step train` and a real SIGHUP to `pipeline run`, each
  started in its own session; every process they started must be gone, and --resume works;
- tampered checkpoints: pointers naming paths, a changed params file, a symlink, and a live
  pickle payload (it writes a marker file when unpickled) in place of the optimizer state;
- one run id, two runs: two real `pipeline step train` processes racing for one run directory.

Every wait is bounded; every process a test starts is stopped by the test, also on failure.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil
import pytest

from pipeline.base.config import ConfigError, PipelineConfig
from tasks.train.checkpoints import check_resumable
from tests.support.steps import trained
from tests.support.train import DEBIAN_MIRROR, history, rank_number, rank_processes, run_config

pytestmark = pytest.mark.integration  # trainings, signals and subprocesses

DEADLINE_S = 300  # bound of every wait for a training to reach a point
EXIT_S = 60  # bound of every wait for a signalled process (and all it started) to end
SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "s3cret-aws-value-4f1e",
    "AWS_ACCESS_KEY_ID": "AKIA-test-id-77",
    "PREFECT_API_KEY": "pnu_secret_prefect_key_91",
    "PREFECT_API_AUTH_STRING": "admin:s3cret-auth-string",
}
CLI = [sys.executable, "-m", "pipeline.cli"]


# ----------------------------------------------------------------------------- helpers


def clean_env(**extra: str) -> dict[str, str]:
    """This environment minus PIPELINE_* and Prefect API settings, plus `extra`."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("PIPELINE_", "PREFECT_API", "AWS_"))
    }
    return {**env, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra}


@contextmanager
def started(command: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """`command` in its own session (as a login shell's job is); on exit it and every process
    it started are killed, also when the test failed."""
    process = subprocess.Popen(
        command,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    seen: list[psutil.Process] = []
    process.seen = seen  # descendants recorded by descendants_of()
    try:
        yield process
    finally:
        for child in [*seen, *descendants_of(process)]:
            with suppress(psutil.NoSuchProcess):
                child.kill()
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=EXIT_S)


def descendants_of(process: subprocess.Popen) -> list[psutil.Process]:
    """Every live process `process` started (ranks start their own sessions: walk the tree)."""
    try:
        found = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    process.seen.extend(p for p in found if p not in process.seen)
    return found


def wait_for_first_epoch(process: subprocess.Popen, run_dir: Path) -> None:
    jsonl = run_dir / "metrics" / "train.jsonl"
    deadline = time.monotonic() + DEADLINE_S
    while not (jsonl.exists() and jsonl.read_text().strip()):
        assert time.monotonic() < deadline, "no epoch finished in time"
        assert process.poll() is None, f"ended before the signal: {process.communicate()}"
        time.sleep(0.2)


def still_alive(processes: list[psutil.Process]) -> list[str]:
    """Those of `processes` alive after EXIT_S at most, as 'pid cmdline'."""
    gone, alive = psutil.wait_procs(processes, timeout=EXIT_S)
    del gone
    return [f"{p.pid} {' '.join(p.cmdline())}" for p in alive if _not_zombie(p)]


def _not_zombie(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_error_line(stderr: str, pattern: str) -> None:
    assert "Traceback" not in stderr, stderr
    errors = error_lines(stderr)
    assert len(errors) == 1, stderr
    assert re.search(pattern, errors[0]), errors[0]
    # After it, at most log lines (Prefect's notice that its temporary server stopped at exit).
    after = stderr.splitlines()[stderr.splitlines().index(errors[0]) + 1 :]
    assert all(re.match(r"\d{4}-\d\d-\d\d [\d:,]+ INFO ", line) for line in after), after


def pointer_epoch(run_dir: Path) -> int:
    return json.loads((run_dir / "checkpoints" / "checkpoint.json").read_text())["epoch"]


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory: pytest.TempPathFactory, data_uri: str) -> Path:
    """A finished one-epoch run directory: the checkpoint the tampering tests start from."""

    work_dir = tmp_path_factory.mktemp("work")
    return trained(run_config(work_dir, "one", num_proc=1, epochs=1), data_uri)


def train_command(work_dir: Path, run_id: str, data_uri: str, *flags: str) -> list[str]:
    return CLI + [
        "step", "train", "--run-id", run_id, "--work-dir", str(work_dir), "--data-dir", data_uri.removeprefix("file://"),
        *flags,
    ]  # fmt: skip


# ----------------------------------------------------------------------------- item 4: secrets


def test_ranks_never_see_the_launchers_secrets(tmp_path: Path, data_uri: str) -> None:
    """The launcher holds credentials; its ranks' real environ and cmdline hold none."""
    run_dir = tmp_path / "work" / "secrets"
    command = train_command(tmp_path / "work", "secrets", data_uri, "--num-proc", "2")
    with started(command + ["--epochs", "200"], clean_env(**SECRETS)) as launcher:
        deadline = time.monotonic() + DEADLINE_S
        while len(ranks := rank_processes(run_dir)) < 2:
            assert time.monotonic() < deadline, "the ranks did not start in time"
            assert launcher.poll() is None, launcher.communicate()
            time.sleep(0.2)
        wait_for_first_epoch(launcher, run_dir)  # the ranks are well into training now
        assert psutil.Process(launcher.pid).environ()[
            "AWS_SECRET_ACCESS_KEY"
        ]  # the launcher has it
        for rank in ranks:
            environ, cmdline = rank.environ(), " ".join(rank.cmdline())
            assert rank_number(environ) in {"0", "1"}  # it is a rank, and readable
            leaked = {name for name in SECRETS if name in environ}
            leaked |= {
                name for name, value in SECRETS.items()
                if value in cmdline or any(value in v for v in environ.values())
            }  # fmt: skip
            assert leaked == set(), f"rank {rank.pid} holds {sorted(leaked)}"
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=EXIT_S)


# A stand-in for ssh to a remote host (this machine runs no sshd): it records the command line
# and environment it was given, exactly what `ps` and the remote side would see, then runs
# the remote command here, as `ssh HOST COMMAND` runs it there (options may follow the host).
LOOPBACK_SSH = """#!/bin/sh
printf 'ARGV %s\\n' "$*" >> {log}
env | sed 's/^/ENV /' >> {log}
host=
while [ $# -gt 0 ]; do
  case "$1" in
    -o|-p|-i) shift 2 ;;
    *) if [ -z "$host" ]; then host=$1; shift; else break; fi ;;
  esac
done
exec /bin/sh -c "$*"
"""
TRAIN_SCRIPT = (
    "import sys; from pipeline.base.config import PipelineConfig; "
    "from tests.support.steps import trained; "
    "print(trained(PipelineConfig.model_validate_json(sys.argv[1]), sys.argv[2]).as_uri())"
)


def test_ranks_started_over_ssh_get_no_secret_on_the_ssh_command_line(
    tmp_path: Path, data_uri: str
) -> None:
    """horovodrun writes its whole environment into each remote rank's ssh command line: the
    launcher must hand it the ranks' allow-listed environment, never the credentials."""
    shim, log = tmp_path / "bin", tmp_path / "ssh.log"
    shim.mkdir()
    (shim / "ssh").write_text(LOOPBACK_SSH.format(log=log))
    (shim / "ssh").chmod(0o755)
    # 127.0.0.2 is not one of this machine's names: horovodrun goes over "ssh".
    config = run_config(tmp_path / "work", "over-ssh", num_proc=2, hosts="127.0.0.2:2", epochs=1)
    env = clean_env(**SECRETS, PATH=f"{shim}:{os.environ['PATH']}")
    command = [sys.executable, "-c", TRAIN_SCRIPT, config.model_dump_json(), data_uri]
    with started(command, env) as launcher:
        out, err = launcher.communicate(timeout=DEADLINE_S)
        assert launcher.returncode == 0, err
    assert out.splitlines()[-1] == config.run_dir().resolve().as_uri()
    seen = log.read_text()
    rank_launches = [line for line in seen.splitlines() if "tasks.train.rank" in line]
    assert len(rank_launches) == 2 and all(line.startswith("ARGV ") for line in rank_launches)
    leaked = {name for name, value in SECRETS.items() if name in seen or value in seen}
    assert leaked == set(), f"the ssh command lines or environment hold {sorted(leaked)}"


# ----------------------------------------------------------------------------- item 5: signals


def test_sigterm_to_step_train_stops_every_rank_and_resume_continues(
    tmp_path: Path, data_uri: str
) -> None:
    work_dir, run_dir = tmp_path / "work", tmp_path / "work" / "term"
    command = train_command(work_dir, "term", data_uri, "--num-proc", "2", "--epochs", "200")
    with started(command, clean_env()) as step:
        wait_for_first_epoch(step, run_dir)
        started_processes = descendants_of(step)
        assert len([p for p in started_processes if p in rank_processes(run_dir)]) == 2
        step.send_signal(signal.SIGTERM)
        _, stderr = step.communicate(timeout=EXIT_S)
        assert step.returncode == 128 + signal.SIGTERM
        assert_one_error_line(stderr, r"terminated by SIGTERM")
        assert still_alive(started_processes) == []
        assert rank_processes(run_dir) == []

    done = pointer_epoch(run_dir)
    resumed = subprocess.run(
        train_command(work_dir, "term", data_uri, "--num-proc", "2", "--resume")
        + ["--epochs", str(done + 1)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert [r["epoch"] for r in history(run_dir)] == list(range(1, done + 2))


def test_sighup_to_pipeline_run_stops_ranks_and_prefects_server_and_resume_finishes(
    tmp_path: Path, data_dir: Path
) -> None:
    """A dropped ssh connection: SIGHUP to `pipeline run` while it trains, with Prefect's
    temporary API server (no PREFECT_API_URL) running as its child."""
    work_dir, run_dir = tmp_path / "work", tmp_path / "work" / "hup"
    store = (tmp_path / "store").as_uri()
    flags = [
        "--run-id", "hup", "--work-dir", str(work_dir), "--data-dir", str(data_dir),
        "--mirrors", DEBIAN_MIRROR, "--artifact-store", store, "--num-proc", "2",
    ]  # fmt: skip
    env = clean_env(PREFECT_HOME=str(tmp_path / "prefect"))
    with started(CLI + ["run", *flags, "--epochs", "200"], env) as run:
        wait_for_first_epoch(run, run_dir)
        started_processes = descendants_of(run)
        cmdlines = [" ".join(p.cmdline()) for p in started_processes]
        assert any("uvicorn" in c or "prefect" in c for c in cmdlines), cmdlines
        assert len([p for p in started_processes if p in rank_processes(run_dir)]) == 2
        run.send_signal(signal.SIGHUP)
        _, stderr = run.communicate(timeout=EXIT_S)
        assert run.returncode == 128 + signal.SIGHUP, stderr
        assert_one_error_line(stderr, r"terminated by SIGHUP")
        assert still_alive(started_processes) == []

    done = pointer_epoch(run_dir)
    resumed = subprocess.run(
        CLI + ["run", *flags, "--resume", "--epochs", str(done + 1)],
        env=env,
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert [r["epoch"] for r in history(run_dir)] == list(range(1, done + 2))
    assert (tmp_path / "store" / "runs" / "hup" / "manifest.json").exists()


# ----------------------------------------------------------------------------- item 6: checkpoints


def tampered_copy(one_epoch: Path, tmp_path: Path) -> tuple[PipelineConfig, Path]:
    """A copy of the one-epoch run under a fresh work dir, and its resume config."""
    config = run_config(tmp_path / "work", "one", num_proc=1, epochs=2, resume=True)
    shutil.copytree(one_epoch, config.run_dir())
    return config, config.run_dir() / "checkpoints"


def rewrite_pointer(checkpoints: Path, **changes) -> None:
    pointer = checkpoints / "checkpoint.json"
    pointer.write_text(json.dumps({**json.loads(pointer.read_text()), **changes}))


def test_the_untouched_checkpoint_is_resumable(one_epoch: Path, tmp_path: Path) -> None:
    config, _ = tampered_copy(one_epoch, tmp_path)
    assert check_resumable(config).epoch == 1


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"params": "/etc/passwd"}, r"checkpoint\.json is not a valid checkpoint pointer"),
        ({"params": "../../elsewhere/epoch-0001.params"}, r"not a valid checkpoint pointer"),
        ({"optimizer": "epoch-0001.params"}, r"not a valid checkpoint pointer"),
        ({"params": "epoch-0002.params"}, r"params must be 'epoch-0001.params'"),
        ({"best_params": "epoch-0000.params"}, r"not a valid checkpoint pointer"),
        ({"digests": {}}, r"digests must name exactly"),
    ],
    ids=["absolute", "dot-dot", "wrong-kind", "other-epoch", "best-elsewhere", "no-digests"],
)
def test_a_pointer_naming_anything_but_its_own_files_is_refused(
    one_epoch: Path, tmp_path: Path, changes: dict, message: str
) -> None:
    config, checkpoints = tampered_copy(one_epoch, tmp_path)
    rewrite_pointer(checkpoints, **changes)
    with pytest.raises(ConfigError, match=message) as raised:
        check_resumable(config)
    assert "\n" not in str(raised.value)


def test_a_changed_params_file_is_refused_with_one_error_line(
    one_epoch: Path, tmp_path: Path, data_uri: str
) -> None:
    config, checkpoints = tampered_copy(one_epoch, tmp_path)
    params = checkpoints / "epoch-0001.params"
    data = bytearray(params.read_bytes())
    data[-1] ^= 0xFF  # one weight changed, the NDArray header intact
    params.write_bytes(bytes(data))
    step = subprocess.run(
        train_command(config.work_dir, "one", data_uri, "--resume", "--epochs", "2"),
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
    )
    assert step.returncode == 1
    assert_one_error_line(step.stderr, r"epoch-0001\.params does not match the SHA-256")


def test_a_symlinked_checkpoint_file_is_never_followed(one_epoch: Path, tmp_path: Path) -> None:
    config, checkpoints = tampered_copy(one_epoch, tmp_path)
    outside = tmp_path / "outside.params"
    (checkpoints / "epoch-0001.params").rename(outside)
    (checkpoints / "epoch-0001.params").symlink_to(outside)  # same bytes, same digest
    with pytest.raises(ConfigError, match=r"is not a regular file"):
        check_resumable(config)


class _WritesMarker:
    """A pickle payload: unpickling it runs code (here: creates a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_in_place_of_the_optimizer_state_never_runs(
    one_epoch: Path, tmp_path: Path
) -> None:
    """The attacker writes the payload and a pointer that names it with its true digest; the
    old loader (Trainer.load_states, i.e. pickle.load) would run it: shown on a probe."""
    import hashlib

    from tasks.train import rank

    probe_marker, marker = tmp_path / "probe-ran", tmp_path / "payload-ran"
    pickle.loads(pickle.dumps(_WritesMarker(probe_marker)))
    assert probe_marker.exists(), "the payload is not live: the test would prove nothing"

    config, checkpoints = tampered_copy(one_epoch, tmp_path)
    payload = pickle.dumps(_WritesMarker(marker))
    (checkpoints / "epoch-0001.optimizer").write_bytes(payload)
    pointer = json.loads((checkpoints / "checkpoint.json").read_text())
    pointer["digests"]["epoch-0001.optimizer"] = hashlib.sha256(payload).hexdigest()
    (checkpoints / "checkpoint.json").write_text(json.dumps(pointer))

    with pytest.raises(ConfigError, match=r"epoch-0001\.optimizer is not an MXNet NDArray file"):
        check_resumable(config)  # the launcher, before any rank starts
    with pytest.raises(ConfigError, match=r"is not an MXNet NDArray file"):
        rank._read_restore_point(config.run_dir(), resume=True)  # rank 0, right before loading
    assert not marker.exists()


# ----------------------------------------------------------------------------- item 10: one run id


def test_two_runs_with_one_run_id_race_and_the_second_fails_at_once_naming_the_first(
    tmp_path: Path, data_uri: str
) -> None:
    work_dir, run_dir = tmp_path / "work", tmp_path / "work" / "twice"
    command = train_command(work_dir, "twice", data_uri, "--num-proc", "1", "--epochs", "2")
    with started(command, clean_env()) as first, started(command, clean_env()) as second:
        # Both start at once; whichever takes the lock trains, the other fails at once.
        deadline = time.monotonic() + DEADLINE_S
        while first.poll() is None and second.poll() is None:
            assert time.monotonic() < deadline, "neither run ended"
            time.sleep(0.05)
        loser, winner = (first, second) if first.poll() is not None else (second, first)
        _, loser_err = loser.communicate(timeout=EXIT_S)
        assert winner.poll() is None, "the loser ended only after the winner finished"
        assert loser.returncode == 1
        assert_one_error_line(
            loser_err, rf"run 'twice' .* is in use by pid {winner.pid}: another run with the same"
        )
        _, winner_err = winner.communicate(timeout=DEADLINE_S)
        assert winner.returncode == 0, winner_err
    assert [r["epoch"] for r in history(run_dir)] == [1, 2]  # the winner's run, untouched
    assert pointer_epoch(run_dir) == 2
