"""Pictures for people: the Recall@K curve, retrieval grids (query, top-k, right/wrong), a per-class
AP histogram and a 2-D projection of embeddings coloured by class."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib import font_manager  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from tasks import mosaic  # noqa: E402
from tasks.contracts import atomic_path  # noqa: E402
from tasks.params import GRID_MAX_RESULTS, GRID_MAX_ROWS  # noqa: E402

GREEN, RED, GREY = (0.1, 0.7, 0.2), (0.85, 0.1, 0.1), (0.5, 0.5, 0.5)
FONT_PX, LINE_PX = 10, 11  # the grids' captions: 7 pt at 100 dpi, as the other figures' small text


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
    """One row per query: the query image (black frame, its label above), then its top-k results
    framed green (same label) or red (grey when ``correct`` is None: a query of unknown label)
    under their rank and score. A caption line wider than its column is cut at the front.
    ``neighbor_labels`` (Q, k), optional, are printed under the score.

    queries (Q, H, W, C) uint8, neighbors (Q, k, H', W', C') uint8 (sizes and channels may differ),
    correct (Q, k) bool, scores (Q, k); Q >= 1.
    One numpy image (tasks.mosaic), captioned by Pillow: no matplotlib Axes per thumbnail.
    """
    q, k = scores.shape
    if q == 0:
        raise ValueError(f"{path.name}: a retrieval grid needs at least one query")
    if q > GRID_MAX_ROWS or k > GRID_MAX_RESULTS:
        # Evaluate's params refuse bigger grids; the query CLI's --k also sizes its JSON results,
        # so a bigger request is drawn in part rather than refused.
        print(f"tripletflow: warning: {path.name} shows the first {min(q, GRID_MAX_ROWS)} of {q} rows and "
              f"{min(k, GRID_MAX_RESULTS)} of {k} results (a bigger grid is not readable)", file=sys.stderr)
        q, k = min(q, GRID_MAX_ROWS), min(k, GRID_MAX_RESULTS)
    colour = np.full((q, k + 1, 3), GREY)
    colour[:, 0] = 0.0  # the query's frame: black
    if correct is not None:
        colour[:, 1:] = np.where(correct[:q, :k, None], GREEN, RED)
    rgb = np.round(colour * 255).astype(np.uint8)  # (q, 1 + k, 3)
    head = _captions(query_labels[:q], scores[:q, :k], None if neighbor_labels is None else neighbor_labels[:q, :k])
    lines = max(t.count("\n") + 1 for row in head for t in row)
    # Two blocks, not one array: the query command's queries come at the model's size, its results
    # from the items (another size, if ingested again since); compose resizes each.
    m = mosaic.compose([queries[:q, None], neighbors[:q, :k]], rgb, caption_px=lines * LINE_PX + 3)
    # Captions drawn by Pillow straight onto the mosaic, in matplotlib's own font: a matplotlib
    # figure re-samples the image and lays out each text (~2 ms a text), a few ms per thousand here.
    picture = Image.fromarray(m.image)
    draw, font = ImageDraw.Draw(picture), ImageFont.truetype(font_manager.findfont(font_manager.FontProperties()), FONT_PX)
    fit = functools.cache(lambda line: _fit(line, font, m.text_width))  # labels repeat down a grid
    for i in range(q):
        for j, text in enumerate(head[i]):
            text = "\n".join(fit(line) for line in text.split("\n"))
            draw.multiline_text((m.centre_x[j], m.frame_top[i] - 2), text, fill=tuple(int(v) for v in rgb[i, j]),
                                font=font, anchor="md", align="center", spacing=LINE_PX - FONT_PX)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")


def _captions(query_labels: list[str], scores: np.ndarray, neighbor_labels: np.ndarray | None) -> list[list[str]]:
    """(q, 1 + k) texts over a grid's thumbnails, for scores (q, k): "query" and the label, then
    rank and score (and the result's label)."""
    head = []
    for i, label in enumerate(query_labels):
        extra = [""] * scores.shape[1] if neighbor_labels is None else [f"\n{lab}" for lab in neighbor_labels[i]]
        head.append([f"query\n{label}"] + [f"#{j + 1} {s:.3f}{extra[j]}" for j, s in enumerate(scores[i])])
    return head


def _fit(line: str, font: ImageFont.FreeTypeFont, width: int) -> str:
    """``line``, or its end after "…" when it is wider than ``width`` px: labels such as
    ``Alphabet/character12`` differ at their ends, and a wider caption would run into its neighbours'."""
    if font.getlength(line) <= width:
        return line
    lo, hi = 1, len(line)  # the fewest characters to drop from the front so that it fits
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if font.getlength("…" + line[mid:]) <= width else (mid + 1, hi)
    return "…" + line[lo:]


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
            name = str(c)  # the end of a long label (Alphabet/character12 differ there), marked as cut
            ax.scatter([], [], color=cmap(i % cmap.N), label=name if len(name) <= 20 else "…" + name[-19:], s=12)
        ax.legend(fontsize=6, markerscale=1.5, loc="best")
    ax.set(title=f"{title}, {len(classes)} classes", xticks=[], yticks=[])
    _save(fig, path)
