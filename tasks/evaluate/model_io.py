"""Loading a stored run's model (MXNet) and scoring images with it.

The model is always loaded from its exported artifact in a run directory (model-symbol.json +
model-0000.params), never from training memory, so evaluation can run in its own process or
container, and can evaluate any stored run.
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import mxnet as mx
import numpy as np

from pipeline.base import layout
from pipeline.base.files import UnsafeFileError, open_no_links
from pipeline.base.store import materialize, verify_local_run
from pipeline.base.uris import local_path
from tasks.evaluate.metrics import NUM_CLASSES, EvaluationError

IMAGE_SIDE = 28
MODEL_SYMBOL = Path(layout.MODEL_SYMBOL)
MODEL_PARAMS = Path(layout.MODEL_PARAMS)


class ModelNotFoundError(EvaluationError):
    """The model URI holds no exported model."""


class ModelFormatError(EvaluationError):
    """The stored model cannot be loaded, or does not map a 28x28 image to 10 class scores."""


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 images (n, 28, 28) -> float32 (n, 784) in [0, 1], as the train step feeds them."""
    return images.reshape(len(images), -1).astype(np.float32) / 255


@contextmanager
def local_run_dir(
    model: str | Path,
    endpoint_url: str | None = None,
    timeouts: tuple[float, float, int | None, float] | None = None,
) -> Iterator[Path]:
    """The run directory as a local directory, verified before anything is loaded from it.

    s3:// URIs name published runs: they need a manifest, and are copied (every checksum
    checked) into a scratch directory that is removed on exit. A Path, a plain path or a
    file:// URI is used in place; one holding a manifest (a published or pulled run) is
    re-hashed against it, and one in a store's runs/ without a manifest (an unfinished publish)
    is refused.
    """
    model_uri = str(model)
    scheme = "" if isinstance(model, Path) else urlparse(model_uri).scheme
    if scheme == "s3":
        with tempfile.TemporaryDirectory(prefix="evaluate-model-") as scratch:
            yield materialize(
                model_uri, Path(scratch), endpoint_url, published=True, timeouts=timeouts
            )
    elif scheme in ("", "file"):
        run_dir = model if isinstance(model, Path) else local_path(model_uri)
        if not run_dir.is_dir():
            yield run_dir  # load_model says what is missing
            return
        in_store = run_dir.absolute().parent.name == layout.RUNS
        yield verify_local_run(run_dir, model_uri, published=in_store)
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
        try:
            # Opened without following links: a run directory is untrusted, and a link would
            # have MXNet read whatever file it names.
            open_no_links(run_dir, relative.as_posix()).close()
        except (FileNotFoundError, NotADirectoryError):
            raise ModelNotFoundError(
                f"model {model_uri}: {relative} not found (expected a run directory holding "
                f"{MODEL_SYMBOL} and {MODEL_PARAMS})"
            ) from None
        except UnsafeFileError as exc:
            raise ModelFormatError(f"model {model_uri}: {exc}") from None
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
