"""The whole pipeline on Omniglot through the ImageFolder source, on whatever device is here.

Background zip = train (964 characters), evaluation zip = test (659 characters, never seen in
training), leave-one-out retrieval over the 13,180 evaluation images. Runs the Prefect flow twice
in one temp project — trained, and untrained (``make_batches.epochs: 0``) — and prints one JSON line
per figure: mAP@R, Recall@1, ..., wall time and training img/s.

    python benchmarks/omniglot_pipeline.py [--data ../shared/datasets/omniglot] [--epochs 10] [--image-size 28]
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=omniglot_recipe.DEFAULT_DATA)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--workdir", type=Path, default=None, help="keep outputs here (default: temp)")
    args = parser.parse_args()
    overrides = omniglot_recipe.overrides(args.data, args.image_size, args.epochs)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="omniglot-"))
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", work / "params.yaml")
    results = {}
    for name, extra in (("trained", {}), ("untrained", {"make_batches.epochs": 0})):
        start = time.perf_counter()
        out = pipeline(params_file=str(work / "params.yaml"), overrides=overrides | extra)
        results[name] = out["metrics"] | {"wall_s": time.perf_counter() - start, "run_id": out["run_id"]}
        if name == "trained":
            curve = (work / "plots" / "train_curve.csv").read_text().splitlines()
    for key in ("map_at_r", "r_precision", "precision_at_1", "recall_at_1", "recall_at_8", "map_at_100"):
        print(json.dumps({
            "figure": f"omniglot_{key}", "trained": round(results["trained"][key], 4),
            "untrained": round(results["untrained"][key], 4), "n_queries": results["trained"]["n_queries"],
            "epochs": args.epochs, "image_size": args.image_size,
        }))
    print(json.dumps({"figure": "omniglot_wall_s", "trained": round(results["trained"]["wall_s"], 1),
                      "untrained": round(results["untrained"]["wall_s"], 1), "workdir": str(work)}))
    print(json.dumps({"figure": "omniglot_last_epoch", "train_curve": dict(zip(curve[0].split(","), curve[-1].split(",")))}))


if __name__ == "__main__":
    main()
