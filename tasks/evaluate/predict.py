"""`pipeline predict`: classify PNG/JPEG images or IDX files with a stored run's model.

Inputs must look like Fashion-MNIST: a light object on a black background (0 = background).
Images are converted to 28x28 grayscale when needed, and every conversion is stated in the
prediction, but they are never inverted.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.base.config import PipelineConfig
from tasks.dataset import CLASS_NAMES, DatasetError, parse_idx
from tasks.evaluate.metrics import EvaluationError, softmax
from tasks.evaluate.model_io import IMAGE_SIDE, load_model, local_run_dir, model_logits

TOP_K = 3
GZIP_MAGIC = b"\x1f\x8b"
IDX_UBYTE_MAGIC = b"\x00\x00\x08"
# The dark-background hint: Fashion-MNIST borders are black, so a bright border suggests a
# dark-on-light picture that the model has never seen.
BRIGHT_BORDER_MEAN = 128
# Untrusted inputs: an image header may declare billions of pixels, and a small .gz may inflate
# to gigabytes. 4096x4096 is far beyond any picture of one garment; the whole Fashion-MNIST
# test set as IDX is 7.8 MB.
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_IDX_BYTES = 64 * 2**20


class InputError(EvaluationError):
    """An input to `predict` is not a usable image or IDX file."""


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


@dataclass(frozen=True)
class Prediction:
    """One classified image."""

    source: str  # the file name; "name[i]" for the i-th image of an IDX file
    top: tuple[tuple[str, float], ...]  # the TOP_K most likely (class name, probability)
    notes: tuple[str, ...] = ()  # conversions done to the image, and warnings

    @property
    def label(self) -> str:
        return self.top[0][0]


def _inflate(raw: bytes, path: Path) -> bytes:
    """A gzip member's bytes, refused once they pass MAX_IDX_BYTES (never inflated whole)."""
    with gzip.GzipFile(fileobj=io.BytesIO(raw)) as stream:
        data = stream.read(MAX_IDX_BYTES + 1)
    if len(data) > MAX_IDX_BYTES:
        raise InputError(f"{path}: inflates to more than {MAX_IDX_BYTES} bytes; not an IDX input")
    return data


def _read_idx(raw: bytes, path: Path) -> list[tuple[str, np.ndarray, tuple[str, ...]]]:
    try:
        images = parse_idx(_inflate(raw, path) if raw[:2] == GZIP_MAGIC else raw, str(path))
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


def _read_image(raw: bytes, path: Path) -> tuple[np.ndarray, tuple[str, ...]]:
    try:
        with Image.open(io.BytesIO(raw)) as image:
            # PIL only warns up to twice its limit; decide before a pixel is decoded.
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise InputError(
                    f"{path}: {image.width}x{image.height} pixels, more than the "
                    f"{MAX_IMAGE_PIXELS} accepted (a decompression bomb?)"
                )
            return prepare_image(image)
    except Image.DecompressionBombError as exc:
        raise InputError(f"{path}: refused, too many pixels: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"{path}: not a PNG/JPEG image nor an IDX file") from exc
    except OSError as exc:  # e.g. a truncated image
        raise InputError(f"{path}: cannot decode the image: {exc}") from exc


def read_input_images(path: Path) -> list[tuple[str, np.ndarray, tuple[str, ...]]]:
    """(source, 28x28 uint8 image, notes) for each image of a PNG/JPEG or IDX (.gz or raw) file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from exc
    if raw[:2] == GZIP_MAGIC or raw[:3] == IDX_UBYTE_MAGIC:
        return _read_idx(raw, path)
    pixels, notes = _read_image(raw, path)
    return [(path.name, pixels, notes)]


def predict(model_uri: str, inputs: list[Path], config: PipelineConfig) -> list[Prediction]:
    """Classify PNG/JPEG images and IDX files with a stored run's model (top-3 classes).

    Images should show a light object on a black background, as Fashion-MNIST does.
    """
    items = [item for path in inputs for item in read_input_images(path)]
    with local_run_dir(model_uri, config.s3_endpoint_url, config.s3_timeouts()) as run_dir:
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
