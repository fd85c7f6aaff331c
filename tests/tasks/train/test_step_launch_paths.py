"""The local launch (ranks started directly with Horovod's Gloo variables, no horovodrun) trains
the same model as `horovodrun`, which the launcher still uses for ssh hosts.

The horovodrun branch is chosen by `uses_ssh`; the test forces it with monkeypatch, and then
real horovodrun starts real ranks (for `localhost` slots it needs no ssh).
"""

from __future__ import annotations

from pathlib import Path

import mxnet as mx
import numpy as np
import pytest

import tasks.train.step as train_step
from pipeline.base.config import PipelineConfig
from tests.support.steps import trained

pytestmark = pytest.mark.integration  # real trainings

DEBIAN_MIRROR = "file:///usr/share/datasets/fashion-mnist/"


def trained_parameters(config: PipelineConfig, data_uri: str) -> dict[str, np.ndarray]:
    run_dir = trained(config, data_uri)
    loaded = mx.nd.load(str(run_dir / "model" / "model.params"))
    return {name: value.asnumpy() for name, value in loaded.items()}


@pytest.mark.parametrize("num_proc", [1, 2])
def test_local_launch_trains_the_model_horovodrun_trains(
    num_proc: int, data_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def config(run_id: str) -> PipelineConfig:
        return PipelineConfig(
            work_dir=tmp_path, run_id=run_id, epochs=1, num_proc=num_proc,
            hosts=f"localhost:{num_proc}", mirrors=[DEBIAN_MIRROR],
        )  # fmt: skip

    assert not train_step.uses_ssh(config("local"))
    local = trained_parameters(config("local"), data_uri)
    monkeypatch.setattr(train_step, "uses_ssh", lambda config: True)
    with_horovodrun = trained_parameters(config("horovodrun"), data_uri)
    assert local.keys() == with_horovodrun.keys()
    for name in local:
        np.testing.assert_allclose(local[name], with_horovodrun[name], rtol=0, atol=1e-5)
