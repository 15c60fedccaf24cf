"""Loss curves and evaluation figures from metrics.jsonl, drawn to PNG."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(path: str | Path) -> list[dict]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def plot_metrics(metrics_file: str | Path, png: str | Path) -> None:
    records = read_metrics(metrics_file)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if any("/" in k for k in r)]
    keys = sorted({k for r in evals for k in r if k.endswith(("t2i_r1", "zeroshot_acc", "lm_loss"))})
    fig, axes = plt.subplots(1, 2 if keys else 1, figsize=(10 if keys else 5, 3.5), squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1.2)
    ax.set(xlabel="step", ylabel="training loss", title="loss")
    ax.grid(alpha=0.3)
    if keys:
        ax = axes[0][1]
        for k in keys:
            pts = [(r["step"], r[k]) for r in evals if k in r]
            ax.plot(*zip(*pts), marker="o", ms=3, label=k)
        ax.set(xlabel="step", title="evaluation")
        if not any(k.endswith("lm_loss") for k in keys):  # recalls and accuracies
            ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
