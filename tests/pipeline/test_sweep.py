"""The sweep's pure core: the grid, the choice of the best trial, the comparison."""

from __future__ import annotations

import pytest
from PIL import Image

from pipeline.sweep import (
    SweepError,
    Trial,
    best_trial,
    comparison_rows,
    grid_points,
    plot_comparison,
)


def trial(run_id: str, val: float, test: float, **params) -> Trial:
    return Trial(
        params=params,
        run_id=run_id,
        train_accuracy=0.8,
        val_accuracy=val,
        test_accuracy=test,
        gate_passed=test >= 0.8,
        published_uri=f"file:///store/runs/{run_id}",
    )


def test_grid_points_are_every_combination_with_typed_values():
    points = grid_points({"lr": [0.1, 0.3], "batch_size": [64.0, 256.0]})
    assert points == [
        {"batch_size": 64, "lr": 0.1},
        {"batch_size": 64, "lr": 0.3},
        {"batch_size": 256, "lr": 0.1},
        {"batch_size": 256, "lr": 0.3},
    ]
    assert all(isinstance(point["batch_size"], int) for point in points)


@pytest.mark.parametrize("grid", [{}, {"lr": []}])
def test_an_empty_grid_is_an_error(grid):
    with pytest.raises(SweepError, match="at least one value"):
        grid_points(grid)


def test_the_best_trial_is_chosen_by_validation_never_by_test_accuracy():
    trials = [
        trial("a", val=0.84, test=0.80, lr=0.1),
        trial("b", val=0.83, test=0.85, lr=0.3),  # best on test: must not be chosen
        trial("c", val=0.84, test=0.79, lr=0.03),  # ties with "a": the earlier one wins
    ]
    assert best_trial(trials).run_id == "a"
    rows = comparison_rows(trials, best_trial(trials))
    assert [row["best"] for row in rows] == ["<- best", "", ""]
    assert rows[1]["test_accuracy"] == 0.85


def test_the_comparison_plot_is_4_5_inches_wide_per_parameter(tmp_path):
    """What the PNG shows of its panels: its size. plot_comparison keeps its figure to itself,
    so the panels themselves are not counted; the width grows by one panel per parameter."""
    trials = [trial(str(i), 0.8 + i / 100, 0.8, lr=lr, epochs=5) for i, lr in enumerate([0.1, 0.3])]
    path = plot_comparison(trials, tmp_path / "sweep" / "comparison.png")
    with Image.open(path) as image:
        assert image.size == (900, 400)  # 2 panels x 4.5 in, 4 in, at 100 dpi
    for params in ({"lr": 0.1}, {"lr": 0.1, "epochs": 5, "batch_size": 64}):
        one = plot_comparison([trial("a", 0.8, 0.8, **params)], tmp_path / f"{len(params)}.png")
        with Image.open(one) as image:
            assert image.size == (450 * len(params), 400)
