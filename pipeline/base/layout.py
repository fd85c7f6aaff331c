"""Where things live: the run directory, the artifact store, the dataset cache, one layout.

Every path below is relative and '/'-separated, so the same name is a local path under a run
directory and an object key under a published run. Change a file name here and nowhere else.

    <store>/latest.json                  the newest run that passed the quality gate (LATEST)
    <store>/runs/<run-id>/...            one published run: the run directory minus checkpoints,
                        manifest.json    written last: a run without it is incomplete
                        failure.json     a failed run's record (FAILURE)
                        checkpoints/     the checkpoints mirrored while it trains (--resume)

    <work-dir>/<run-id>/config.json      the PipelineConfig the user asked for (restarts: below)
                        model/           the exported model (symbol + params) and model.params
                        metrics/         train.jsonl (per epoch), train.json (summary),
                                         restarts.jsonl (restarts after a rank died)
                        report/          metrics.json (written last), report.md, four *.png
                        checkpoints/     checkpoint.json (the pointer) + epoch-NNNN.params and
                                         epoch-NNNN.optimizer files
                        .run.lock        held by the run's train step (one run per run id)
                        .rank-config.json  the config of the ranks' current attempt
    <work-dir>/evaluations/<model>/      `pipeline evaluate`'s report when --out is not given
    <work-dir>/sweeps/<sweep-id>/comparison.png   a sweep's comparison plot

    <data-dir>/dataset.json              the cache's record (its files, their digests, mirrors)
               .dataset.lock             held by the process that fills the cache
               .<name>.*.part            a download in progress (a killed one's is removed)
               train-images-idx3-ubyte, ...  the data set's own files: their names are pinned
                                         with their digests in tasks/dataset/idx.py
"""

from __future__ import annotations

import re

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
# A report directory's own names (`pipeline evaluate --out DIR` writes one anywhere).
METRICS_FILE = "metrics.json"  # written last: its presence means the report is complete
REPORT_FILE = "report.md"
PICTURE_CONFUSION_MATRIX = "confusion_matrix.png"
PICTURE_PER_CLASS_ACCURACY = "per_class_accuracy.png"
PICTURE_TRAINING_CURVES = "training_curves.png"
PICTURE_MISCLASSIFIED = "misclassified.png"
REPORT_METRICS = f"{REPORT_DIR}/{METRICS_FILE}"
REPORT_MARKDOWN = f"{REPORT_DIR}/{REPORT_FILE}"
CHECKPOINTS = "checkpoints"  # resumable training state: never published
CHECKPOINT_POINTER = f"{CHECKPOINTS}/checkpoint.json"  # the last complete checkpoint
# One epoch's checkpoint: STEM.params (the weights) and STEM.optimizer (the optimizer state).
CHECKPOINT_EPOCH_PREFIX = "epoch-"
CHECKPOINT_WEIGHTS = ".params"
CHECKPOINT_OPTIMIZER = ".optimizer"
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


def checkpoint_stem(epoch: int) -> str:
    """The name of an epoch's checkpoint files without their suffix: epoch-0003."""
    return f"{CHECKPOINT_EPOCH_PREFIX}{epoch:04d}"


def checkpoint_file_pattern(*suffixes: str) -> str:
    """A regular expression matching exactly the checkpoint file names with one of `suffixes`
    (a pointer names only these); its one group is the epoch's digits."""
    ends = "|".join(re.escape(suffix) for suffix in suffixes)
    return rf"^{re.escape(CHECKPOINT_EPOCH_PREFIX)}([0-9]{{4,7}})(?:{ends})$"


# What a run directory holds that is never published.
UNPUBLISHED_DIRS = (CHECKPOINTS,)


# --- the work directory, beside the runs ----------------------------------------------------
EVALUATIONS_DIR = "evaluations"  # `pipeline evaluate` without --out: EVALUATIONS_DIR/<model>
SWEEPS_DIR = "sweeps"
SWEEP_PLOT = "comparison.png"


def sweep_plot(sweep_id: str) -> str:
    """Where a sweep's comparison plot goes, relative to the work directory."""
    return f"{SWEEPS_DIR}/{sweep_id}/{SWEEP_PLOT}"


# --- the dataset cache (the data set's own file names are pinned in tasks/dataset/idx.py) ---
DATASET_RECORD = "dataset.json"
DATASET_LOCK = ".dataset.lock"  # held by the one process that fills the cache
DATASET_PART_SUFFIX = ".part"  # downloads in progress; only the lock holder writes them
