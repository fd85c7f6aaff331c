"""Store documents for tests: a valid manifest around whatever objects a test needs."""

from __future__ import annotations

from pipeline.base.store.documents import Manifest, document_bytes


def manifest_bytes(run_id: str, objects: dict, **fields: object) -> bytes:
    """A valid manifest document listing `objects` (key -> size and sha256)."""
    manifest = Manifest(
        format=1,
        run_id=run_id,
        created_at="2026-01-01T00:00:00+00:00",
        published_at="2026-01-01T00:00:00+00:00",
        code_revision="test",
        dataset={},
        config={},
        metrics={"accuracy": 0.9, "gate": {"passed": True, "threshold": 0.8}},
        objects=objects,
        **fields,
    )
    return document_bytes(manifest)
