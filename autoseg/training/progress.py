"""Training log: one JSON line per epoch (``log.jsonl``) and a ``progress.png`` plot."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from autoseg.io.atomic import atomic_path, write_text_atomic


class TrainingLog:
    """Epoch records of a run, kept in memory and mirrored to ``log.jsonl``.

    Args:
        path: the JSON-lines file; existing records are read (resume) and those at or after
            ``keep_before`` are dropped so a resumed run rewrites them.
    """

    def __init__(self, path: str | os.PathLike[str], *, keep_before: int | None = None) -> None:
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        if self.path.is_file() and keep_before is not None:
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a torn last line from a crash
                if isinstance(rec, dict) and rec.get("epoch", math.inf) < keep_before:
                    self.records.append(rec)
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, record: dict[str, Any]) -> None:
        """Add an epoch record (appended to the file and flushed)."""
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()

    def series(self, key: str) -> list[float]:
        """Values of ``key`` per record (NaN where missing)."""
        return [float(r.get(key, math.nan)) if r.get(key) is not None else math.nan for r in self.records]


def plot_progress(log: TrainingLog, path: str | os.PathLike[str]) -> None:
    """Write ``progress.png``: losses, pseudo Dice (mean and EMA), learning rate and epoch time."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    epochs = log.series("epoch")
    fig, axes = plt.subplots(3, 1, figsize=(9, 10), sharex=True)
    axes[0].plot(epochs, log.series("train_loss"), label="train loss")
    axes[0].plot(epochs, log.series("val_loss"), label="validation loss")
    twin = axes[0].twinx()
    twin.plot(epochs, log.series("mean_fg_dice"), "g:", label="pseudo Dice")
    twin.plot(epochs, log.series("ema_fg_dice"), "g-", label="pseudo Dice (EMA)")
    twin.set_ylabel("pseudo Dice")
    twin.set_ylim(0, 1)
    axes[0].set_ylabel("loss")
    lines = axes[0].get_legend_handles_labels()
    lines2 = twin.get_legend_handles_labels()
    axes[0].legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="upper right", fontsize=8)
    axes[1].plot(epochs, log.series("epoch_time"), label="epoch time (s)")
    axes[1].set_ylabel("seconds")
    axes[1].legend(loc="upper right", fontsize=8)
    axes[2].plot(epochs, log.series("lr"), label="learning rate")
    axes[2].set_ylabel("learning rate")
    axes[2].set_xlabel("epoch")
    axes[2].legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
