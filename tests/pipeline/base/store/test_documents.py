"""pipeline/base/store/documents.py: a store's documents are validated before anything is read
from them; every malformed one is one IntegrityError naming the object (pure)."""

from __future__ import annotations

import json

import pytest

from pipeline.base.store import IntegrityError
from pipeline.base.store.base import ObjectInfo
from pipeline.base.store.documents import (
    Latest,
    Manifest,
    digest,
    document_bytes,
    object_problems,
    parse_document,
)
from tests.support.documents import manifest_bytes

SHA = "ab" * 32
GOOD = {"model/model.params": {"size": 3, "sha256": SHA}}


def test_a_manifest_survives_its_own_bytes_and_orders_by_publication() -> None:
    data = manifest_bytes("run-1", GOOD, published_after=4)
    manifest = parse_document(Manifest, data, "runs/run-1/manifest.json")
    assert document_bytes(manifest) == data
    assert manifest.order() == (4, "run-1")
    assert manifest.expected() == {"model/model.params": ObjectInfo(3, SHA)}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda d: d.update(run_id="../up"), "run_id"),
        (lambda d: d.update(extra="field"), "extra"),
        (lambda d: d["objects"].update({"a\x00b": {"size": 1, "sha256": SHA}}), "objects"),
        (lambda d: d["objects"].update({"../x": {"size": 1, "sha256": SHA}}), "objects"),
        (lambda d: d["objects"].update({"x": {"size": 10**40, "sha256": SHA}}), "size"),
        (lambda d: d["objects"].update({"x": {"size": 1, "sha256": "not hex"}}), "sha256"),
        (lambda d: d["metrics"].update(accuracy=1.5), "accuracy"),
    ],
)
def test_a_malformed_manifest_is_one_error_naming_object_and_field(change, reason) -> None:
    document = json.loads(manifest_bytes("run-1", dict(GOOD)))
    change(document)
    with pytest.raises(
        IntegrityError, match=rf"^runs/r/manifest.json: not a valid Manifest: .*{reason}"
    ):
        parse_document(Manifest, json.dumps(document).encode(), "runs/r/manifest.json")


@pytest.mark.parametrize(
    "data", [b"not json", b"[]", b'{"run_id": 1' + b"0" * 5000 + b"}", b"\xff\xfe"]
)
def test_bytes_that_are_no_document_are_one_error(data: bytes) -> None:
    with pytest.raises(IntegrityError, match=r"^latest.json: not a valid Latest"):
        parse_document(Latest, data, "latest.json")


def test_a_document_over_the_bound_is_refused_unparsed() -> None:
    with pytest.raises(IntegrityError, match=r"latest.json: \d+ bytes, more than any Latest has"):
        parse_document(Latest, b" " * (16 << 20) + b"{}", "latest.json")


def test_object_problems_name_each_missing_resized_or_changed_object() -> None:
    expected = {"a": ObjectInfo(1, SHA), "b": ObjectInfo(2, SHA), "c": ObjectInfo(3, SHA)}
    other = digest(b"xyz")
    stored = {"a": ObjectInfo(1, SHA), "b": ObjectInfo(5, SHA), "c": ObjectInfo(3, other)}
    assert object_problems(expected, stored) == [
        "b: 5 bytes stored, manifest says 2",
        f"c: SHA-256 {other} stored, manifest says {SHA}",
    ]
    assert object_problems(expected, {}) == ["a: missing", "b: missing", "c: missing"]
