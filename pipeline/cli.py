"""`pipeline`: the command line of the training pipeline.

Config flags are generated from `PipelineConfig`'s fields (their descriptions are the help
text), so a knob is declared once and appears as `--flag`, as `PIPELINE_FLAG` and as a flow
parameter. Errors a user can cause end in one `error: ...` line and a non-zero exit.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import ValidationError

from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError

# Prefect's temporary server (used when no PREFECT_API_URL is set) would otherwise send usage
# telemetry at start; its heartbeat also races the fresh SQLite database ("database is locked").
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

EXIT_USAGE = 2
EXIT_FAILED = 1

# Which config fields each command takes (the rest would be ignored, so they are not offered).
DATA_FIELDS = ("mirrors", "data_dir", "offline", "download_timeout", "download_retries")
TRAIN_FIELDS = (
    "epochs",
    "batch_size",
    "lr",
    "init_sigma",
    "seed",
    "validation_fraction",
    "num_proc",
    "hosts",
    "hostfile",
    "worker_index",
    "rendezvous_port",
    "resume",
)
STORE_FIELDS = ("artifact_store", "s3_endpoint_url", "create_bucket")
RUN_FIELDS = (
    DATA_FIELDS
    + TRAIN_FIELDS
    + ("work_dir",)
    + STORE_FIELDS
    + ("min_test_accuracy", "step_runner", "step_deployment", "run_id")
)


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
        kwargs: dict = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        annotation = info.annotation
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is list:
            kwargs.update(nargs="+", metavar="URI")
        else:
            kwargs["metavar"] = name.upper()
        group.add_argument(_flag(name), **kwargs)


def _config_from(args: argparse.Namespace) -> PipelineConfig:
    overrides = {k: v for k, v in vars(args).items() if k in PipelineConfig.model_fields}
    return PipelineConfig(**overrides)


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"])
        field = err["loc"][0] if err["loc"] else None
        label = _flag(field) if field in PipelineConfig.model_fields else "config"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{label}: {msg}" if where else msg)
    return "; ".join(parts)


# --- commands -------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.flow import preflight, training_pipeline

    config = _config_from(args)
    preflight(config)  # bad input fails here, as one line, before Prefect starts a flow run
    summary = training_pipeline(config=config)
    if summary is None:
        print(f"host {config.worker_index}: contributed its Horovod ranks; host 0 publishes")
        return 0
    train_accuracy = "n/a" if summary.train_accuracy is None else f"{summary.train_accuracy:.4f}"
    print()
    print(f"run {summary.run_id}")
    print(f"  train accuracy  {train_accuracy}  (after epoch {config.epochs})")
    print(
        f"  test accuracy   {summary.test_accuracy:.4f}  (gate >= {summary.gate_threshold:.2f}: "
        f"{'passed' if summary.gate_passed else 'FAILED'})"
    )
    print(f"  published       {summary.published_uri}")
    steps = ", ".join(f"{name} {sec:.1f}s" for name, sec in summary.step_seconds.items())
    print(f"  step times      {steps}")
    return 0


def cmd_step(args: argparse.Namespace) -> int:
    from pipeline.flow import step_call

    config = _config_from(args)
    if config.run_id is None and args.step != "dataset":
        print("error: --run-id is required: it names the run the steps share", file=sys.stderr)
        return EXIT_USAGE
    step_task, step_args = step_call(args.step, config, args.data_uri, args.run_dir_uri)
    print(step_task.fn(*step_args))  # the step's output URI, the only line on stdout
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from pipeline.sweep import hyperparameter_sweep

    result = hyperparameter_sweep(
        grid=dict(args.grid), config=_config_from(args), max_parallel=args.max_parallel
    )
    print()
    for trial in result.trials:
        mark = "  <- best (by validation)" if trial.run_id == result.best.run_id else ""
        params = " ".join(f"{k}={v}" for k, v in trial.params.items())
        print(
            f"{params:40} val {trial.val_accuracy:.4f}  test {trial.test_accuracy:.4f}  "
            f"{trial.run_id}{mark}"
        )
    print(f"comparison plot: {result.plot}")
    return 0


def _grid_item(text: str) -> tuple[str, list[float]]:
    name, _, values = text.partition("=")
    if name not in ("lr", "batch_size", "epochs") or not values:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected lr=V1,V2,... or batch_size=... or epochs=..."
        )
    try:
        return name, [float(v) for v in values.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: values must be numbers") from None


def cmd_dataset(args: argparse.Namespace) -> int:
    from tasks import dataset

    data_uri = dataset.prepare_dataset(_config_from(args))
    record = dataset.read_record(data_uri)
    print(f"dataset ready at {data_uri}")
    for name, info in record["files"].items():
        print(f"  {name:28} sha256 {info['sha256'][:16]}…  from {info['mirror']}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from tasks import dataset, evaluate

    config = _config_from(args)
    data_uri = dataset.prepare_dataset(config)
    out_dir = args.out or (config.work_dir / "evaluations" / Path(args.model.rstrip("/")).name)
    metrics = evaluate.evaluate_model(args.model, data_uri, Path(out_dir), config)
    gate = metrics["gate"]
    print(f"accuracy {metrics['accuracy']:.4f}  mean loss {metrics['mean_loss']:.4f}")
    print(f"report   {Path(out_dir).resolve() / 'report.md'}")
    if not gate["passed"]:
        print(
            f"error: quality gate failed: accuracy {gate['value']:.4f} < {gate['threshold']:.4f}",
            file=sys.stderr,
        )
        return EXIT_FAILED
    print(f"gate     passed (>= {gate['threshold']:.2f})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from tasks import evaluate

    predictions = evaluate.predict(args.model, [Path(p) for p in args.inputs], _config_from(args))
    print(evaluate.format_predictions(predictions))
    return 0


def cmd_artifacts(args: argparse.Namespace) -> int:
    from tasks import publish

    config = _config_from(args)
    if args.action == "list":
        runs = publish.list_runs(config)
        if not runs:
            print(f"no complete runs in {config.artifact_store}")
        for run in runs:
            print(publish.format_run_line(run))
    elif args.action == "show":
        print(json.dumps(publish.show_run(config, args.run), indent=2))
    elif args.action == "pull":
        path = publish.pull_run(config, args.run, Path(args.dest))
        print(f"pulled {args.run} into {path} (checksums verified)")
    elif args.action == "verify":
        problems = publish.verify_run(config, args.run)
        for problem in problems:
            print(f"  {problem}", file=sys.stderr)
        if problems:
            print(f"error: run {args.run}: {len(problems)} problem(s)", file=sys.stderr)
            return EXIT_FAILED
        print(f"run {args.run}: every object matches its manifest checksum")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from pipeline.flow import training_pipeline

    # Only the options given travel as the deployment's parameters; the rest keep their defaults.
    config = _config_from(args).model_dump(mode="json", exclude_unset=True)
    training_pipeline.serve(name=args.name, cron=args.cron, parameters={"config": config})
    return 0


# --- parser ---------------------------------------------------------------------------------

DESCRIPTION = """\
Train the Fashion-MNIST softmax-regression classifier (MXNet Gluon + Horovod), evaluate it
against a quality gate and publish every artifact to a file:// or s3:// artifact store,
orchestrated by a Prefect flow. Every option is also an environment variable PIPELINE_<NAME>.
"""

EPILOG = """\
examples:
  pipeline run                                  the whole pipeline with the seed's settings
  pipeline run --epochs 1 --num-proc 2          two Horovod processes on this machine
  pipeline run --artifact-store s3://models/fashion --s3-endpoint-url http://127.0.0.1:8333
  pipeline dataset --offline                    check the dataset cache without any download
  pipeline artifacts list                       complete runs, newest first
  pipeline evaluate --model artifacts/runs/RUN_ID
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeline",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, handler: Callable, help_text: str, fields: Sequence[str]):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        _add_config_flags(sub, fields)
        return sub

    command(
        "run",
        cmd_run,
        "run the whole pipeline (dataset -> train -> evaluate -> publish) as a Prefect flow",
        RUN_FIELDS,
    )
    step = command(
        "step",
        cmd_step,
        "run one step alone and print its output URI (each step can run in its own container: "
        "they share only the dataset cache, the work dir and the artifact store)",
        RUN_FIELDS,
    )
    step.add_argument("step", choices=["dataset", "train", "evaluate", "publish"])
    step.add_argument("--data-uri", help="dataset cache URI (default: from --data-dir)")
    step.add_argument(
        "--run-dir-uri", help="run directory URI (default: WORK_DIR/RUN_ID from --work-dir)"
    )
    sweep = command(
        "sweep",
        cmd_sweep,
        "train every point of a hyper-parameter grid and name the best by validation accuracy",
        RUN_FIELDS,
    )
    sweep.add_argument(
        "--grid",
        type=_grid_item,
        action="append",
        required=True,
        metavar="NAME=V1,V2",
        help="a swept parameter and its values (lr, batch_size, epochs); repeat per parameter",
    )
    sweep.add_argument("--max-parallel", type=int, default=2, help="trainings at once (default 2)")
    command(
        "dataset",
        cmd_dataset,
        "download Fashion-MNIST from the first mirror that serves verified bytes and cache it "
        "(mirrors are tried in order; files are verified by the SHA-256 of their decompressed "
        "content, so re-compressed copies are accepted; --offline only checks the cache)",
        DATA_FIELDS,
    )
    evaluate = command(
        "evaluate",
        cmd_evaluate,
        "evaluate a stored model on the test set and write a report; exits 1 below the gate",
        DATA_FIELDS + ("work_dir", "s3_endpoint_url", "min_test_accuracy"),
    )
    evaluate.add_argument(
        "--model", required=True, help="run directory: PATH, file://PATH or s3://BUCKET/…/runs/ID"
    )
    evaluate.add_argument("--out", type=Path, help="report directory (default: under --work-dir)")
    predict = command(
        "predict",
        cmd_predict,
        "classify images with a stored model: PNG/JPEG (28x28 grayscale, light object on a dark "
        "background as in Fashion-MNIST; other sizes and colours are converted, and the "
        "conversion is stated) or IDX files",
        ("s3_endpoint_url",),
    )
    predict.add_argument("--model", required=True, help="run directory (PATH, file:// or s3://)")
    predict.add_argument("inputs", nargs="+", metavar="IMAGE", help="PNG/JPEG/IDX files")
    artifacts = command(
        "artifacts",
        cmd_artifacts,
        "list, show, pull or verify published runs in the artifact store",
        STORE_FIELDS,
    )
    actions = artifacts.add_subparsers(dest="action", metavar="ACTION", required=True)
    actions.add_parser("list", help="complete runs, newest first, with their accuracy")
    actions.add_parser("show", help="print a run's manifest").add_argument("run")
    pull = actions.add_parser("pull", help="download a run, verifying every checksum")
    pull.add_argument("run")
    pull.add_argument("dest")
    actions.add_parser("verify", help="re-hash every stored object of a run").add_argument("run")
    serve = command(
        "serve",
        cmd_serve,
        "serve the flow on a cron schedule from this process (the simplest scheduled setup)",
        RUN_FIELDS,
    )
    serve.add_argument("--cron", default="0 2 * * *", help="cron schedule, UTC (default: 02:00)")
    serve.add_argument("--name", default="nightly", help="deployment name")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        for chatty in ("httpx", "botocore", "boto3", "s3transfer"):
            logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        return args.handler(args)
    except ValidationError as exc:
        print(f"error: {_validation_message(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
