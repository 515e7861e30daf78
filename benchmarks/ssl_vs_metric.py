"""Metric learning vs self-supervised learning on Omniglot, same pipeline, same budget.

Trains the same network for the same epochs on the 964 background characters twice — with labels
(TripletMarginLoss + semi-hard miner, P×K batches) and without (two augmented views, NT-Xent) —
and evaluates both on the 659 unseen evaluation characters (13,180 leave-one-out queries). Also
the untrained network. Prints one JSON line per row of the table.

    python benchmarks/ssl_vs_metric.py [--data ../shared/datasets/omniglot] [--epochs 10] [--image-size 28]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import omniglot_recipe
from flows.pipeline import pipeline

REPO = Path(__file__).resolve().parents[1]

ROWS = {
    "metric learning (semi-hard triplets)": {
        "train.mode": "supervised",
        "train.loss": {"name": "TripletMarginLoss", "margin": 0.2},
        "train.miner": {"name": "TripletMarginMiner", "margin": 0.2, "type_of_triplets": "semihard"},
    },
    "self-supervised (NT-Xent, no labels)": {
        "train.mode": "self_supervised",
        "train.loss": {"name": "NTXentLoss", "temperature": 0.1},
        "train.miner": None,
    },
    "untrained network": {"make_batches.epochs": 0},
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=omniglot_recipe.DEFAULT_DATA)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=28)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ssl-vs-metric-"))
    try:
        shutil.copy(REPO / "params.yaml", work / "params.yaml")
        common = omniglot_recipe.overrides(args.data, args.image_size, args.epochs)
        for name, overrides in ROWS.items():
            start = time.perf_counter()
            m = pipeline(params_file=str(work / "params.yaml"), overrides=common | overrides)["metrics"]
            curve = (work / "plots" / "train_curve.csv").read_text().splitlines()
            img_s = [float(line.split(",")[-1]) for line in curve[1:]]
            print(json.dumps({
                "figure": "ssl_vs_metric", "row": name, "map_at_r": round(m["map_at_r"], 4),
                "recall_at_1": round(m["recall_at_1"], 4), "recall_at_8": round(m["recall_at_8"], 4),
                "map_at_100": round(m["map_at_100"], 4), "wall_s": round(time.perf_counter() - start, 1),
                "train_img_per_s": round(sum(img_s) / len(img_s), 1) if img_s else None,
                "epochs": 0 if "untrained" in name else args.epochs, "image_size": args.image_size,
            }), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
