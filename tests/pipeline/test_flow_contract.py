"""pipeline/flow.py: the step contract (the config alone) and a step's time budget (pure)."""

from __future__ import annotations

import inspect

from pipeline.base.config import PipelineConfig
from pipeline.flow import STEP_TASKS, step_budget

STEP_FUNCTIONS = {
    "dataset": ("tasks.dataset", "prepare_dataset"),
    "train": ("tasks.train.step", "train"),
    "evaluate": ("tasks.evaluate.step", "evaluate"),
    "publish": ("tasks.publish.step", "publish"),
}


def test_every_step_and_its_task_take_the_config_alone() -> None:
    for step, step_task in STEP_TASKS.items():
        assert list(inspect.signature(step_task.fn).parameters) == ["config"], step
        module, name = STEP_FUNCTIONS[step]
        function = getattr(__import__(module, fromlist=[name]), name)
        required = [
            p.name
            for p in inspect.signature(function).parameters.values()
            if p.default is inspect.Parameter.empty
        ]
        assert required == ["config"], (step, required)


def test_a_steps_budget_covers_every_attempt_and_retry_delay() -> None:
    config = PipelineConfig(dataset_timeout=100, train_timeout=50, publish_timeout=10)
    # dataset: 3 attempts of 100 s and two 5 s delays; train: one attempt, never retried.
    assert step_budget("dataset", config) == 3 * 100 + 2 * 5
    assert step_budget("train", config) == 50
    assert step_budget("publish", config) == 3 * 10 + 2 * 10
