"""tasks/train/sharding.py: global-batch semantics (pure)."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.train.sharding import epoch_permutation, global_batches, shard_bounds, split_validation

# ----------------------------------------------------------------------------- pure core


@pytest.mark.parametrize("num_samples", [0, 1, 7, 96, 128, 255, 256])
@pytest.mark.parametrize("num_ranks", [1, 2, 3, 8])
def test_shards_cut_like_numpy_array_split(num_samples: int, num_ranks: int) -> None:
    samples = np.arange(num_samples)
    expected = np.array_split(samples, num_ranks)
    for rank in range(num_ranks):
        lo, hi = shard_bounds(num_samples, num_ranks, rank)
        assert np.array_equal(samples[lo:hi], expected[rank])


def test_global_batches_cover_the_epoch_and_drop_a_tail_smaller_than_the_ranks() -> None:
    assert global_batches(600, 256, 2) == [(0, 256), (256, 512), (512, 600)]
    assert global_batches(513, 256, 2) == [(0, 256), (256, 512)]  # 1 sample for 2 ranks
    assert global_batches(513, 256, 1) == [(0, 256), (256, 512), (512, 513)]
    assert global_batches(60000, 256, 2)[-1] == (59904, 60000)
    assert global_batches(3, 256, 4) == []


def test_epoch_permutation_is_fixed_by_seed_and_epoch() -> None:
    first = epoch_permutation(1000, seed=7, epoch=1)
    assert np.array_equal(np.sort(first), np.arange(1000))
    assert np.array_equal(first, epoch_permutation(1000, seed=7, epoch=1))
    assert not np.array_equal(first, epoch_permutation(1000, seed=7, epoch=2))
    assert not np.array_equal(first, epoch_permutation(1000, seed=8, epoch=1))


def test_validation_split_is_a_fixed_disjoint_hold_out() -> None:
    train_idx, val_idx = split_validation(1000, 0.1, seed=3)
    assert len(val_idx) == 100
    assert np.array_equal(np.sort(np.concatenate([train_idx, val_idx])), np.arange(1000))
    again_train, again_val = split_validation(1000, 0.1, seed=3)
    assert np.array_equal(val_idx, again_val) and np.array_equal(train_idx, again_train)
    assert not np.array_equal(val_idx, split_validation(1000, 0.1, seed=4)[1])
    assert len(split_validation(1000, 0.0, seed=3)[1]) == 0
    assert len(split_validation(1000, 1e-9, seed=3)[1]) == 1
