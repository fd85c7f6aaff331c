"""Tests' short-hands for calling a step as the flow does: with a config alone.

A step reads its dataset cache (`data_dir`) and its run directory (`work_dir`/`run_id`) from
the config; tests that hold a dataset URI or a run directory made elsewhere point the config
at them here.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.base.config import PipelineConfig
from pipeline.base.uris import local_path


def for_run(
    config: PipelineConfig, data_uri: str, run_dir: Path | str | None = None
) -> PipelineConfig:
    """`config` reading the dataset cache `data_uri` and, when given, the run directory
    `run_dir` (a path or file:// URI) as WORK_DIR/RUN_ID."""
    update: dict[str, object] = {"data_dir": local_path(data_uri)}
    if run_dir is not None:
        path = run_dir if isinstance(run_dir, Path) else local_path(run_dir)
        update |= {"work_dir": path.parent, "run_id": path.name}
    return config.model_copy(update=update)


def trained(config: PipelineConfig, data_uri: str) -> Path:
    """Run the train step on `data_uri`; its run directory."""
    from tasks.train import step

    config = for_run(config, data_uri)
    step.train(config)
    return config.run_dir().resolve()


def published(config: PipelineConfig, data_uri: str, run_dir: Path | str) -> str:
    """Run the publish step for the run directory `run_dir`; the published run's URI."""
    from pipeline.flow import published_uri
    from tasks.publish.step import publish

    config = for_run(config, data_uri, run_dir)
    publish(config)
    return published_uri(config)
