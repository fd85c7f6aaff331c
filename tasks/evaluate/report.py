"""The evaluation report: markdown text, four pictures of fixed size, and the same report as
Prefect artifacts when a flow or task run is there to attach them to."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from pipeline.base import layout
from pipeline.base.logs import in_prefect_run
from tasks.dataset.idx import CLASS_NAMES
from tasks.evaluate.gate import gate_verdict
from tasks.evaluate.metrics import ECE_BINS, most_confident_errors

MISCLASSIFIED_GRID = 4  # the picture shows the GRID x GRID most confident mistakes


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
    layout.PICTURE_CONFUSION_MATRIX,
    "Confusion matrix (rows: true class, columns: predicted)",
    (8.0, 7.0),
)
PER_CLASS_ACCURACY = Picture(
    layout.PICTURE_PER_CLASS_ACCURACY, "Per-class test accuracy", (8.0, 4.5)
)
TRAINING_CURVES = Picture(layout.PICTURE_TRAINING_CURVES, "Training curves", (10.0, 4.0))
MISCLASSIFIED = Picture(
    layout.PICTURE_MISCLASSIFIED, "Most confidently misclassified test images", (8.0, 9.0)
)
PICTURES = (CONFUSION_MATRIX, PER_CLASS_ACCURACY, TRAINING_CURVES, MISCLASSIFIED)


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
        f"| quality gate | **{gate_verdict(metrics['gate'])}** |",
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


def png_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def create_prefect_artifacts(metrics: dict[str, Any], model_uri: str, pictures: list[Path]) -> None:
    """The report as Prefect artifacts, when running inside a flow or task run."""
    if not in_prefect_run():
        return  # a plain function call (CLI, tests): there is no run to attach artifacts to
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    # data: URIs make the markdown artifact self-contained: the UI cannot read our files.
    embedded = {path.name: png_data_uri(path) for path in pictures}
    verdict = gate_verdict(metrics["gate"])
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
