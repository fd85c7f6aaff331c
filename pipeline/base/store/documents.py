"""The store's own documents (a run's manifest.json and the store's latest.json) as validated
models: both come from a store that anyone with write access can edit, so nothing is read from
them before it has been checked (types, ranges, object keys).

`parse_document` turns every way a document can be malformed (not JSON, wrong fields, a key
with a NUL byte or '..', a 5,000-digit number) into one IntegrityError naming the object.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Annotated, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from pipeline.base.files import MAX_DOCUMENT_BYTES
from pipeline.base.store.base import IntegrityError, ObjectInfo, check_key
from pipeline.base.text import printable

MANIFEST_FORMAT = 1
MAX_OBJECT_BYTES = 1 << 50  # 1 PiB: anything larger is not a size but an attack or a typo
Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
RunId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
Sequence = Annotated[int, Field(ge=0, le=2**63 - 1)]

D = TypeVar("D", bound=BaseModel)


class ObjectEntry(BaseModel):
    """One object of a published run: its size and whole-file SHA-256."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    size: int = Field(ge=0, le=MAX_OBJECT_BYTES)
    sha256: Sha256Hex

    def info(self) -> ObjectInfo:
        return ObjectInfo(self.size, self.sha256)


def _plain_key(key: str) -> str:
    try:
        return check_key(key)
    except IntegrityError as exc:
        raise ValueError(str(exc)) from None  # pydantic reports ValueErrors with their location


ObjectKey = Annotated[str, AfterValidator(_plain_key)]


class Gate(BaseModel):
    model_config = ConfigDict(extra="allow")

    passed: bool
    threshold: float


class RunMetrics(BaseModel):
    """The metrics the store's readers use; evaluate writes more, kept as they are."""

    model_config = ConfigDict(extra="allow")

    accuracy: float = Field(ge=0.0, le=1.0)
    train_accuracy: float | None = None
    gate: Gate


class Manifest(BaseModel):
    """runs/<id>/manifest.json: what a published run is made of and how it was made.

    `published_after` is the sequence of latest.json when this run's manifest was written:
    runs are ordered by it (then by run id), never by a host's clock.
    """

    model_config = ConfigDict(extra="forbid")

    format: int = Field(ge=MANIFEST_FORMAT, le=MANIFEST_FORMAT)
    run_id: RunId
    created_at: str = Field(max_length=64)
    published_at: str = Field(max_length=64)
    published_after: Sequence = 0
    code_revision: str = Field(max_length=256)
    flow_run_id: str | None = Field(default=None, max_length=64)
    dataset: dict
    config: dict
    metrics: RunMetrics
    restarts: list[dict] = Field(default_factory=list, max_length=1000)
    objects: dict[ObjectKey, ObjectEntry]

    def order(self) -> tuple[int, str]:
        """Publication order: a run published later sorts after (ties: the run id)."""
        return (self.published_after, self.run_id)

    def expected(self) -> dict[str, ObjectInfo]:
        return {key: entry.info() for key, entry in self.objects.items()}


class Latest(BaseModel):
    """latest.json: the promoted run, its manifest's digest, and a counter of promotions."""

    model_config = ConfigDict(extra="forbid")

    run_id: RunId
    manifest: ObjectKey
    manifest_sha256: Sha256Hex
    sequence: Sequence  # +1 on every promotion: the store's own clock
    published_after: Sequence  # the promoted run's order, as in its manifest
    accuracy: float = Field(ge=0.0, le=1.0)
    created_at: str = Field(max_length=64)
    updated_at: str = Field(max_length=64)

    def order(self) -> tuple[int, str]:
        return (self.published_after, self.run_id)


def parse_document(model: type[D], data: bytes, where: str) -> D:
    """`data` as a validated `model`; IntegrityError naming `where` when it is not one."""
    if len(data) > MAX_DOCUMENT_BYTES:
        raise IntegrityError(f"{where}: {len(data)} bytes, more than any {model.__name__} has")
    try:
        # json.loads first: it refuses integers over 4,300 digits before anything else.
        return model.model_validate(json.loads(data))
    except ValueError as exc:  # JSONDecodeError, the digit limit, ValidationError
        reason = _first_error(exc) if isinstance(exc, ValidationError) else str(exc)
        raise IntegrityError(f"{where}: not a valid {model.__name__}: {reason}") from None


def _first_error(exc: ValidationError) -> str:
    error = exc.errors(include_url=False, include_input=False)[0]
    # The location holds the document's own keys (e.g. an object key with ESC or NUL in it).
    location = printable(".".join(str(part) for part in error["loc"])) or "document"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{location}: {error['msg']}{more}"


def document_bytes(document: BaseModel) -> bytes:
    return json.dumps(document.model_dump(mode="json"), indent=2, sort_keys=True).encode()


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def object_problems(
    expected: Mapping[str, ObjectInfo], stored: Mapping[str, ObjectInfo | None]
) -> list[str]:
    """One line per object whose stored size or SHA-256 differs from the manifest."""
    problems = []
    for key, want in sorted(expected.items()):
        info = stored.get(key)
        if info is None:
            problems.append(f"{key}: missing")
        elif info.size != want.size:
            problems.append(f"{key}: {info.size} bytes stored, manifest says {want.size}")
        elif info.sha256 != want.sha256:
            problems.append(f"{key}: SHA-256 {info.sha256} stored, manifest says {want.sha256}")
    return problems
