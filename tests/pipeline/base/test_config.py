"""pipeline/base/config.py: the one validated PipelineConfig."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pipeline.base.config import PipelineConfig
from tests.support.train import TWO_HOSTS

# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lr": 0}, "greater than 0"),
        ({"lr": -0.1}, "greater than 0"),
        ({"batch_size": 0}, "greater than or equal to 1"),
        ({"num_proc": 4, "batch_size": 2}, "num_proc=4 is larger than batch_size=2"),
        ({"hosts": "localhost"}, "not Horovod host syntax"),
        ({"hosts": "localhost:2", "num_proc": 3}, "fewer than num_proc=3"),
    ],
)
def test_bad_training_options_are_rejected_by_the_config(overrides: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        PipelineConfig(**overrides)


def test_only_host_zero_of_a_rendezvous_job_goes_on_to_publish() -> None:
    assert PipelineConfig(num_proc=2).is_coordinator()  # horovodrun: this host holds rank 0
    assert PipelineConfig(num_proc=2, hosts=TWO_HOSTS, worker_index=0).is_coordinator()
    assert not PipelineConfig(num_proc=2, hosts=TWO_HOSTS, worker_index=1).is_coordinator()
