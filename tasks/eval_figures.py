"""Evaluate's pictures: which queries and items to draw, and their pixels (drawing is tasks.figures).

* ``retrieval_grid.png`` — ``grid_queries`` random queries (seeded) with their top results;
* ``worst_queries.png`` — the ``worst_queries`` queries with the lowest AP@R (ties: lower query
  index first), with their top results: where the model fails, in pictures;
* ``per_class_ap.png`` + ``paths.per_class_ap`` (CSV, a DVC plot) — mean AP@R of each class;
* ``projection.png`` — a 2-D PCA (or t-SNE) of up to ``projection_sample`` query embeddings
  (seeded sample), coloured by class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks import contracts as C
from tasks import figures
from tasks.params import EvaluateParams, Paths
from tasks.retrieval import Retrieval


def pixels_of(paths: Paths, item_ids: np.ndarray) -> np.ndarray:
    """uint8 (*item_ids.shape, H, W, C) pixels of items from ``paths.items``; black where an id is
    not there (or is None)."""
    wanted = sorted({i for i in item_ids.ravel() if isinstance(i, str)})
    items, meta = C.read_table(paths["items"], C.ITEMS, columns=[C.ITEM_ID, C.PIXELS])
    items = items.filter(pc.is_in(items[C.ITEM_ID], pa.array(wanted, pa.string())))
    shape = (meta["height"], meta["width"], meta["channels"])
    flat = np.concatenate([C.pixels_numpy(items[C.PIXELS]).reshape(-1, *shape), np.zeros((1, *shape), np.uint8)])
    row = {item: i for i, item in enumerate(items[C.ITEM_ID].to_pylist())}
    rows = np.vectorize(lambda i: row.get(i, -1), otypes=[np.int64])(item_ids) if item_ids.size else np.zeros(item_ids.shape, np.int64)
    return flat[rows]  # -1 picks the black image appended last


def _grid(paths: Paths, pick: np.ndarray, ret: Retrieval, query_ids, query_labels, gallery_ids, k: int, out: Path, ap=None) -> None:
    """Draw queries ``pick`` with their top ``k`` results (pixels read from ``paths.items``);
    ``ap`` (len(pick),): AP@R to print under each query label. No query: no picture (and none
    left from an earlier run: the flow, unlike DVC, does not empty the folder first)."""
    if len(pick) == 0:
        out.unlink(missing_ok=True)
        return
    k = min(k, ret.top_pos.shape[1])
    nb_pos = ret.top_pos[pick, :k]
    nb_ids = np.where(nb_pos >= 0, gallery_ids[np.maximum(nb_pos, 0)], None)  # None: no result
    labels = [str(lab) for lab in query_labels[pick]]
    if ap is not None:
        labels = [f"{lab}\nAP@R {a:.2f}" for lab, a in zip(labels, ap)]  # its own line: never cut off
    # Queries and their neighbours in one read of the items' pixels (a full column scan).
    ids = np.concatenate([np.asarray(query_ids[pick], dtype=object)[:, None], nb_ids.astype(object)], axis=1)
    px = pixels_of(paths, ids)  # (n, 1 + k, H, W, C)
    figures.retrieval_grid(px[:, 0], px[:, 1:], ret.top_hits[pick, :k], ret.top_scores[pick, :k], labels, out)


def draw(params: EvaluateParams, paths: Paths, ret: Retrieval, queries: np.ndarray, query_ids, query_labels, gallery_ids) -> None:
    """Write every picture (and the per-class AP CSV) into ``paths.figures``."""
    fig_dir, rng = paths["figures"], np.random.default_rng(params.seed)
    n = min(params.grid_queries, len(query_ids))
    pick = np.sort(rng.choice(len(query_ids), size=n, replace=False))
    _grid(paths, pick, ret, query_ids, query_labels, gallery_ids, params.grid_top_k, fig_dir / "retrieval_grid.png")

    ap = ret.values["map_at_r"]
    answered = np.flatnonzero(ret.values["n_relevant"] > 0)
    worst = answered[np.lexsort((answered, ap[answered]))][: params.worst_queries]
    _grid(paths, worst, ret, query_ids, query_labels, gallery_ids, params.grid_top_k, fig_dir / "worst_queries.png", ap[worst])

    labels = np.asarray(query_labels)[answered].astype(str)
    classes, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    per_class = np.bincount(inverse, weights=ap[answered], minlength=len(classes)) / np.maximum(counts, 1)
    C.write_text(paths["per_class_ap"], "label,map_at_r,n_queries\n" + "".join(f"{_csv(c)},{v:.6f},{n_}\n" for c, v, n_ in zip(classes, per_class, counts)))
    figures.ap_histogram(per_class, fig_dir / "per_class_ap.png", f"MAP@R per class ({len(classes)} classes)")

    m = min(params.projection_sample, len(queries))
    if m >= 3:
        sample = np.sort(rng.choice(len(queries), size=m, replace=False))
        xy = _project(queries[sample], params.projection, params.seed)
        figures.projection(xy, np.asarray(query_labels)[sample].astype(str), fig_dir / "projection.png", f"{params.projection.upper()} of {m} query embeddings")
    else:
        (fig_dir / "projection.png").unlink(missing_ok=True)


def _csv(label: str) -> str:
    return '"' + label.replace('"', '""') + '"' if any(ch in label for ch in ',"\n') else label


def _project(x: np.ndarray, method: str, seed: int) -> np.ndarray:
    """(m, D) -> (m, 2): PCA by SVD of the centred sample (sign fixed: deterministic), or t-SNE."""
    if method == "tsne":
        from sklearn.manifold import TSNE

        return TSNE(n_components=2, random_state=seed, init="pca", perplexity=min(30.0, (len(x) - 1) / 3)).fit_transform(x)
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    vt = vt[:2] * np.sign(vt[:2, [0]] + (vt[:2, [0]] == 0))  # SVD's sign is arbitrary: pin it
    return centred @ vt.T
