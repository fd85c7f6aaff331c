"""Per-epoch records, the kept epoch and the training summary (pure)."""

from __future__ import annotations

from typing import Any


def epoch_record(epoch: int, totals: list[float], validating: bool, seconds: float) -> dict:
    """One line of metrics/train.jsonl from an epoch's summed metrics."""
    loss, train_ok, test_ok, val_ok, n_train, n_test, n_val = totals
    record = {
        "epoch": epoch,
        "loss": loss / n_train,
        "train_accuracy": train_ok / n_train,
        "test_accuracy": test_ok / n_test,
    }
    if validating:
        record["val_accuracy"] = val_ok / n_val
    record["seconds"] = round(seconds, 4)
    return record


def best_epoch(history: list[dict[str, Any]]) -> int:
    """The epoch whose model is kept: best validation accuracy (earliest on ties) when
    validation is on, else the last epoch."""
    if "val_accuracy" not in history[-1]:
        return history[-1]["epoch"]
    return max(history, key=lambda record: (record["val_accuracy"], -record["epoch"]))["epoch"]


def train_summary(history: list[dict[str, Any]], num_proc: int) -> dict[str, Any]:
    """metrics/train.json: the accuracies of the kept model, and the training time."""
    kept = history[best_epoch(history) - 1]
    return {
        "epochs": len(history),
        "train_accuracy": kept["train_accuracy"],
        "test_accuracy": kept["test_accuracy"],
        "val_accuracy": kept.get("val_accuracy"),
        "best_epoch": kept["epoch"],
        "num_proc": num_proc,
        "seconds": round(sum(record["seconds"] for record in history), 3),
    }


def format_epoch(record: dict[str, Any], epochs: int) -> str:
    """The human-readable epoch line the launcher logs for rank 0's `EpochDone`."""
    val = f", val acc {record['val_accuracy']:.4f}" if "val_accuracy" in record else ""
    return (
        f"epoch {record['epoch']}/{epochs}: loss {record['loss']:.4f}, "
        f"train acc {record['train_accuracy']:.4f}, test acc {record['test_accuracy']:.4f}"
        f"{val}, {record['seconds']:.2f} s"
    )
