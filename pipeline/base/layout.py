"""Where things live: the run directory and the artifact store, one layout for every store.

Every path below is relative and '/'-separated, so the same name is a local path under a run
directory and an object key under a published run. Change a file name here and nowhere else.

    <store>/latest.json                  the newest run that passed the quality gate (LATEST)
    <store>/runs/<run-id>/...            one published run: the run directory minus checkpoints,
                        manifest.json    written last: a run without it is incomplete

    <work-dir>/<run-id>/config.json      the PipelineConfig the user asked for (restarts: below)
                        model/           the exported model (symbol + params) and model.params
                        metrics/         train.jsonl (per epoch), train.json (summary),
                                         restarts.jsonl (restarts after a rank died)
                        report/          metrics.json (written last), report.md, *.png
                        checkpoints/     checkpoint.json (the pointer) + epoch-NNNN.* files
                        .run.lock        held by the run's train step (one run per run id)
                        .rank-config.json  the config of the ranks' current attempt
"""

from __future__ import annotations

# --- the artifact store ---------------------------------------------------------------------
RUNS = "runs"
MANIFEST = "manifest.json"
LATEST = "latest.json"  # the promoted run: the newest that passed the gate


def run_key(run_id: str) -> str:
    """The prefix of one published run in a store."""
    return f"{RUNS}/{run_id}"


# --- the run directory ----------------------------------------------------------------------
RUN_CONFIG = "config.json"
MODEL_DIR = "model"
MODEL_PREFIX = f"{MODEL_DIR}/model"  # Gluon export: model-symbol.json + model-0000.params
MODEL_SYMBOL = f"{MODEL_PREFIX}-symbol.json"
MODEL_PARAMS = f"{MODEL_PREFIX}-0000.params"
MODEL_STATE = f"{MODEL_DIR}/model.params"  # save_parameters(): for Gluon code
METRICS_DIR = "metrics"
TRAIN_HISTORY = f"{METRICS_DIR}/train.jsonl"
TRAIN_SUMMARY = f"{METRICS_DIR}/train.json"
TRAIN_RESTARTS = f"{METRICS_DIR}/restarts.jsonl"  # one line per restart of the rank gang
REPORT_DIR = "report"
REPORT_METRICS = f"{REPORT_DIR}/metrics.json"  # written last: its presence means complete
REPORT_MARKDOWN = f"{REPORT_DIR}/report.md"
CHECKPOINTS = "checkpoints"  # resumable training state: never published
CHECKPOINT_POINTER = f"{CHECKPOINTS}/checkpoint.json"  # the last complete checkpoint
# The config of the ranks' current attempt (a restart changes num_proc and resume): hidden, never
# published. RUN_CONFIG stays the config the user asked for; restarts go to TRAIN_RESTARTS.
RANK_CONFIG = ".rank-config.json"
FAILURE = "failure.json"
# Held (flock) by the train step for the run's life: one run per run id. Hidden: never published.
RUN_LOCK = ".run.lock"


def run_lock(worker_index: int | None) -> str:
    """The lock file of a run directory; each host of a rendezvous job (which may share one
    work dir) holds its own."""
    return RUN_LOCK if worker_index is None else f".run-host-{worker_index}.lock"


# What a run directory holds that is never published.
UNPUBLISHED_DIRS = (CHECKPOINTS,)
