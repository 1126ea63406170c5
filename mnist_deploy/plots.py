"""PNG plots. A leaf: takes plain arrays and lists, writes to the path it is given (format PNG)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def digit_grid(images: np.ndarray, titles: Sequence[str], path: str | os.PathLike, cols: int = 8) -> None:
    plt = _pyplot()
    n = len(images)
    rows = max(1, int(np.ceil(n / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.1, rows * 1.25))
    for i, ax in enumerate(np.atleast_1d(axes).ravel()):
        ax.axis("off")
        if i < n:
            ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
            ax.set_title(titles[i], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def training_curves(history: Sequence[dict], path: str | os.PathLike) -> None:
    """Loss and accuracy per epoch (train running values and test)."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax1.plot(epochs, [h["test_loss"] for h in history], "s-", label="test")
    ax1.set(xlabel="epoch", ylabel="cross-entropy loss", title="Loss")
    ax2.plot(epochs, [100 * h["train_accuracy"] for h in history], "o-", label="train")
    ax2.plot(epochs, [100 * h["test_accuracy"] for h in history], "s-", label="test")
    ax2.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_xticks(epochs)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def confusion_matrix_plot(cm: Sequence[Sequence[int]], path: str | os.PathLike, title: str = "") -> None:
    plt = _pyplot()
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(np.log1p(cm), cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set(xticks=range(10), yticks=range(10), xlabel="predicted", ylabel="true",
           title=title or "Confusion matrix (test set)")
    fig.colorbar(im, ax=ax, label="log(1 + count)")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def bench_plot(rows: Sequence[dict], path: str | os.PathLike, title: str = "") -> None:
    """Latency (p50) and throughput against batch size, one line per runtime/device, log axes."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    series: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("status") == "ok":
            series.setdefault(f"{r['runtime']} ({r['device']})", []).append(r)
    for label, pts in sorted(series.items()):
        pts = sorted(pts, key=lambda r: r["batch_size"])
        bs = [p["batch_size"] for p in pts]
        ax1.plot(bs, [p["p50_ms"] for p in pts], "o-", label=label)
        ax2.plot(bs, [p["throughput_per_s"] for p in pts], "o-", label=label)
    ax1.set(xscale="log", yscale="log", xlabel="batch size", ylabel="p50 latency per call (ms)", title="Latency")
    ax2.set(xscale="log", yscale="log", xlabel="batch size", ylabel="images / s", title="Throughput")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3, which="both")
    ax2.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)
