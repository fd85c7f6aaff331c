"""tasks/evaluate/model_io.py: loading a model: missing, of the wrong shape, corrupted, of
another model, or a published run that fails its verification."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import mxnet as mx
import pytest
from mxnet import nd
from mxnet.gluon import nn

from pipeline.base.config import PipelineConfig
from pipeline.base.errors import PipelineError
from pipeline.base.layout import MODEL_PARAMS
from tasks.evaluate.metrics import (
    EvaluationError,
)
from tasks.evaluate.model_io import ModelFormatError, ModelNotFoundError
from tasks.evaluate.predict import predict
from tasks.evaluate.step import evaluate_model
from tests.support.documents import manifest_bytes
from tests.support.evaluate import TrainedRun, _export, _one_line
from tests.support.steps import for_run

# --- bad input ------------------------------------------------------------------------------


def test_missing_model_uri(
    tmp_path: Path, image_png: Path, data_uri: str, config: PipelineConfig
) -> None:
    missing = tmp_path / "runs" / "no-such-run"
    for uri in (str(missing), missing.as_uri()):
        with pytest.raises(ModelNotFoundError) as info:
            predict(uri, [image_png], config)
        message = _one_line(info)
        assert uri in message and "model/model-symbol.json" in message
    with pytest.raises(EvaluationError) as info:
        evaluate_model("http://example.com/run", tmp_path / "out", for_run(config, data_uri))
    assert "unsupported URI scheme 'http'" in _one_line(info)


@pytest.mark.parametrize(
    ("units", "in_units", "expected"),
    [
        (5, 784, "output of shape (5,) per image, expected 10 class scores"),
        (10, 100, "does not take a 28x28 image as 784 inputs"),
    ],
)
def test_model_of_the_wrong_shape(
    units: int,
    in_units: int,
    expected: str,
    tmp_path: Path,
    image_png: Path,
    config: PipelineConfig,
) -> None:
    net = nn.Dense(units, in_units=in_units)
    net.initialize(mx.init.Normal(0.01))
    net.hybridize()
    net(nd.zeros((1, in_units)))  # a hybridized block is exported after one forward pass
    _export(net, tmp_path)

    with pytest.raises(ModelFormatError) as info:
        predict(str(tmp_path), [image_png], config)
    message = _one_line(info)
    assert str(tmp_path) in message and expected in message


def test_corrupted_params_file(
    trained_run: TrainedRun, data_uri: str, tmp_path: Path, config: PipelineConfig
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run.run_dir / "model", run_dir / "model")
    params = run_dir / "model" / "model-0000.params"
    params.write_bytes(params.read_bytes()[: params.stat().st_size // 2])  # a cut-off download

    with pytest.raises(ModelFormatError) as info:
        evaluate_model(run_dir.as_uri(), tmp_path / "out", for_run(config, data_uri))
    message = _one_line(info)
    assert run_dir.as_uri() in message and "model-0000.params" in message
    assert "Invalid NDArray file format" in message  # MXNet's own reason, without its trace


def test_params_file_of_another_model(
    trained_run: TrainedRun, tmp_path: Path, image_png: Path, config: PipelineConfig
) -> None:
    other = nn.Dense(10, in_units=784, prefix="other_")  # same shapes, other parameter names
    other.initialize()
    other.hybridize()
    other(nd.zeros((1, 784)))
    _export(other, tmp_path / "other")
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run.run_dir / "model", run_dir / "model")
    shutil.copyfile(
        tmp_path / "other" / "model" / "model-0000.params", run_dir / "model" / "model-0000.params"
    )

    with pytest.raises(ModelFormatError) as info:
        predict(str(run_dir), [image_png], config)
    message = _one_line(info)
    assert str(run_dir) in message and "is missing in file" in message


def test_published_runs_are_verified_before_loading(
    trained_run: TrainedRun, image_png: Path, data_uri: str, tmp_path: Path, config: PipelineConfig
) -> None:
    """A run in a store's runs/ needs its manifest, and every object must match it."""
    run_dir = tmp_path / "store" / "runs" / "r1"
    shutil.copytree(trained_run.run_dir, run_dir)
    for uri in (str(run_dir), run_dir.as_uri()):
        with pytest.raises(PipelineError) as info:
            predict(uri, [image_png], config)
        assert "has no manifest.json" in _one_line(info)
        with pytest.raises(PipelineError) as info:
            evaluate_model(uri, tmp_path / "report", for_run(config, data_uri))
        assert "has no manifest.json" in _one_line(info)

    objects = {}
    for path in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        data = path.read_bytes()
        key = path.relative_to(run_dir).as_posix()
        objects[key] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (run_dir / "manifest.json").write_bytes(manifest_bytes("r1", objects))
    [prediction] = predict(str(run_dir), [image_png], config)  # verified: loads

    params = run_dir / MODEL_PARAMS
    params.write_bytes(bytes(params.stat().st_size))  # same size, other bytes
    with pytest.raises(PipelineError) as info:
        predict(str(run_dir), [image_png], config)
    assert "does not match its manifest" in _one_line(info) and MODEL_PARAMS in _one_line(info)
    (run_dir / "manifest.json").write_text('{"objects": {"\\u0000": 1}}')
    with pytest.raises(PipelineError) as info:
        predict(str(run_dir), [image_png], config)
    assert "not a valid Manifest" in _one_line(info)
