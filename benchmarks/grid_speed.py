"""Retrieval-grid drawing: ours (one numpy mosaic + Pillow captions, tasks.figures.retrieval_grid)
against the reference — one matplotlib Axes per thumbnail, as a notebook draws it and as this
project did before (the loop is kept below) — on the same thumbnails.

    python benchmarks/grid_speed.py                     # 64 queries × (1 + 32), 16 px grey
    python benchmarks/grid_speed.py --queries 8 --k 6 --size 64 --channels 3

Prints one JSON line per figure: seconds and peak RSS of each (each drawn in its own process, so
one's peak cannot hide the other's; RSS includes the imports, ~115 MB), and their ratio, measured
in this run. CPU only: drawing never touches the GPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks import figures  # noqa: E402


def reference_grid(queries, neighbors, correct, scores, query_labels, path: Path) -> None:
    """The per-Axes grid (tasks/figures.py before the mosaic): a subplot, frame and title each."""
    import matplotlib.pyplot as plt

    q, k = scores.shape
    fig, axes = plt.subplots(q, k + 1, figsize=(1.3 * (k + 1), 1.45 * q), squeeze=False)
    gray = queries.shape[-1] == 1

    def show(ax, img):
        ax.imshow(img[..., 0] if gray else img, cmap="gray" if gray else None, vmin=0, vmax=255)

    for i in range(q):
        show(axes[i, 0], queries[i])
        axes[i, 0].set_title(f"query\n{query_labels[i][-14:]}", fontsize=7)
        for j in range(k):
            ax = axes[i, j + 1]
            show(ax, neighbors[i, j])
            colour = figures.GREEN if correct[i, j] else figures.RED
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3)
            ax.set_title(f"#{j + 1} {scores[i, j]:.3f}", fontsize=7, color=colour)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


DRAW = {"reference_per_axes": reference_grid, "ours_mosaic": figures.retrieval_grid}


def _one(a: argparse.Namespace) -> dict:
    """Draw with ``a.only`` in this process -> {seconds, peak_rss_mb} (the whole process: imports too)."""
    rng = np.random.default_rng(0)
    shape = (a.size, a.size, a.channels)
    queries = rng.integers(0, 256, (a.queries, *shape), dtype=np.uint8)
    neighbors = rng.integers(0, 256, (a.queries, a.k, *shape), dtype=np.uint8)
    correct = rng.random((a.queries, a.k)) < 0.5
    scores = np.sort(rng.random((a.queries, a.k)).astype(np.float32), axis=1)[:, ::-1]
    labels = [f"class{i % 10}" for i in range(a.queries)]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        DRAW[a.only](queries, neighbors, correct, scores, labels, Path(tmp) / "grid.png")
        seconds = time.perf_counter() - t
    return {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--channels", type=int, choices=(1, 3), default=1)
    ap.add_argument("--only", choices=sorted(DRAW), help=argparse.SUPPRESS)  # one variant, in a child process
    a = ap.parse_args()
    if a.only:
        print(json.dumps(_one(a)))
        return
    base = {"queries": a.queries, "thumbnails_per_row": a.k + 1, "size": a.size, "channels": a.channels}
    got = {}
    # Each in its own process: peak RSS is a process's, and one variant's must not hide the other's.
    for name in DRAW:
        cmd = [sys.executable, __file__, "--only", name] + [f"--{k}={v}" for k, v in vars(a).items() if k != "only"]
        got[name] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        print(json.dumps(base | {"figure": f"{name}_seconds", "value": round(got[name]["seconds"], 3),
                                 "peak_rss_mb": round(got[name]["peak_rss_mb"], 1)}))
    ratio = got["reference_per_axes"]["seconds"] / got["ours_mosaic"]["seconds"]
    print(json.dumps(base | {"figure": "speedup_vs_reference", "value": round(ratio, 1)}))


if __name__ == "__main__":
    main()
