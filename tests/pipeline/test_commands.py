"""pipeline/commands.py: what each command prints and returns, called as the CLI calls it
(parsed by pipeline.cli's parser, in this process, on a real store and dataset cache)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.cli import build_parser
from pipeline.commands import config_from


def run(*argv: str) -> int:
    args = build_parser().parse_args(list(argv))
    return args.handler(args)


def test_artifacts_list_of_an_empty_store_says_so(tmp_path: Path, capsys) -> None:
    store = (tmp_path / "store").as_uri()
    assert run("artifacts", "--artifact-store", store, "list") == 0
    assert capsys.readouterr().out == f"no complete runs in {store}\n"


def test_dataset_offline_on_a_warm_cache_lists_each_verified_file(data_dir: Path, capsys) -> None:
    assert run("dataset", "--data-dir", str(data_dir), "--offline") == 0
    first, *files = capsys.readouterr().out.splitlines()
    assert first.startswith("dataset ready at file://")
    assert len(files) == 4 and all(" sha256 " in line for line in files)


def test_the_config_of_a_command_is_the_flags_over_the_defaults(monkeypatch) -> None:
    for name in ("PIPELINE_EPOCHS", "PIPELINE_LR"):
        monkeypatch.delenv(name, raising=False)
    config = config_from(build_parser().parse_args(["step", "train", "--epochs", "7"]))
    assert (config.epochs, config.lr) == (7, pytest.approx(config.model_fields["lr"].default))
