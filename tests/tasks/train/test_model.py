"""tasks/train/model.py: the context a rank trains on."""

from __future__ import annotations

import mxnet as mx
import pytest

from tasks.train.errors import TrainingError
from tasks.train.model import select_context


def test_context_is_one_gpu_per_local_rank_else_the_cpu() -> None:
    assert select_context(num_gpus=0, local_rank=3) == mx.cpu()
    assert select_context(num_gpus=4, local_rank=0) == mx.gpu(0)
    assert select_context(num_gpus=4, local_rank=3) == mx.gpu(3)
    with pytest.raises(TrainingError, match="local rank 2 has no GPU: this host has 2"):
        select_context(num_gpus=2, local_rank=2)
