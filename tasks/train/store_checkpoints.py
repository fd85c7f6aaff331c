"""Checkpoints in the artifact store: mirrored as they are written, restored into an empty
work directory, so that `--resume --run-id ID` works on any host or container.

Store layout (pipeline.base.layout): the run's checkpoint files under
`runs/<run-id>/checkpoints/`, the pointer `checkpoint.json` written last, as on disk, so the
stored pointer only ever names files that are stored whole. The launcher (not a rank) talks to
the store: ranks never see store credentials. Epoch files are content-addressed by name
(`epoch-NNNN.*`, written once), so a mirror that reads one is never torn.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

from pydantic import ValidationError

from pipeline.base import layout
from pipeline.base.config import ConfigError, PipelineConfig
from pipeline.base.files import atomic_write, file_sha256, open_no_links, read_document_file
from pipeline.base.logs import step_logger
from pipeline.base.store import ArtifactStore, open_store
from tasks.train.checkpoints import MAX_POINTER_BYTES, Checkpoint, checkpoint_dir
from tasks.train.launcher import block_stop_signals

POINTER_NAME = Path(layout.CHECKPOINT_POINTER).name
EPOCH_FILE = re.compile(
    layout.checkpoint_file_pattern(layout.CHECKPOINT_WEIGHTS, layout.CHECKPOINT_OPTIMIZER)
)

# --- pure core ------------------------------------------------------------------------------


def checkpoint_files(checkpoint: Checkpoint) -> list[str]:
    """The file names a pointer needs besides itself."""
    return sorted({checkpoint.params, checkpoint.optimizer, checkpoint.best_params})


def expired_files(stored: list[str], checkpoint: Checkpoint, keep: int) -> list[str]:
    """The stored epoch files to delete once `checkpoint`'s pointer is stored: all but those of
    the `keep` newest epochs up to the pointer's, and those the pointer names (--resume's).

    Files of epochs after the pointer's (a resumed run's earlier future) are left alone, and so
    is anything that is not an epoch file (the pointer itself).
    """
    epochs = {name: _epoch_of(name) for name in stored}
    known = sorted({e for e in epochs.values() if e is not None and e <= checkpoint.epoch})
    kept_epochs = set(known[-keep:])
    needed = set(checkpoint_files(checkpoint))
    return sorted(
        name
        for name, epoch in epochs.items()
        if epoch is not None
        and epoch <= checkpoint.epoch
        and epoch not in kept_epochs
        and name not in needed
    )


def _epoch_of(name: str) -> int | None:
    match = EPOCH_FILE.match(name)
    return int(match.group(1)) if match else None


# --- shell ------------------------------------------------------------------------------------


def checkpoint_store(config: PipelineConfig) -> ArtifactStore:
    """Where the run's checkpoints are kept in the artifact store."""
    store = open_store(config.artifact_store, **config.store_options())
    return store.child(f"{layout.run_key(config.run_id)}/{layout.CHECKPOINTS}")


def mirror_checkpoint(store: ArtifactStore, run_dir: Path, keep: int) -> int | None:
    """Copy the run directory's last complete checkpoint to `store` (pointer last), then delete
    the stored epochs it made stale (`expired_files`); its epoch, None when there is none yet
    or rank 0 replaced it while it was read (the next one will do)."""
    directory = checkpoint_dir(run_dir)
    try:
        pointer = read_document_file(run_dir / layout.CHECKPOINT_POINTER, MAX_POINTER_BYTES)
        checkpoint = Checkpoint.model_validate_json(pointer)
        files = {name: (directory / name, _no_link_sha256(directory, name)) for name in
                 checkpoint_files(checkpoint)}  # fmt: skip
    except (FileNotFoundError, ValidationError):
        return None
    store.sync(files)
    store.put(POINTER_NAME, pointer)
    # Only now: until the newer pointer is stored, the older one (and its files) is resume's.
    store.delete(expired_files(store.list_keys(), checkpoint, keep))
    return checkpoint.epoch


def restore_checkpoint(store: ArtifactStore, run_dir: Path) -> int | None:
    """Download the stored checkpoint into an empty run directory (pointer last, every file
    checked against the SHA-256 it was stored with); its epoch, None when the store has none."""
    blob = store.get(POINTER_NAME, max_bytes=MAX_POINTER_BYTES)
    if blob is None:
        return None
    try:
        checkpoint = Checkpoint.model_validate_json(blob.data)
    except ValidationError as exc:
        raise ConfigError(
            f"resume: {store.key_uri(POINTER_NAME)} is not a valid checkpoint pointer "
            f"({exc.error_count()} problem(s), e.g. {exc.errors()[0]['msg']})"
        ) from None
    names = checkpoint_files(checkpoint)
    expected = store.stat_many(names)
    missing = [name for name, info in expected.items() if info is None]
    if missing:
        raise ConfigError(
            f"resume: the stored checkpoint pointer names {', '.join(missing)}, which "
            f"{store.uri} does not hold"
        )
    store.fetch(expected, checkpoint_dir(run_dir))
    atomic_write(run_dir / layout.CHECKPOINT_POINTER, blob.data.decode())
    return checkpoint.epoch


def _no_link_sha256(directory: Path, name: str) -> str:
    """The SHA-256 of a checkpoint file; UnsafeFileError (the mirror's warning) for a link,
    which would copy whatever it points at into the store."""
    with open_no_links(directory, name) as source:
        return file_sha256(source)


class CheckpointMirror:
    """Mirrors the run's checkpoint to the store in the background after each epoch, so a
    slow store never holds up the launcher; `close()` mirrors the last one and stops."""

    def __init__(self, store: ArtifactStore, run_dir: Path, keep: int) -> None:
        self.store, self.run_dir, self.keep = store, run_dir, keep
        self.logger = step_logger(__name__)
        self.pending, self.closing = threading.Event(), False
        self.thread = threading.Thread(target=self._run, name="checkpoint-mirror", daemon=True)
        self.thread.start()

    def epoch_done(self) -> None:
        self.pending.set()

    def _mirror(self) -> None:
        try:
            mirror_checkpoint(self.store, self.run_dir, self.keep)
        except Exception as exc:  # noqa: BLE001 - training goes on; the local copy stands
            self.logger.warning("checkpoint not copied to %s: %s", self.store.uri, exc)

    def _run(self) -> None:
        block_stop_signals()
        while True:
            self.pending.wait()
            self.pending.clear()
            if self.closing:
                return
            self._mirror()

    def close(self) -> None:
        self.closing = True
        self.pending.set()
        self.thread.join()
        self._mirror()
