"""The handlers of the `pipeline` command line, one per sub-command (the parser is `cli.py`).

Each handler's docstring is its help text. Steps are imported inside the handlers: `pipeline
artifacts list` should not pay for MXNet, nor `pipeline dataset` for Prefect.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.base import layout
from pipeline.base.config import PipelineConfig
from pipeline.base.text import printable

# The exit statuses of `pipeline` (cli.py's too): 1 a run or check failed, 2 a usage error.
EXIT_FAILED = 1
EXIT_USAGE = 2


def config_from(args: argparse.Namespace) -> PipelineConfig:
    """The one config: defaults < PIPELINE_* environment < the flags given."""
    overrides = {k: v for k, v in vars(args).items() if k in PipelineConfig.model_fields}
    return PipelineConfig(**overrides)


def cmd_run(args: argparse.Namespace) -> int:
    """run the whole pipeline (dataset -> train -> evaluate -> publish) as a Prefect flow"""
    from pipeline.prefect_server import use_api
    from pipeline.preflight import preflight

    config = config_from(args)
    preflight(config)  # bad input fails here, as one line, before Prefect is even imported
    use_api(args.local_server, args.prefect_port)  # before Prefect reads PREFECT_API_URL
    from pipeline.flow import run_pipeline

    summary = run_pipeline(config)
    if summary is None:
        print(f"host {config.worker_index}: contributed its Horovod ranks; host 0 publishes")
        return 0
    train_accuracy = "n/a" if summary.train_accuracy is None else f"{summary.train_accuracy:.4f}"
    verdict = "passed" if summary.gate_passed else "FAILED"
    steps = ", ".join(f"{name} {sec:.1f}s" for name, sec in summary.step_seconds.items())
    print()
    print(f"run {summary.run_id}")
    print(f"  train accuracy  {train_accuracy}  (after epoch {config.epochs})")
    print(
        f"  test accuracy   {summary.test_accuracy:.4f}  (gate >= {summary.gate_threshold:.2f}: "
        f"{verdict})"
    )
    print(f"  published       {summary.published_uri}")
    print(f"  step times      {steps}")
    if summary.flow_run_url:
        print(f"  prefect ui      {summary.flow_run_url}")
    return 0


def cmd_step(args: argparse.Namespace) -> int:
    """run one step alone and print its output URI (each step can run in its own container:
    they share only the dataset cache (--data-dir), the work dir (--work-dir) and the
    artifact store, all named by the same options)"""
    from pipeline.flow import step_output, step_task

    config = config_from(args)
    if config.run_id is None and args.step != "dataset":
        print("error: --run-id is required: it names the run the steps share", file=sys.stderr)
        return EXIT_USAGE
    step_task(args.step, config).fn(config)
    print(step_output(args.step, config))  # the only line on stdout
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """train every point of a hyper-parameter grid and name the best by validation accuracy"""
    from pipeline.sweep import hyperparameter_sweep

    result = hyperparameter_sweep(
        grid=dict(args.grid), config=config_from(args), max_parallel=args.max_parallel
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


def cmd_dataset(args: argparse.Namespace) -> int:
    """download Fashion-MNIST from the first mirror that serves verified bytes and cache it
    (mirrors are tried in order; files are verified by the SHA-256 of their decompressed
    content, so re-compressed copies are accepted; --offline only checks the cache)"""
    from tasks.dataset import prepare_dataset, read_record

    data_uri = prepare_dataset(config_from(args))
    record = read_record(data_uri)
    print(f"dataset ready at {data_uri}")
    for name, info in record["files"].items():
        # From dataset.json, a file anyone who can write the cache can edit: escaped.
        line = f"  {name:28} sha256 {info['sha256'][:16]}…  from {info['mirror']}"
        print(printable(line))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """evaluate a stored model on the test set and write a report; exits 1 below the gate"""
    from tasks.dataset import prepare_dataset
    from tasks.evaluate.gate import check_gate
    from tasks.evaluate.step import evaluate_model

    config = config_from(args)
    prepare_dataset(config)
    model_name = Path(args.model.rstrip("/")).name
    out_dir = args.out or (config.work_dir / layout.EVALUATIONS_DIR / model_name)
    metrics = evaluate_model(args.model, Path(out_dir), config)
    print(f"accuracy {metrics['accuracy']:.4f}  mean loss {metrics['mean_loss']:.4f}")
    print(f"report   {Path(out_dir).resolve() / layout.REPORT_FILE}")
    check_gate(metrics)  # below the gate: one error line, exit 1
    print(f"gate     passed (>= {metrics['gate']['threshold']:.2f})")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """classify images with a stored model: PNG/JPEG (28x28 grayscale, light object on a dark
    background as in Fashion-MNIST; other sizes and colours are converted, and the conversion
    is stated) or IDX files"""
    from tasks.evaluate.predict import format_predictions, predict

    predictions = predict(args.model, [Path(p) for p in args.inputs], config_from(args))
    print(format_predictions(predictions))
    return 0


def cmd_artifacts(args: argparse.Namespace) -> int:
    """list, show, pull or verify published runs in the artifact store"""
    return args.action_handler(config_from(args), args)


def artifacts_list(config: PipelineConfig, args: argparse.Namespace) -> int:
    """complete runs, newest first, with their accuracy"""
    from tasks.publish.artifacts import list_runs
    from tasks.publish.manifest import format_run_line

    runs = list_runs(config)
    if not runs:
        print(f"no complete runs in {config.artifact_store}")
    for run in runs:
        print(format_run_line(run))
    return 0


def artifacts_show(config: PipelineConfig, args: argparse.Namespace) -> int:
    """print a run's manifest"""
    from tasks.publish.artifacts import show_run

    # ensure_ascii: every control byte of the stored strings is printed as a \\u escape.
    print(json.dumps(show_run(config, args.run), indent=2, ensure_ascii=True))
    return 0


def artifacts_pull(config: PipelineConfig, args: argparse.Namespace) -> int:
    """download a run, verifying every checksum"""
    from tasks.publish.artifacts import pull_run

    path = pull_run(config, args.run, Path(args.dest))
    print(f"pulled {args.run} into {path} (checksums verified)")
    return 0


def artifacts_verify(config: PipelineConfig, args: argparse.Namespace) -> int:
    """re-hash every stored object of a run"""
    from tasks.publish.artifacts import verify_run

    problems = verify_run(config, args.run)
    for problem in problems:
        print(f"  {printable(problem)}", file=sys.stderr)  # object keys come from the store
    if problems:
        print(f"error: run {args.run}: {len(problems)} problem(s)", file=sys.stderr)
        return EXIT_FAILED
    print(f"run {args.run}: every object matches its manifest checksum")
    return 0


# (action, handler, positional arguments)
ARTIFACT_ACTIONS = (
    ("list", artifacts_list, ()),
    ("show", artifacts_show, ("run",)),
    ("pull", artifacts_pull, ("run", "dest")),
    ("verify", artifacts_verify, ("run",)),
)


def cmd_serve(args: argparse.Namespace) -> int:
    """serve the flow on a cron schedule from this process (the simplest scheduled setup)"""
    from pipeline.flow import training_pipeline

    # Only the options given travel as the deployment's parameters; the rest keep their defaults.
    config = config_from(args).model_dump(mode="json", exclude_unset=True)
    training_pipeline.serve(name=args.name, cron=args.cron, parameters={"config": config})
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    """start, stop or show the local Prefect server that `pipeline run --local-server` (and
    `make run`) reuses: on 127.0.0.1, in the background, its state in PREFECT_HOME"""
    from pipeline import prefect_server

    if args.action == "start":
        server = prefect_server.start_server(args.prefect_port)
        print(f"Prefect server at {server.ui_url} (API {server.api_url})")
    elif args.action == "stop":
        server = prefect_server.stop_server()
        print(
            "no local Prefect server was running"
            if server is None
            else f"stopped the Prefect server on port {server.port} (pid {server.pid})"
        )
    else:
        server = prefect_server.running_server()
        if server is None:
            print("no local Prefect server is running")
            return EXIT_FAILED
        print(f"Prefect server at {server.ui_url} (pid {server.pid})")
    return 0
