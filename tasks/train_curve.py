"""The training curve: one row per epoch — loss, mining statistics, validation Recall@1, learning
rate, img/s, and what an objective adds (cross-batch memory's ``memory_filled``) — logged to MLflow
as ``train.*`` metrics at the epoch's step, and written as ``paths.train_curve``, the CSV DVC plots.
"""

from __future__ import annotations

from pathlib import Path

from tasks import contracts as C
from tasks.tracking import NullTracker, Tracker

# The usual columns, in this order even where a run lacks one (nan): curves of two runs line up.
COLUMNS = ("epoch", "loss", "mined", "frac_active", "pos_distance", "neg_distance", "val_recall_at_1", "lr", "img_per_s")


def log_epoch(child: Tracker | NullTracker, parent: Tracker | NullTracker | None, row: dict[str, float]) -> None:
    """One epoch of the curve (``row``: epoch + its figures) as ``train.*`` metrics at that step,
    to the stage's run and (unless None) the pipeline's."""
    logged = {f"train.{k}": v for k, v in row.items() if k != "epoch"}
    for run in (child, parent) if parent is not None else (child,):
        run.metrics(logged, step=row["epoch"])


def write(path: Path, curve: list[dict[str, float]]) -> None:
    """The curve as CSV (atomic): COLUMNS, then any other statistic a row has, in first-seen order."""
    cols = list(COLUMNS) + list(dict.fromkeys(k for row in curve for k in row if k not in COLUMNS))
    lines = [",".join(cols)] + [",".join(f"{row.get(c, float('nan')):.6g}" for c in cols) for row in curve]
    C.write_text(path, "\n".join(lines) + "\n")
