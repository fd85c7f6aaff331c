"""Global-batch semantics, the same for any number of ranks (pure: numpy only).

Every epoch all ranks draw the same permutation (from seed and epoch); each global batch of
`batch_size` samples is cut into `num_proc` contiguous shards (`np.array_split` style);
DistributedTrainer sums the per-rank gradient sums and divides by N, and `trainer.step(n / N)`
divides by n / N, so one update is the single-process update on the same n samples. A last
partial batch with fewer samples than ranks is dropped (at most N - 1 samples an epoch), since a
rank without samples has no gradient to contribute.
"""

from __future__ import annotations

import numpy as np

# Independent random streams derived from the one seed (numpy SeedSequence spawn keys).
_SPLIT_STREAM, _SHUFFLE_STREAM = 0, 1


def shard_bounds(num_samples: int, num_ranks: int, rank: int) -> tuple[int, int]:
    """[lo, hi) of `rank`'s contiguous shard of `num_samples`, as np.array_split cuts them."""
    base, extra = divmod(num_samples, num_ranks)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def global_batches(num_samples: int, batch_size: int, num_ranks: int) -> list[tuple[int, int]]:
    """[start, stop) of each global batch of an epoch; a last batch smaller than the number
    of ranks is dropped because some rank would get no sample."""
    batches = [
        (start, min(start + batch_size, num_samples)) for start in range(0, num_samples, batch_size)
    ]
    if batches and batches[-1][1] - batches[-1][0] < num_ranks:
        batches.pop()
    return batches


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of `epoch` (1-based): the same on every rank, for any number of ranks."""
    stream = np.random.SeedSequence(seed, spawn_key=(_SHUFFLE_STREAM, epoch))
    return np.random.default_rng(stream).permutation(num_samples)


def split_validation(num_samples: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train, validation) indices: a fixed seeded hold-out of `fraction` of the samples
    (at least one when fraction > 0)."""
    num_val = max(1, round(num_samples * fraction)) if fraction > 0 else 0
    stream = np.random.SeedSequence(seed, spawn_key=(_SPLIT_STREAM,))
    order = np.random.default_rng(stream).permutation(num_samples)
    return np.sort(order[num_val:]), np.sort(order[:num_val])
