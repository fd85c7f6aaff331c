"""tasks/train/history.py: epoch records, the kept epoch, the epoch line (pure)."""

from __future__ import annotations

from tasks.train.history import best_epoch, train_summary


def test_kept_epoch_is_the_best_validation_epoch_else_the_last() -> None:
    plain = [{"epoch": 1}, {"epoch": 2}]
    assert best_epoch(plain) == 2
    validated = [
        {"epoch": 1, "val_accuracy": 0.5, "train_accuracy": 0.4, "test_accuracy": 0.45},
        {"epoch": 2, "val_accuracy": 0.8, "train_accuracy": 0.7, "test_accuracy": 0.75},
        {"epoch": 3, "val_accuracy": 0.8, "train_accuracy": 0.9, "test_accuracy": 0.76},
    ]
    for record in validated:
        record["seconds"] = 1.5
    assert best_epoch(validated) == 2  # ties keep the earlier epoch
    assert train_summary(validated, num_proc=2) == {
        "epochs": 3,
        "train_accuracy": 0.7,
        "test_accuracy": 0.75,
        "val_accuracy": 0.8,
        "best_epoch": 2,
        "num_proc": 2,
        "seconds": 4.5,
    }
