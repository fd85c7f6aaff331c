"""Fixtures of the publish tests."""

from __future__ import annotations

import pytest

from pipeline.base.store import (
    ArtifactStore,
    FileStore,
)


@pytest.fixture
def tamper(request: pytest.FixtureRequest):
    """Change (or, with None, delete) a stored object behind the store's back."""

    def tamper(store: ArtifactStore, key: str, data: bytes | None) -> None:
        if isinstance(store, FileStore):
            path = store.root / key
            path.unlink() if data is None else path.write_bytes(data)
            return
        s3 = request.getfixturevalue("s3_server").client()
        full_key = f"{store.prefix}/{key}"
        if data is None:
            s3.delete_object(Bucket=store.bucket, Key=full_key)
            return
        # Keep the recorded digest: only re-hashing the stored bytes can tell.
        metadata = s3.head_object(Bucket=store.bucket, Key=full_key)["Metadata"]
        s3.put_object(Bucket=store.bucket, Key=full_key, Body=data, Metadata=metadata)

    return tamper
