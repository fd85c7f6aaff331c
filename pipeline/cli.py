"""`pipeline`: the command line of the training pipeline.

Config flags are generated from `PipelineConfig`'s fields (their descriptions are the help
text), so a knob is declared once and appears as `--flag`, as `PIPELINE_FLAG` and as a flow
parameter. Every option may come before or after an action (`pipeline artifacts list
--artifact-store s3://b/p`). Errors a user can cause end in one `error: ...` line and a
non-zero exit; SIGTERM and SIGHUP stop the run like Ctrl-C: ranks stopped, nothing left behind.
The handlers live in `pipeline.commands`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

from pipeline import commands
from pipeline.base.config import SWEEPABLE, PipelineConfig
from pipeline.base.errors import PipelineError
from pipeline.base.text import PRINTABLE_FILTER, printable
from pipeline.prefect_server import DEFAULT_PORT

# Prefect's temporary server (used when no PREFECT_API_URL is set) would otherwise send usage
# telemetry at start; its heartbeat also races the fresh SQLite database ("database is locked").
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Its first start on a cold machine (migrations, first imports) takes longer than the default
# 20 s (measured: three times out of three on a fresh machine).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

# Which config fields each command takes (the rest would be ignored, so they are not offered).
DATA_FIELDS = ("mirrors", "data_dir", "offline", "download_timeout", "download_retries")
TRAIN_FIELDS = (
    "epochs", "batch_size", "lr", "init_sigma", "seed", "validation_fraction", "num_proc",
    "hosts", "hostfile", "worker_index", "rendezvous_port", "resume", "max_restarts",
    "keep_checkpoints",
)  # fmt: skip
STORE_FIELDS = (
    "artifact_store", "s3_endpoint_url", "create_bucket",
    "s3_connect_timeout", "s3_read_timeout", "s3_max_attempts", "s3_call_deadline",
)  # fmt: skip
STEP_TIMEOUT_FIELDS = (
    "dataset_timeout", "train_timeout", "evaluate_timeout", "publish_timeout",
    "step_start_timeout", "notify_url",
)  # fmt: skip
RUN_FIELDS = (
    DATA_FIELDS
    + TRAIN_FIELDS
    + ("work_dir",)
    + STORE_FIELDS
    + ("min_test_accuracy", "step_runner", "step_deployment", "run_id")
    + STEP_TIMEOUT_FIELDS
)
EVALUATE_FIELDS = DATA_FIELDS + (
    "work_dir", "s3_endpoint_url", "min_test_accuracy",
    "s3_connect_timeout", "s3_read_timeout", "s3_max_attempts", "s3_call_deadline",
)  # fmt: skip

DESCRIPTION = """\
Train the Fashion-MNIST softmax-regression classifier (MXNet Gluon + Horovod), evaluate it
against a quality gate and publish every artifact to a file:// or s3:// artifact store,
orchestrated by a Prefect flow. Every option is also an environment variable PIPELINE_<NAME>.
"""

EPILOG = """\
examples:
  pipeline run                                  the whole pipeline with the seed's settings
  pipeline run --epochs 1 --num-proc 2          two Horovod processes on this machine
  pipeline run --local-server                   record the run in a Prefect server that stays up
  pipeline server stop                          stop that server
  pipeline run --artifact-store s3://models/fashion --s3-endpoint-url http://127.0.0.1:8333
  pipeline dataset --offline                    check the dataset cache without any download
  pipeline artifacts list                       complete runs, newest first
  pipeline artifacts verify RUN_ID --artifact-store s3://models/fashion
  pipeline evaluate --model artifacts/runs/RUN_ID
"""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C, so every `finally` stops what it started."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _terminate(signum: int, frame: object) -> None:
    raise Terminated(signum)


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _add_config_flags(parser: argparse.ArgumentParser, fields: Sequence[str]) -> None:
    group = parser.add_argument_group(
        "configuration", "each flag overrides the environment variable PIPELINE_<NAME>"
    )
    for name in fields:
        info = PipelineConfig.model_fields[name]
        default = info.get_default(call_default_factory=True)
        shown = ", ".join(default) if isinstance(default, list) else default
        help_text = f"{info.description} (default: {shown}; env PIPELINE_{name.upper()})"
        # SUPPRESS: a flag not given leaves the environment's value (or the default) in place,
        # and a flag given before a sub-action is not reset by the action's own parser.
        kwargs: dict = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        annotation = info.annotation
        if annotation is bool or bool in typing.get_args(annotation):
            # A field that also takes a word (resume: auto) gets it from the environment.
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is list:
            kwargs.update(nargs="+", metavar="URI")
        else:
            kwargs["metavar"] = name.upper()
        group.add_argument(_flag(name), **kwargs)


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        field = err["loc"][0] if err["loc"] else None
        label = _flag(field) if field in PipelineConfig.model_fields else "config"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{label}: {msg}" if where else msg)
    return "; ".join(parts)


def _grid_item(text: str) -> tuple[str, list[float]]:
    name, _, values = text.partition("=")
    if name not in SWEEPABLE or not values:
        expected = " or ".join(f"{n}=V1,V2,..." for n in SWEEPABLE)
        raise argparse.ArgumentTypeError(f"{text!r}: expected {expected}")
    try:
        return name, [float(v) for v in values.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: values must be numbers") from None


# --- parser ---------------------------------------------------------------------------------

Adder = Callable[[str, Callable, Sequence[str]], argparse.ArgumentParser]


def _step_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "step",
        choices=["dataset", "train", "evaluate", "publish"],
        help="the step; it reads the dataset cache from --data-dir and the run directory "
        "WORK_DIR/RUN_ID from --work-dir and --run-id, as the flow's steps do",
    )


def _sweep_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--grid",
        type=_grid_item,
        action="append",
        required=True,
        metavar="NAME=V1,V2",
        help=f"a swept parameter and its values ({', '.join(SWEEPABLE)}); repeat per parameter",
    )
    sub.add_argument("--max-parallel", type=int, default=2, help="trainings at once (default 2)")


def _model_option(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--model", required=True, help="run directory: PATH, file://PATH or s3://BUCKET/…/runs/ID"
    )


def _artifacts_actions(sub: argparse.ArgumentParser) -> None:
    actions = sub.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, handler, positionals in commands.ARTIFACT_ACTIONS:
        action = actions.add_parser(name, help=handler.__doc__, description=handler.__doc__)
        action.set_defaults(action_handler=handler)
        for positional in positionals:
            action.add_argument(positional)
        _add_config_flags(action, STORE_FIELDS)  # options after the action, too


def _prefect_port_option(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--prefect-port",
        type=int,
        default=int(os.environ.get("PIPELINE_PREFECT_PORT", DEFAULT_PORT)),
        help=f"local Prefect server port (default {DEFAULT_PORT}; env PIPELINE_PREFECT_PORT)",
    )


def _run_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--local-server",
        action="store_true",
        help="report to a local Prefect server kept running in the background (started when "
        "none answers; `pipeline server stop` ends it) instead of a temporary one per run; "
        "ignored when PREFECT_API_URL is set",
    )
    _prefect_port_option(sub)


def _server_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("action", choices=["start", "stop", "status"])
    _prefect_port_option(sub)


def _serve_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--cron", default="0 2 * * *", help="cron schedule, UTC (default: 02:00)")
    sub.add_argument("--name", default="nightly", help="deployment name")


def build_parser() -> argparse.ArgumentParser:
    """The `pipeline` parser: one sub-command per handler of `pipeline.commands`."""
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    table = [
        ("run", commands.cmd_run, RUN_FIELDS, _run_options),
        ("step", commands.cmd_step, RUN_FIELDS, _step_options),
        ("sweep", commands.cmd_sweep, RUN_FIELDS, _sweep_options),
        ("dataset", commands.cmd_dataset, DATA_FIELDS, None),
        ("evaluate", commands.cmd_evaluate, EVALUATE_FIELDS, _evaluate_options),
        ("predict", commands.cmd_predict, ("s3_endpoint_url",), _predict_options),
        ("artifacts", commands.cmd_artifacts, STORE_FIELDS, _artifacts_actions),
        ("serve", commands.cmd_serve, RUN_FIELDS, _serve_options),
        ("server", commands.cmd_server, (), _server_options),
    ]
    for name, handler, fields, add_options in table:
        help_text = " ".join(handler.__doc__.split())
        sub = subcommands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        if fields:
            _add_config_flags(sub, fields)
        if add_options is not None:
            add_options(sub)
    return parser


def _evaluate_options(sub: argparse.ArgumentParser) -> None:
    _model_option(sub)
    sub.add_argument("--out", type=Path, help="report directory (default: under --work-dir)")


def _predict_options(sub: argparse.ArgumentParser) -> None:
    _model_option(sub)
    sub.add_argument("inputs", nargs="+", metavar="IMAGE", help="PNG/JPEG/IDX files")


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(PRINTABLE_FILTER)  # every line this process logs: no raw control bytes
    if not verbose:
        for chatty in ("httpx", "botocore", "boto3", "s3transfer"):
            logging.getLogger(chatty).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run one command, and turn what a user can cause into one `error:` line."""
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _terminate)
    try:
        return args.handler(args)
    except ValidationError as exc:
        print(f"error: {printable(_validation_message(exc))}", file=sys.stderr)
        return commands.EXIT_USAGE
    except PipelineError as exc:
        print(f"error: {printable(str(exc), keep_newlines=True)}", file=sys.stderr)
        return commands.EXIT_FAILED
    except Terminated as exc:
        print(f"error: terminated by {exc}; every process it started was stopped", file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
