"""Evaluate step: test-set metrics, pictures, a report and the quality gate.

Pure core (numpy only): `log_softmax`, `softmax`, `confusion_matrix`, `per_class_metrics`,
`mean_cross_entropy`, `expected_calibration_error`, `compute_metrics`, `quality_gate`,
`most_confident_errors`, `parse_training_history`, `render_report`, `prepare_image`.
Pictures (matplotlib Agg, fixed sizes): `plot_confusion_matrix`, `plot_per_class_accuracy`,
`plot_training_curves`, `plot_misclassified`.
Shell: `evaluate` (the flow's step), `evaluate_model` (`pipeline evaluate`), `predict` and
`format_predictions` (`pipeline predict`), `read_metrics`, `check_gate`.

The model is always loaded from its exported artifact in a run directory
(model/model-symbol.json + model/model-0000.params), never from training memory, so this step
can run in its own process or container, and can evaluate any stored run.

Inputs to `predict` must look like Fashion-MNIST: a light object on a black background
(0 = background). Images are converted to 28x28 grayscale when needed, and every conversion is
stated in the prediction, but they are never inverted.
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlparse
from urllib.request import url2pathname

import mxnet as mx
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, UnidentifiedImageError
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import get_run_context
from prefect.exceptions import MissingContextError

from pipeline.config import PipelineConfig
from pipeline.errors import PipelineError
from tasks.dataset import CLASS_NAMES, DatasetError, load_dataset, parse_idx

NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIDE = 28
ECE_BINS = 15
TOP_K = 3
MISCLASSIFIED_GRID = 4  # the picture shows the GRID x GRID most confident mistakes

# Where things live in a run directory (see the run-directory layout in README).
MODEL_SYMBOL = Path("model/model-symbol.json")
MODEL_PARAMS = Path("model/model-0000.params")
TRAIN_SUMMARY = Path("metrics/train.json")
TRAIN_HISTORY = Path("metrics/train.jsonl")
REPORT_DIR = "report"
METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"

GZIP_MAGIC = b"\x1f\x8b"
IDX_UBYTE_MAGIC = b"\x00\x00\x08"
# The dark-background hint: Fashion-MNIST borders are black, so a bright border suggests a
# dark-on-light picture that the model has never seen.
BRIGHT_BORDER_MEAN = 128


class EvaluationError(PipelineError, RuntimeError):
    """Evaluation or prediction cannot proceed; the one-line message names the URI or file."""


class ModelNotFoundError(EvaluationError):
    """The model URI holds no exported model."""


class ModelFormatError(EvaluationError):
    """The stored model cannot be loaded, or does not map a 28x28 image to 10 class scores."""


class InputError(EvaluationError):
    """An input to `predict` is not a usable image or IDX file."""


class QualityGateError(EvaluationError):
    """The model's test accuracy is below the configured threshold."""


# --- pure core: metrics ---------------------------------------------------------------------


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax; shifting by the row maximum keeps exp() from overflowing."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise class probabilities of raw model scores."""
    return np.exp(log_softmax(logits))


def mean_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean softmax cross-entropy of raw scores, the loss the model was trained on."""
    return float(-log_softmax(logits)[np.arange(len(labels)), labels].mean())


def confusion_matrix(
    labels: np.ndarray, predicted: np.ndarray, num_classes: int = NUM_CLASSES
) -> np.ndarray:
    """Counts (num_classes x num_classes): rows are the true class, columns the predicted one."""
    flat = labels.astype(np.int64) * num_classes + predicted.astype(np.int64)
    return np.bincount(flat, minlength=num_classes**2).reshape(num_classes, num_classes)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator element-wise, defined as 0.0 where the denominator is 0."""
    return np.divide(
        numerator,
        denominator,
        out=np.zeros(len(numerator), dtype=np.float64),
        where=denominator > 0,
    )


def per_class_metrics(
    confusion: np.ndarray, class_names: Sequence[str] = CLASS_NAMES
) -> list[dict[str, Any]]:
    """Precision, recall, F1 and accuracy of each class, from a confusion matrix.

    A class's accuracy is the share of its images classified correctly (which equals its
    recall). Ratios with a zero denominator are defined as 0.0: precision of a class that is
    never predicted, recall/accuracy of a class with no images, and F1 when both are 0.
    """
    correct = np.diag(confusion).astype(np.float64)
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    precision = _ratio(correct, predicted)
    recall = _ratio(correct, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    return [
        {
            "class": name,
            "support": int(support[i]),
            "predicted": int(predicted[i]),
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "accuracy": float(recall[i]),
        }
        for i, name in enumerate(class_names)
    ]


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS
) -> float:
    """ECE over `bins` equal-width bins of the top probability: sum_b n_b/N |acc_b - conf_b|.

    Bin b holds confidences in (b/bins, (b+1)/bins]; a softmax maximum is never 0.
    """
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    index = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    # n_b * |acc_b - conf_b| == |sum of correct_b - sum of confidence_b|, so per-bin sums suffice.
    confidence_sum = np.bincount(index, weights=confidence, minlength=bins)
    correct_sum = np.bincount(index, weights=correct, minlength=bins)
    return float(np.abs(correct_sum - confidence_sum).sum() / len(labels))


def compute_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """accuracy, mean_loss, ece, per_class and confusion_matrix of a model's raw test scores."""
    logits = logits.astype(np.float64)  # see model_logits
    probabilities = softmax(logits)
    confusion = confusion_matrix(labels, probabilities.argmax(axis=1))
    return {
        "accuracy": float(np.trace(confusion) / confusion.sum()),
        "mean_loss": mean_cross_entropy(logits, labels),
        "ece": expected_calibration_error(probabilities, labels),
        "per_class": per_class_metrics(confusion),
        "confusion_matrix": confusion.tolist(),
    }


def quality_gate(accuracy: float, threshold: float) -> dict[str, Any]:
    """The gate record of metrics.json; a model passes at or above the threshold."""
    return {
        "metric": "accuracy",
        "threshold": threshold,
        "value": accuracy,
        "passed": accuracy >= threshold,
    }


def check_gate(metrics: dict[str, Any]) -> None:
    """Raise QualityGateError, stating the measured value and the threshold, if the gate failed."""
    gate = metrics["gate"]
    if not gate["passed"]:
        raise QualityGateError(
            f"quality gate failed: test {gate['metric']} {gate['value']:.4f} is below the "
            f"threshold {gate['threshold']:.4f}"
        )


def most_confident_errors(probabilities: np.ndarray, labels: np.ndarray, count: int) -> np.ndarray:
    """Indices of up to `count` misclassified samples, most confident prediction first."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probabilities[wrong, predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")[:count]]


def parse_training_history(text: str, source: str) -> list[dict[str, Any]]:
    """The per-epoch records of a metrics/train.jsonl text (one JSON object per line)."""
    history = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise EvaluationError(f"{source}: line {number} is not JSON: {exc.msg}") from exc
        if not isinstance(record, dict) or not {"epoch", "loss"} <= record.keys():
            raise EvaluationError(f"{source}: line {number} has no 'epoch' and 'loss'")
        history.append(record)
    return history


# --- pure core: report text -----------------------------------------------------------------


class Picture(NamedTuple):
    """A report picture: its file name, title and fixed size."""

    file_name: str
    title: str
    size_inches: tuple[float, float]

    @property
    def size_pixels(self) -> tuple[int, int]:
        return (round(self.size_inches[0] * PICTURE_DPI), round(self.size_inches[1] * PICTURE_DPI))


PICTURE_DPI = 100
CONFUSION_MATRIX = Picture(
    "confusion_matrix.png", "Confusion matrix (rows: true class, columns: predicted)", (8.0, 7.0)
)
PER_CLASS_ACCURACY = Picture("per_class_accuracy.png", "Per-class test accuracy", (8.0, 4.5))
TRAINING_CURVES = Picture("training_curves.png", "Training curves", (10.0, 4.0))
MISCLASSIFIED = Picture(
    "misclassified.png", "Most confidently misclassified test images", (8.0, 9.0)
)
PICTURES = (CONFUSION_MATRIX, PER_CLASS_ACCURACY, TRAINING_CURVES, MISCLASSIFIED)


def _gate_verdict(gate: dict[str, Any]) -> str:
    if gate["passed"]:
        return f"passed: {gate['metric']} {gate['value']:.4f} >= {gate['threshold']:.4f}"
    return f"FAILED: {gate['metric']} {gate['value']:.4f} < {gate['threshold']:.4f}"


def render_report(metrics: dict[str, Any], model_uri: str, image_links: dict[str, str]) -> str:
    """The markdown report; `image_links` maps a picture's file name to its link target
    (a relative path for report.md, a data: URI for the Prefect artifact). Pictures missing
    from it are left out."""
    train_accuracy = metrics["train_accuracy"]
    lines = [
        "# Fashion-MNIST evaluation report",
        "",
        f"Model: `{model_uri}`",
        "",
        "| measure | value |",
        "|---|---|",
        f"| test accuracy | {metrics['accuracy']:.4f} |",
        "| train accuracy | "
        + ("n/a (no metrics/train.json)" if train_accuracy is None else f"{train_accuracy:.4f}")
        + " |",
        f"| mean cross-entropy loss | {metrics['mean_loss']:.4f} |",
        f"| expected calibration error ({ECE_BINS} bins) | {metrics['ece']:.4f} |",
        f"| test images | {sum(row['support'] for row in metrics['per_class'])} |",
        f"| quality gate | **{_gate_verdict(metrics['gate'])}** |",
        "",
        "## Per-class metrics",
        "",
        "Accuracy of a class is the share of its test images classified correctly (its recall);",
        "a ratio with nothing to divide by (e.g. precision of a class never predicted) is 0.",
        "",
        "| class | images | predicted | precision | recall (accuracy) | F1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {row['class']} | {row['support']} | {row['predicted']} | {row['precision']:.4f} "
        f"| {row['recall']:.4f} | {row['f1']:.4f} |"
        for row in metrics["per_class"]
    ]
    for picture in PICTURES:
        if picture.file_name in image_links:
            lines += [
                "",
                f"## {picture.title}",
                "",
                f"![{picture.title}]({image_links[picture.file_name]})",
            ]
    return "\n".join(lines) + "\n"


# --- pure core: prediction inputs -----------------------------------------------------------


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 images (n, 28, 28) -> float32 (n, 784) in [0, 1], as the train step feeds them."""
    return images.reshape(len(images), -1).astype(np.float32) / 255


def prepare_image(image: Image.Image) -> tuple[np.ndarray, tuple[str, ...]]:
    """A PIL image as a 28x28 uint8 grayscale array, plus notes on what was done to it.

    28x28 grayscale is used as is. Anything else is converted to grayscale and resized (the
    aspect ratio is not kept). Pixels are never inverted; a bright border earns a warning note.
    """
    notes = []
    if image.mode != "L":
        notes.append(f"converted {image.mode} to grayscale")
        image = image.convert("L")
    if image.size != (IMAGE_SIDE, IMAGE_SIDE):
        notes.append(f"resized {image.width}x{image.height} to {IMAGE_SIDE}x{IMAGE_SIDE}")
        image = image.resize((IMAGE_SIDE, IMAGE_SIDE), Image.Resampling.LANCZOS)
    pixels = np.asarray(image, dtype=np.uint8)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if border.mean() >= BRIGHT_BORDER_MEAN:
        notes.append(
            "light background: the model expects a light object on black, as in "
            "Fashion-MNIST; the image was not inverted"
        )
    return pixels, tuple(notes)


# --- pictures -------------------------------------------------------------------------------


def _new_figure(picture: Picture) -> Figure:
    # A bare Figure on an Agg canvas: no pyplot global state, no display needed.
    figure = Figure(figsize=picture.size_inches, dpi=PICTURE_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, out_dir: Path, picture: Picture) -> Path:
    path = out_dir / picture.file_name
    # No bbox_inches="tight": it would crop, and the pixel size must stay the documented one.
    figure.savefig(path, dpi=PICTURE_DPI, format="png")
    return path


def plot_confusion_matrix(confusion: np.ndarray, out_dir: Path) -> Path:
    """Heat map of the confusion matrix with counts and class names."""
    figure = _new_figure(CONFUSION_MATRIX)
    axes = figure.add_subplot()
    image = axes.imshow(confusion, cmap="Blues")
    figure.colorbar(image, ax=axes, shrink=0.8)
    ticks = np.arange(len(CLASS_NAMES))
    axes.set_xticks(ticks, CLASS_NAMES, rotation=45, ha="right")
    axes.set_yticks(ticks, CLASS_NAMES)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class")
    axes.set_title(CONFUSION_MATRIX.title)
    dark = confusion.max() / 2
    for (row, column), count in np.ndenumerate(confusion):
        color = "white" if count > dark else "black"
        axes.text(column, row, str(count), ha="center", va="center", fontsize=7, color=color)
    return _save(figure, out_dir, CONFUSION_MATRIX)


def plot_per_class_accuracy(
    per_class: list[dict[str, Any]], accuracy: float, out_dir: Path
) -> Path:
    """Bars of each class's accuracy, with the overall accuracy as a line."""
    figure = _new_figure(PER_CLASS_ACCURACY)
    axes = figure.add_subplot()
    values = [row["accuracy"] for row in per_class]
    bars = axes.bar([row["class"] for row in per_class], values, color="tab:blue")
    axes.bar_label(bars, labels=[f"{value:.2f}" for value in values], fontsize=8)
    axes.axhline(accuracy, color="tab:red", linestyle="--")
    axes.set_ylim(0, 1.08)
    axes.set_ylabel("accuracy")
    axes.tick_params(axis="x", labelrotation=30)
    axes.set_title(f"{PER_CLASS_ACCURACY.title} (dashed: overall {accuracy:.4f})")
    return _save(figure, out_dir, PER_CLASS_ACCURACY)


def plot_training_curves(
    history: list[dict[str, Any]], out_dir: Path, best_epoch: int | None = None
) -> Path:
    """Loss and accuracies per epoch from metrics/train.jsonl; the kept epoch is marked."""
    figure = _new_figure(TRAINING_CURVES)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    epochs = [record["epoch"] for record in history]
    loss_axes.plot(epochs, [record["loss"] for record in history], marker="o")
    loss_axes.set_ylabel("training loss")
    for key in ("train_accuracy", "val_accuracy", "test_accuracy"):
        if all(record.get(key) is not None for record in history):
            label = key.removesuffix("_accuracy")
            accuracy_axes.plot(epochs, [record[key] for record in history], marker="o", label=label)
    accuracy_axes.set_ylabel("accuracy")
    accuracy_axes.legend()
    for axes in (loss_axes, accuracy_axes):
        axes.set_xlabel("epoch")
        axes.set_xticks(epochs)
        axes.grid(alpha=0.3)
        if best_epoch is not None:
            axes.axvline(best_epoch, color="gray", linestyle=":")
    kept = "" if best_epoch is None else f" (dotted: epoch {best_epoch}, the kept model)"
    figure.suptitle(TRAINING_CURVES.title + kept)
    return _save(figure, out_dir, TRAINING_CURVES)


def plot_misclassified(
    images: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, out_dir: Path
) -> Path:
    """Grid of the most confidently misclassified images: true, predicted and confidence."""
    figure = _new_figure(MISCLASSIFIED)
    grid = figure.subplots(MISCLASSIFIED_GRID, MISCLASSIFIED_GRID).ravel()
    shown = most_confident_errors(probabilities, labels, len(grid))
    for axes in grid:
        axes.axis("off")
    for axes, index in zip(grid, shown, strict=False):
        predicted = int(probabilities[index].argmax())
        axes.imshow(images[index], cmap="gray", vmin=0, vmax=255)
        axes.set_title(
            f"true: {CLASS_NAMES[labels[index]]}\n"
            f"predicted: {CLASS_NAMES[predicted]} ({probabilities[index, predicted]:.2f})",
            fontsize=8,
        )
    figure.suptitle(MISCLASSIFIED.title if len(shown) else "No misclassified test images")
    return _save(figure, out_dir, MISCLASSIFIED)


# --- shell: model and run-directory I/O -----------------------------------------------------


def _local_path(uri: str) -> Path:
    """A file:// URI or a plain path as a local path."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(url2pathname(parsed.path))
    if parsed.scheme:
        raise EvaluationError(
            f"{uri}: unsupported URI scheme {parsed.scheme!r}; expected a local path or file://PATH"
        )
    return Path(uri)


@contextmanager
def _local_run_dir(model_uri: str, config: PipelineConfig) -> Iterator[Path]:
    """The run directory as a local directory: paths and file:// URIs as they are, s3:// URIs
    copied into a scratch directory that is removed on exit."""
    scheme = urlparse(model_uri).scheme
    if scheme == "s3":
        # Imported here: only remote runs need the artifact-store module (and boto3).
        from pipeline.store import materialize

        with tempfile.TemporaryDirectory(prefix="evaluate-model-") as scratch:
            yield materialize(model_uri, Path(scratch), config)
    elif scheme in ("", "file"):
        yield _local_path(model_uri)
    else:
        raise EvaluationError(
            f"model {model_uri}: unsupported URI scheme {scheme!r}; use a run directory PATH, "
            "file://PATH or s3://BUCKET/PREFIX/runs/RUN_ID"
        )


def _mxnet_message(exc: Exception) -> str:
    """MXNet's reason on one line, without the C++ stack trace ("File ..., line N") before it."""
    lines = str(exc).splitlines()
    frames = [i for i, line in enumerate(lines) if line.strip().startswith("File ")]
    reason = " ".join(line.strip() for line in lines[frames[-1] + 1 if frames else 0 :])
    return reason.strip().removeprefix("MXNetError: ") or type(exc).__name__


def load_model(run_dir: Path, model_uri: str) -> mx.gluon.SymbolBlock:
    """Load a run's exported model and check that it maps a 28x28 image to 10 class scores.

    `model_uri` is what the user named, used in error messages.
    """
    for relative in (MODEL_SYMBOL, MODEL_PARAMS):
        if not (run_dir / relative).is_file():
            raise ModelNotFoundError(
                f"model {model_uri}: {relative} not found (expected a run directory holding "
                f"{MODEL_SYMBOL} and {MODEL_PARAMS})"
            )
    try:
        with warnings.catch_warnings():
            # imports() warns that it cannot infer the input's dtype; we always feed float32.
            warnings.simplefilter("ignore", UserWarning)
            net = mx.gluon.SymbolBlock.imports(
                str(run_dir / MODEL_SYMBOL), ["data"], str(run_dir / MODEL_PARAMS)
            )
    # MXNet reports a parameter file of another model with an AssertionError.
    except (mx.base.MXNetError, AssertionError) as exc:
        raise ModelFormatError(
            f"model {model_uri}: cannot load {MODEL_SYMBOL} / {MODEL_PARAMS}: {_mxnet_message(exc)}"
        ) from exc
    try:
        probe = net(mx.nd.zeros((1, IMAGE_SIDE * IMAGE_SIDE)))
    except mx.base.MXNetError as exc:
        raise ModelFormatError(
            f"model {model_uri}: does not take a {IMAGE_SIDE}x{IMAGE_SIDE} image as "
            f"{IMAGE_SIDE * IMAGE_SIDE} inputs: {_mxnet_message(exc)}"
        ) from exc
    if probe.shape != (1, NUM_CLASSES):
        raise ModelFormatError(
            f"model {model_uri}: produces output of shape {probe.shape[1:]} per image, expected "
            f"{NUM_CLASSES} class scores"
        )
    return net


def model_logits(net: mx.gluon.Block, images: np.ndarray) -> np.ndarray:
    """The model's raw class scores (n, 10), as float64, for uint8 images (n, 28, 28)."""
    # float64 from here on: a softmax of float32 scores can round two close classes to a tie.
    return net(mx.nd.array(to_model_input(images))).asnumpy().astype(np.float64)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EvaluationError(f"{path}: cannot read JSON: {exc}") from exc


def read_training_metrics(run_dir: Path) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """The train step's summary (None if absent) and per-epoch history ([] if absent)."""
    summary_path, history_path = run_dir / TRAIN_SUMMARY, run_dir / TRAIN_HISTORY
    summary = _read_json(summary_path) if summary_path.exists() else None
    history = (
        parse_training_history(history_path.read_text(), str(history_path))
        if history_path.exists()
        else []
    )
    return summary, history


def png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _create_prefect_artifacts(
    metrics: dict[str, Any], model_uri: str, pictures: list[Path]
) -> None:
    """The report as Prefect artifacts, when running inside a flow or task run."""
    try:
        get_run_context()
    except MissingContextError:
        return  # a plain function call (CLI, tests): there is no run to attach artifacts to
    # data: URIs make the markdown artifact self-contained: the UI cannot read our files.
    embedded = {path.name: png_data_uri(path) for path in pictures}
    verdict = _gate_verdict(metrics["gate"])
    create_markdown_artifact(
        markdown=render_report(metrics, model_uri, embedded),
        key="evaluation-report",
        description=f"Test accuracy {metrics['accuracy']:.4f}; quality gate {verdict}",
    )
    create_table_artifact(
        table=metrics["per_class"],
        key="per-class-metrics",
        description="Per-class test metrics (accuracy = recall)",
    )


# --- shell: entry points --------------------------------------------------------------------


def evaluate_model(
    model_uri: str, data_uri: str, out_dir: Path, config: PipelineConfig
) -> dict[str, Any]:
    """Evaluate a stored run's model on the test set and write the report into `out_dir`.

    `model_uri` is a run directory: a path, file://PATH or s3://BUCKET/PREFIX/runs/RUN_ID.
    Returns the metrics as written to metrics.json. Does not raise on a failing gate: the
    caller decides (the flow publishes first; the CLI calls `check_gate`).
    """
    with _local_run_dir(model_uri, config) as run_dir:
        net = load_model(run_dir, model_uri)
        train_summary, history = read_training_metrics(run_dir)
    data = load_dataset(data_uri)
    logits = model_logits(net, data.test_images)
    core = compute_metrics(logits, data.test_labels)
    metrics = {
        "accuracy": core["accuracy"],
        "train_accuracy": train_summary.get("train_accuracy") if train_summary else None,
        "mean_loss": core["mean_loss"],
        "ece": core["ece"],
        "per_class": core["per_class"],
        "confusion_matrix": core["confusion_matrix"],
        "gate": quality_gate(core["accuracy"], config.min_test_accuracy),
    }

    out_dir.mkdir(parents=True, exist_ok=True)
    probabilities = softmax(logits)
    pictures = [
        plot_confusion_matrix(np.asarray(core["confusion_matrix"]), out_dir),
        plot_per_class_accuracy(core["per_class"], core["accuracy"], out_dir),
    ]
    if history:
        best_epoch = train_summary.get("best_epoch") if train_summary else None
        pictures.append(plot_training_curves(history, out_dir, best_epoch))
    pictures.append(plot_misclassified(data.test_images, data.test_labels, probabilities, out_dir))
    links = {path.name: path.name for path in pictures}
    (out_dir / REPORT_FILE).write_text(render_report(metrics, model_uri, links))
    # metrics.json last: its presence means the report is complete.
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    _create_prefect_artifacts(metrics, model_uri, pictures)
    return metrics


def evaluate(config: PipelineConfig, data_uri: str, run_dir_uri: str) -> str:
    """The flow's evaluate step: report into RUN_DIR/report; returns that directory's URI."""
    report_dir = _local_path(run_dir_uri) / REPORT_DIR
    metrics = evaluate_model(run_dir_uri, data_uri, report_dir, config)
    print(
        f"test accuracy {metrics['accuracy']:.4f}, mean loss {metrics['mean_loss']:.4f}, "
        f"ECE {metrics['ece']:.4f}; quality gate {_gate_verdict(metrics['gate'])}"
    )
    return report_dir.resolve().as_uri()


def read_metrics(report_uri: str) -> dict[str, Any]:
    """The metrics.json of a report directory (file:// URI or path)."""
    path = _local_path(report_uri) / METRICS_FILE
    if not path.is_file():
        raise EvaluationError(f"{report_uri}: no {METRICS_FILE}; has the evaluate step run?")
    return _read_json(path)


@dataclass(frozen=True)
class Prediction:
    """One classified image."""

    source: str  # the file name; "name[i]" for the i-th image of an IDX file
    top: tuple[tuple[str, float], ...]  # the TOP_K most likely (class name, probability)
    notes: tuple[str, ...] = ()  # conversions done to the image, and warnings

    @property
    def label(self) -> str:
        return self.top[0][0]


def read_input_images(path: Path) -> list[tuple[str, np.ndarray, tuple[str, ...]]]:
    """(source, 28x28 uint8 image, notes) for each image of a PNG/JPEG or IDX (.gz or raw) file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from exc
    if raw[:2] == GZIP_MAGIC or raw[:3] == IDX_UBYTE_MAGIC:
        try:
            images = parse_idx(gzip.decompress(raw) if raw[:2] == GZIP_MAGIC else raw, str(path))
        except (OSError, EOFError) as exc:
            raise InputError(f"{path}: corrupt gzip data: {exc}") from exc
        except DatasetError as exc:
            raise InputError(str(exc)) from exc
        if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
            raise InputError(
                f"{path}: IDX data of shape {images.shape}, expected images of "
                f"{IMAGE_SIDE}x{IMAGE_SIDE} (is it a labels file?)"
            )
        return [(f"{path.name}[{i}]", image, ()) for i, image in enumerate(images)]
    try:
        with Image.open(io.BytesIO(raw)) as image:
            pixels, notes = prepare_image(image)
    except UnidentifiedImageError as exc:
        raise InputError(f"{path}: not a PNG/JPEG image nor an IDX file") from exc
    except OSError as exc:  # e.g. a truncated image
        raise InputError(f"{path}: cannot decode the image: {exc}") from exc
    return [(path.name, pixels, notes)]


def predict(model_uri: str, inputs: list[Path], config: PipelineConfig) -> list[Prediction]:
    """Classify PNG/JPEG images and IDX files with a stored run's model (top-3 classes).

    Images should show a light object on a black background, as Fashion-MNIST does.
    """
    items = [item for path in inputs for item in read_input_images(path)]
    with _local_run_dir(model_uri, config) as run_dir:
        net = load_model(run_dir, model_uri)
    if not items:
        return []
    probabilities = softmax(model_logits(net, np.stack([image for _, image, _ in items])))
    predictions = []
    for (source, _, notes), row in zip(items, probabilities, strict=True):
        best = np.argsort(-row, kind="stable")[:TOP_K]
        top = tuple((CLASS_NAMES[i], float(row[i])) for i in best)
        predictions.append(Prediction(source, top, notes))
    return predictions


def format_predictions(predictions: list[Prediction]) -> str:
    """The CLI's printout: one line per image with its top classes, then any notes."""
    width = max((len(p.source) for p in predictions), default=0)
    lines = []
    for prediction in predictions:
        ranked = ", ".join(f"{name} {probability:.1%}" for name, probability in prediction.top)
        lines.append(f"{prediction.source:<{width}}  {ranked}")
        lines += [f"{'':<{width}}  - {note}" for note in prediction.notes]
    return "\n".join(lines)
