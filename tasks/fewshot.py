"""N-way K-shot classification accuracy from seeded episodes over a labelled embedding set.

The few-shot protocol of Vinyals et al., "Matching Networks for One Shot Learning", NeurIPS 2016,
as used to evaluate embeddings (Snell et al., "Prototypical Networks for Few-shot Learning",
NeurIPS 2017): an *episode* draws N classes (ways) from the classes that have at least K + Q items,
then K support and Q query items of each (without replacement); every query is assigned the class
whose prototype — the mean of its K support embeddings — is nearest; the episode's accuracy is the
share of its N·Q queries classified right. We report the mean over episodes and the 95% confidence
half-width ``1.96 · std / sqrt(episodes)`` (the sample std, ddof 1; 0 for one episode), as those papers do.

Nearest: for ``l2``, the smallest squared Euclidean distance to the prototype (Snell et al.); for
``inner_product``, the largest cosine between query and prototype (the mean of unit vectors is not
unit; normalising it is what cosine retrieval does). With K = 1 both are 1-nearest-neighbour.
Ties are drawn at random: a query tied between its class and another counts 1/2
(:func:`tasks.ties.argmax_hit`). Episodes depend only on
``seed`` and the labels, so two models are compared on the same episodes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from tasks import contracts as C
from tasks import ties
from tasks.errors import DatasetError
from tasks.params import FewShotParams


def episodes_accuracy(
    embeddings: np.ndarray,
    labels: np.ndarray,
    ways: int,
    shots: int,
    queries: int,
    episodes: int,
    seed: int,
    metric: str = "inner_product",
) -> tuple[float, float]:
    """-> (mean accuracy, 95% half-width) over ``episodes`` seeded N-way K-shot episodes.

    embeddings float32 (N_items, D), labels (N_items,) of any comparable dtype. Raises ValueError
    when fewer than ``ways`` classes have ``shots + queries`` items (say so rather than score
    fewer ways).
    """
    if min(ways, shots, queries, episodes) < 1 or ways < 2:
        raise ValueError(f"need ways >= 2 and shots, queries, episodes >= 1; got {ways}, {shots}, {queries}, {episodes}")
    if metric not in ("inner_product", "l2"):
        raise ValueError(f"metric must be inner_product or l2, got {metric!r}")
    _, codes, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
    if problem := _unfillable(counts, ways, shots, queries):
        raise ValueError(problem)
    # Items of each class, in item order: one sort, not one pass per class (10k classes × 100k items).
    members = np.split(np.argsort(codes.ravel(), kind="stable"), np.cumsum(counts)[:-1])
    eligible = [m for m in members if len(m) >= shots + queries]
    rng = np.random.default_rng(seed)
    x = np.asarray(embeddings, dtype=np.float32)
    acc = np.empty(episodes)
    truth = np.repeat(np.arange(ways), queries)
    for e in range(episodes):
        picked = rng.choice(len(eligible), size=ways, replace=False)
        draws = np.stack([rng.choice(eligible[c], size=shots + queries, replace=False) for c in picked])  # (N, K+Q)
        support = x[draws[:, :shots]]  # (N, K, D)
        query = x[draws[:, shots:].reshape(-1)]  # (N·Q, D)
        proto = support.mean(axis=1)  # (N, D)
        if metric == "l2":
            score = -((query[:, None, :] - proto[None, :, :]) ** 2).sum(-1)
        else:
            score = query @ (proto / np.maximum(np.linalg.norm(proto, axis=1, keepdims=True), 1e-12)).T
        acc[e] = ties.argmax_hit(score, truth).mean()
    half = 1.96 * acc.std(ddof=1) / np.sqrt(episodes) if episodes > 1 else 0.0
    return float(acc.mean()), float(half)


def _unfillable(counts: np.ndarray, ways: int, shots: int, queries: int) -> str | None:
    """Why episodes cannot be drawn from classes of ``counts`` items (C,), or None."""
    eligible = int((counts >= shots + queries).sum())
    if eligible >= ways:
        return None
    return (f"{ways}-way {shots}-shot with {queries} queries per class needs {ways} classes of at least "
            f"{shots + queries} items; only {eligible} of {len(counts)} classes have that many")


def known(query_codes: np.ndarray, gallery_codes: np.ndarray) -> np.ndarray:
    """(Q,) bool: the queries of a class the gallery has, the only ones episodes draw from — a
    query of none (GLDv2's queries without a landmark, all one label) is no class to tell apart,
    as it counts in no retrieval metric. Codes (Q,), (G,): :func:`tasks.retrieval.label_codes`."""
    return np.isin(query_codes, gallery_codes)


def check_items(fs: FewShotParams, items_path: Path) -> None:
    """Raise the DatasetError evaluate would, from the items alone (their labels and query /
    gallery flags are the embeddings'): the flow asks right after ingest, not after the training."""
    if not fs.ways:
        return
    from tasks.retrieval import label_codes

    table, _ = C.read_table(items_path, C.ITEMS, columns=[C.LABEL, C.IS_QUERY, C.IS_GALLERY])
    labels = [table[C.LABEL].filter(pc.equal(table[flag], True)).to_numpy(zero_copy_only=False)
              for flag in (C.IS_QUERY, C.IS_GALLERY)]
    qc, gc = label_codes(*labels)  # integers: np.isin on object arrays compares every pair
    counts = np.unique(qc[known(qc, gc)], return_counts=True)[1]
    for ways in fs.ways:
        for shots in fs.shots:
            if problem := _unfillable(counts, ways, shots, fs.queries):
                raise DatasetError(f"evaluate.few_shot: the queries of {items_path}: {problem} (set "
                                   "evaluate.few_shot.ways: [] to skip)")


def report(fs: FewShotParams, embeddings: np.ndarray, labels: np.ndarray, seed: int, metric: str) -> dict[str, float]:
    """``few_shot_{N}way_{K}shot`` accuracy and its ``_ci95`` half-width for each N in ``fs.ways``
    and K in ``fs.shots``; episodes the data cannot fill are a DatasetError naming the key."""
    out: dict[str, float] = {}
    for ways in fs.ways:
        for shots in fs.shots:
            try:
                mean, half = episodes_accuracy(embeddings, labels, ways, shots, fs.queries, fs.episodes, seed, metric)
            except ValueError as err:
                raise DatasetError(f"evaluate.few_shot: {err} (set evaluate.few_shot.ways: [] to skip)") from None
            out |= {f"few_shot_{ways}way_{shots}shot": mean, f"few_shot_{ways}way_{shots}shot_ci95": half}
    return out
