"""Training bookkeeping: metrics CSV/JSON and the loss-curve PNG (matplotlib, Agg backend)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

CSV_FIELDS = ("step", "samples", "elapsed_s", "lr", "train_loss", "val_loss", "val_ctx_mse", "val_hidden_mse")


def write_metrics(out: Path, history: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    """Write ``metrics.csv`` (one row per logged step) and ``metrics.json`` (summary + history)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "metrics.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for row in history:
            w.writerow({k: row.get(k, "") for k in CSV_FIELDS})
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps({"summary": summary, "history": history}, indent=1))
    tmp.replace(out / "metrics.json")


def plot_loss_curve(history: list[dict[str, Any]], path: Path, title: str = "rigfm pretraining") -> Path:
    """Plot train loss (and val loss where present) against step, log-scale y."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    tr = [(h["step"], h["train_loss"]) for h in history if h.get("train_loss") not in (None, "")]
    va = [(h["step"], h["val_loss"]) for h in history if h.get("val_loss") not in (None, "")]
    if tr:
        ax.plot(*zip(*tr, strict=True), label="train (Huber)", lw=1.0)
    if va:
        ax.plot(*zip(*va, strict=True), "o-", label="val (Huber)", ms=3)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
