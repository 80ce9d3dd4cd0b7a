"""Per-run records of hipt-finetune besides results.json: per-epoch TensorBoard scalars in each
fold's directory and a CLAM-style summary.csv (one row per fold)."""
from __future__ import annotations

import csv
import math


class EpochWriter:
    """Callable ``log(row)`` for ``LGPTrainer.train``: every "train/..." and "val/..." number of
    the epoch row becomes a TensorBoard scalar at step ``row["epoch"]``."""

    def __init__(self, logdir: str):
        from tensorboardX import SummaryWriter

        self.writer = SummaryWriter(logdir)

    def __call__(self, row: dict) -> None:
        for key, value in row.items():
            if "/" in key and isinstance(value, (int, float)) and not math.isnan(value):
                self.writer.add_scalar(key, value, row["epoch"])
        self.writer.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.writer.close()


def write_summary_csv(path: str, fold_results: list[dict]) -> None:
    """CLAM's summary.csv: ``folds``, then ``test_<metric>`` and ``val_<metric>`` per fold, plus
    which model was evaluated on test (best_val or final_epoch) and its epoch."""
    metrics = list(fold_results[0]["test"])
    has_val = any("val" in r for r in fold_results)
    header = ["folds"] + [f"test_{m}" for m in metrics] + ([f"val_{m}" for m in metrics] if has_val else [])
    header += ["evaluated", "epoch"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in fold_results:
            ev = r.get("evaluated", {})
            row = [r["fold"]] + [r["test"][m] for m in metrics]
            if has_val:
                row += [r.get("val", {}).get(m, "") for m in metrics]
            w.writerow(row + [ev.get("model", "final_epoch"), ev.get("epoch", "")])
