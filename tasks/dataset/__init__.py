"""Dataset step: Fashion-MNIST from an ordered list of mirrors, verified, cached.

- `idx`: the files, their pinned digests and the IDX format (pure core);
- `download`: one file from the mirrors, inflated, hashed and verified as it streams;
- `cache`: the verified cache (`prepare_dataset`, the step), `load_dataset`, `read_record` and
  the Prefect cache key.
"""

from tasks.dataset.cache import (
    cache_key,
    load_dataset,
    prepare_dataset,
    read_record,
)
from tasks.dataset.download import DEBIAN_DATA_DIR
from tasks.dataset.idx import (
    CLASS_NAMES,
    FILES,
    CorruptDataError,
    DataFile,
    DatasetError,
    FashionMNIST,
    inflate_gzip,
    parse_idx,
)

__all__ = [
    "CLASS_NAMES",
    "DEBIAN_DATA_DIR",
    "FILES",
    "CorruptDataError",
    "DataFile",
    "DatasetError",
    "FashionMNIST",
    "cache_key",
    "inflate_gzip",
    "load_dataset",
    "parse_idx",
    "prepare_dataset",
    "read_record",
]
