"""Stage 60's per-epoch history (history.csv) and learning curve (curve.png)."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from .artifacts import atomic_write


def write_history(path: Path, history: list[dict[str, Any]]) -> None:
    if not history:
        return
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    with atomic_write(path) as tmp:
        tmp.write_text(buf.getvalue())


def plot_curve(path: Path, history: list[dict[str, Any]], metric: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    if not history:
        return
    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ep, [h["loss"] for h in history], "o-", color="tab:blue", label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss", color="tab:blue")
    key = f"valid_{metric}"
    if any(key in h for h in history):
        ax2 = ax.twinx()
        ax2.plot(ep, [h.get(key, float("nan")) for h in history], "s-", color="tab:red",
                 label=f"valid {metric}")
        ax2.set_ylabel(f"validation {metric}", color="tab:red")
    ax.set_title(title)
    fig.tight_layout()
    try:
        with atomic_write(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
