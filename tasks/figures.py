"""Pictures for people: the Recall@K curve, retrieval grids (query, top-k, right/wrong), a per-class
AP histogram and a 2-D projection of embeddings coloured by class."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from tasks.contracts import atomic_path  # noqa: E402

GREEN, RED, GREY = (0.1, 0.7, 0.2), (0.85, 0.1, 0.1), (0.5, 0.5, 0.5)


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)


def recall_curve(ks: np.ndarray, recall: np.ndarray, path: Path, title: str) -> None:
    """Recall@K against K (log-scaled x when K spans a decade)."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(ks, recall, marker="o", ms=3)
    if ks.max() >= 10:
        ax.set_xscale("log")
        ticks = [t for t in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if t <= ks.max()]
        ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.annotate(f"R@1 = {recall[0]:.3f}", (ks[0], recall[0]), textcoords="offset points", xytext=(8, -14))
    ax.set(xlabel="K", ylabel="Recall@K", ylim=(0, 1.02), title=title)
    ax.grid(alpha=0.3)
    _save(fig, path)


def retrieval_grid(
    queries: np.ndarray,
    neighbors: np.ndarray,
    correct: np.ndarray | None,
    scores: np.ndarray,
    query_labels: list[str],
    path: Path,
    neighbor_labels: np.ndarray | None = None,
) -> None:
    """One row per query: the query image, then its top-k results framed green (same label) or red
    (grey when ``correct`` is None: a query of unknown label). ``neighbor_labels`` (Q, k), optional,
    are printed under each result.

    queries (Q, H, W, C) uint8, neighbors (Q, k, H, W, C) uint8, correct (Q, k) bool, scores (Q, k).
    """
    q, k = scores.shape
    fig, axes = plt.subplots(q, k + 1, figsize=(1.3 * (k + 1), 1.45 * q), squeeze=False)
    gray = queries.shape[-1] == 1
    show = (lambda ax, img: ax.imshow(img[..., 0] if gray else img, cmap="gray" if gray else None, vmin=0, vmax=255))
    for i in range(q):
        show(axes[i, 0], queries[i])
        axes[i, 0].set_title(f"query\n{query_labels[i][-14:]}", fontsize=7)
        for j in range(k):
            ax = axes[i, j + 1]
            show(ax, neighbors[i, j])
            colour = GREY if correct is None else GREEN if correct[i, j] else RED
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3)
            extra = "" if neighbor_labels is None else f"\n{str(neighbor_labels[i, j])[-12:]}"
            ax.set_title(f"#{j + 1} {scores[i, j]:.3f}{extra}", fontsize=7, color=colour)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    _save(fig, path)


def ap_histogram(per_class: np.ndarray, path: Path, title: str) -> None:
    """Histogram of per-class mean AP (values in [0, 1]), with the mean marked."""
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(per_class, bins=np.linspace(0, 1, 21), color=(0.25, 0.45, 0.75), edgecolor="white")
    if len(per_class):
        ax.axvline(float(np.mean(per_class)), color=RED, ls="--", label=f"mean {np.mean(per_class):.3f}")
        ax.legend(fontsize=8)
    ax.set(xlabel="MAP@R of the class", ylabel="classes", xlim=(0, 1), title=title)
    _save(fig, path)


def projection(xy: np.ndarray, labels: np.ndarray, path: Path, title: str) -> None:
    """Scatter of 2-D points (m, 2) coloured by label; a legend when there are at most 20 labels."""
    classes, inverse = np.unique(labels, return_inverse=True)
    fig, ax = plt.subplots(figsize=(5.5, 5))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")  # tab20 pairs similar hues
    colours = cmap(inverse % cmap.N)
    ax.scatter(xy[:, 0], xy[:, 1], c=colours, s=6, alpha=0.8, linewidths=0)
    if len(classes) <= 20:
        for i, c in enumerate(classes):
            ax.scatter([], [], color=cmap(i % cmap.N), label=str(c)[-14:], s=12)
        ax.legend(fontsize=6, markerscale=1.5, loc="best")
    ax.set(title=f"{title}, {len(classes)} classes", xticks=[], yticks=[])
    _save(fig, path)
