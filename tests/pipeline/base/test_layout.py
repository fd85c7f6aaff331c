"""pipeline/base/layout.py: one layout for every store and run directory."""

from __future__ import annotations

from pathlib import PurePosixPath

from pipeline.base import layout


def test_a_published_run_lives_under_runs_by_its_id() -> None:
    assert layout.run_key("20260101-abc") == "runs/20260101-abc"


def test_each_host_of_a_rendezvous_job_holds_its_own_lock() -> None:
    assert layout.run_lock(None) == ".run.lock"
    assert {layout.run_lock(0), layout.run_lock(1)} == {".run-host-0.lock", ".run-host-1.lock"}


def test_every_name_is_relative_and_slash_separated() -> None:
    names = [v for k, v in vars(layout).items() if k.isupper() and isinstance(v, str)]
    assert len(names) > 15
    for name in names:
        path = PurePosixPath(name)
        assert not path.is_absolute() and ".." not in path.parts and "\\" not in name, name


def test_what_is_never_published_is_hidden_or_an_unpublished_dir() -> None:
    for name in (layout.RANK_CONFIG, layout.RUN_LOCK):
        assert name.startswith(".")
    assert layout.CHECKPOINT_POINTER.split("/")[0] in layout.UNPUBLISHED_DIRS
