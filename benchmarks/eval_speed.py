"""Evaluation speed: our exact chunked k-NN + metrics against pytorch-metric-learning's AccuracyCalculator,
and a scale run (G gallery × Q queries) with time and peak memory.

    python benchmarks/eval_speed.py                       # compare: 60,000 × 128-d in 11,000 classes
    python benchmarks/eval_speed.py --mode scale --gallery 1000000 --queries 100000

Prints one JSON line per figure; ratios come from timings taken in the same run.

compare — the same metrics (MAP@R, R-Precision, Precision@1), leave-one-out on one set, k =
largest class - 1 for both (AccuracyCalculator's ``k="max_bin_count"``). AccuracyCalculator's
k-NN is its own ``FaissKNN`` (exact faiss flat search, on the CPU unless faiss has GPUs), with
``IndexFlatIP`` in place of its default ``IndexFlatL2``: embeddings are L2-normalised, so both rank
alike, and inner product is the pipeline's default metric (``--metric l2`` compares the default
``IndexFlatL2`` with our ``l2``). Embeddings are random class centres plus noise, normalised, so
the metrics are far from 0 and 1 and a wrong neighbour would show. Values agree to float
rounding: two fp32 GEMMs may sum in different orders, so a near-tie (scores within ~1e-7) can
flip, which moves one query's AP — the JSON reports the largest difference.

scale — a gallery and a separate query set (queries are not in the gallery) drawn the same way;
exact search in tiles of ``--query-chunk × --gallery-block``; reports seconds, peak RSS
(``resource.getrusage``, the whole process including the data) and the metrics.

The device is CUDA when torch sees one (then our search runs there), else the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks import retrieval  # noqa: E402
from tasks.models import pick_device  # noqa: E402
from tasks.search import exact_chunks  # noqa: E402

METRICS = ("map_at_r", "r_precision", "precision_at_1")
PML_NAMES = {"map_at_r": "mean_average_precision_at_r", "r_precision": "r_precision", "precision_at_1": "precision_at_1"}


def embeddings(n: int, dim: int, labels: np.ndarray, centres: np.ndarray, noise: float, seed: int) -> np.ndarray:
    """float32 (n, dim), unit norm: centre of the label + Gaussian noise, made in slices (bounded memory)."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 65536):
        x = centres[labels[s : s + 65536]] + noise * rng.standard_normal((min(65536, n - s), dim), dtype=np.float32)
        out[s : s + len(x)] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def ours(q, q_labels, g, g_labels, self_pos, device, query_chunk, gallery_block, metric, map_k=None, precision="auto"):
    """-> (summary, seconds): label coding, R, search with k = max R, metrics — all timed."""
    start, cpu = time.perf_counter(), time.process_time()
    qc, gc = retrieval.label_codes(q_labels, g_labels)
    r = retrieval.n_relevant(qc, gc, self_pos)
    k = retrieval.needed_k(r, len(g), *([map_k] if map_k else []))
    chunks = exact_chunks(q, g, k, metric, self_pos, device, query_chunk, gallery_block, precision)
    ret = retrieval.score(chunks, qc, gc, r, map_k or k)
    out = retrieval.summary(ret, [1], map_k or k)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out | {"k": k, "cpu_seconds": time.process_time() - cpu}, time.perf_counter() - start


def pml(x: np.ndarray, labels: np.ndarray, device: torch.device, metric: str):
    import faiss
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import FaissKNN

    knn = FaissKNN(index_init_fn=faiss.IndexFlatIP if metric == "inner_product" else faiss.IndexFlatL2)
    calc = AccuracyCalculator(include=tuple(PML_NAMES.values()), k="max_bin_count", device=device, knn_func=knn)
    xt, lt = torch.from_numpy(x).to(device), torch.from_numpy(labels).to(device)
    start, cpu = time.perf_counter(), time.process_time()
    out = calc.get_accuracy(xt, lt)
    return out | {"cpu_seconds": time.process_time() - cpu}, time.perf_counter() - start


def compare(args, device) -> None:
    rng = np.random.default_rng(args.seed)
    labels = rng.integers(0, args.classes, size=args.n)
    centres = rng.standard_normal((args.classes, args.dim)).astype(np.float32)
    x = embeddings(args.n, args.dim, labels, centres, args.noise, args.seed + 1)
    common = {"metric": args.metric, "n": args.n, "dim": args.dim, "classes": args.classes, "device": str(device), "threads": torch.get_num_threads(), "precision": args.precision,
              "repeats": args.repeats, "loadavg_1min_before": os.getloadavg()[0]}
    # Interleaved repeats, best of each: the machine may be shared, so a slow spell should not
    # land on one tool only.
    # CPU seconds (process time) are reported too: with one thread they are the work done, which
    # a busy machine does not inflate as it does wall time.
    # The CPU selection kernels compile on first use (numba; cached on disk after): compile them
    # outside the timing, as a one-off per install, and report how long that took.
    warm = time.perf_counter()
    ours(x[:300], labels[:300], x[:300], labels[:300], np.arange(300), device, 128, 128, args.metric, precision=args.precision)
    common["warmup_seconds"] = round(time.perf_counter() - warm, 2)
    t_theirs = t_mine = c_theirs = c_mine = float("inf")
    for _ in range(args.repeats):
        theirs, t = pml(x, labels, device, args.metric)
        t_theirs, c_theirs = min(t_theirs, t), min(c_theirs, theirs["cpu_seconds"])
        mine, t = ours(x, labels, x, labels, np.arange(args.n), device, args.query_chunk, args.gallery_block, args.metric, precision=args.precision)
        t_mine, c_mine = min(t_mine, t), min(c_mine, mine["cpu_seconds"])
    print(json.dumps({"figure": "pml_accuracy_calculator", "seconds": round(t_theirs, 3), "cpu_seconds": round(c_theirs, 3), **{m: theirs[PML_NAMES[m]] for m in METRICS}, **common}))
    print(json.dumps({"figure": "tripletflow_exact", "seconds": round(t_mine, 3), "cpu_seconds": round(c_mine, 3), **{m: mine[m] for m in METRICS},
                      "k": mine["k"], "n_queries_without_relevant": mine["n_queries_without_relevant"], **common}))
    diff = max(abs(mine[m] - theirs[PML_NAMES[m]]) for m in METRICS)
    print(json.dumps({"figure": "speedup_vs_pml", "ratio": round(t_theirs / t_mine, 2), "cpu_ratio": round(c_theirs / c_mine, 2), "max_abs_metric_diff": diff, "identical_1e-6": diff <= 1e-6, **common}))


def scale(args, device) -> None:
    rng = np.random.default_rng(args.seed)
    g_labels = rng.integers(0, args.classes, size=args.gallery)
    q_labels = rng.integers(0, args.classes, size=args.queries)
    centres = rng.standard_normal((args.classes, args.dim)).astype(np.float32)
    g = embeddings(args.gallery, args.dim, g_labels, centres, args.noise, args.seed + 1)
    q = embeddings(args.queries, args.dim, q_labels, centres, args.noise, args.seed + 2)
    mine, seconds = ours(q, q_labels, g, g_labels, np.full(args.queries, -1), device, args.query_chunk, args.gallery_block, args.metric, map_k=100,
                         precision=args.precision)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB on Linux
    print(json.dumps({"figure": "scale_exact", "gallery": args.gallery, "queries": args.queries, "dim": args.dim,
                      "classes": args.classes, "seconds": round(seconds, 2), "peak_rss_gib": round(peak, 3),
                      "query_chunk": args.query_chunk, "gallery_block": args.gallery_block, "device": str(device),
                      "threads": torch.get_num_threads(), **mine}))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("compare", "scale"), default="compare")
    p.add_argument("--n", type=int, default=60_000, help="compare: items (queries = gallery)")
    p.add_argument("--classes", type=int, default=11_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--noise", type=float, default=1.5, help="noise around each class centre (per dimension)")
    p.add_argument("--gallery", type=int, default=100_000, help="scale: gallery size")
    p.add_argument("--queries", type=int, default=10_000, help="scale: queries")
    p.add_argument("--query-chunk", type=int, default=4096)
    p.add_argument("--gallery-block", type=int, default=16384)
    p.add_argument("--device", default="auto")
    p.add_argument("--metric", choices=("inner_product", "l2"), default="inner_product")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="our exact search's tiles (tasks.search: bf16 candidates re-scored in fp32, or fp32 throughout)")
    p.add_argument("--threads", type=int, default=0, help="torch, numba and faiss threads (both tools); 0 = default")
    p.add_argument("--repeats", type=int, default=1, help="compare: interleaved runs, best time of each")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        import faiss

        import numba

        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    device = pick_device(args.device)
    (compare if args.mode == "compare" else scale)(args, device)


if __name__ == "__main__":
    main()
