"""Does training help on the bundled digits? Recipes against the untrained network, over class splits.

    python benchmarks/default_splits.py [--splits 5 0 1 ...] [--seeds 0 1 2] [--recipes default augment ...]

The default test split (3 digits) is one draw of which classes are unseen: a recipe that beats the
untrained network there may not on another. For each ``ingest.seed`` in ``--splits`` (another 3
test digits each; 5 is the default's), the digits are ingested once into a temp project, then each
recipe — params changes over ``params.yaml`` — runs make_batches → evaluate in this process for
each train seed in ``--seeds`` (``train.seed`` and ``make_batches.seed``), as does the untrained
network of each seed (``make_batches.epochs: 0``: the same initial weights). A recipe that changes
``ingest`` params (rotated train copies) gets its own ingest of the split: its test items are the
same, so it is compared with the same untrained network. Prints one JSON line
per run (mAP@R and its gain over the untrained network of its split and seed), then one per
recipe: mean gain, worst gain, runs below untrained.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tasks import build_index, evaluate, export_embeddings, ingest, make_batches, train  # noqa: E402
from tasks import contracts as C  # noqa: E402
from tasks.params import apply_overrides, load_params, yaml_load  # noqa: E402

NTXENT = {"train.loss": {"name": "NTXentLoss", "temperature": 0.1}, "train.miner": None}
RECIPES: dict[str, dict] = {
    "default": {},
    "12 epochs": {"make_batches.epochs": 12},
    "20 epochs": {"make_batches.epochs": 20},
    "20 epochs, lr 1e-3, cosine": {"make_batches.epochs": 20, "train.optimizer.lr": 0.001, "train.lr_schedule": "cosine"},
    "augment": {"train.augment.supervised": True},
    "augment, 12 epochs": {"train.augment.supervised": True, "make_batches.epochs": 12},
    "augment, lr 1e-3": {"train.augment.supervised": True, "train.optimizer.lr": 0.001},
    "nt-xent": NTXENT,
    "nt-xent + augment": NTXENT | {"train.augment.supervised": True},
    "nt-xent + augment, 12 epochs": NTXENT | {"train.augment.supervised": True, "make_batches.epochs": 12},
    "self-supervised": NTXENT | {"train.mode": "self_supervised"},
    # Each rotated copy a new class: 28 train classes from 7 digits (Omniglot's trick, below).
    "rotations": {"ingest.train_rotations": [90, 180, 270]},
    "rotations + augment": {"ingest.train_rotations": [90, 180, 270], "train.augment.supervised": True},
}
TABLE = ["default", "augment", "augment, 12 epochs", "augment, lr 1e-3", "nt-xent + augment", "nt-xent + augment, 12 epochs",
         "self-supervised", "rotations", "rotations + augment"]
STAGES = (make_batches, train, export_embeddings, build_index, evaluate)


def map_at_r(root: Path, changes: dict) -> float:
    """make_batches → evaluate on the project's ingested items; its output quiet."""
    params = load_params(root / "params.yaml", changes)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        for stage in STAGES:
            result = stage.run(getattr(params, stage.__name__.rsplit(".", 1)[-1]), params.paths)
    return result["map_at_r"]


def ingested(root: Path, changes: dict) -> Path:
    """A temp project at ``root``: params.yaml with ``changes`` (dotted keys), the digits ingested."""
    root.mkdir()
    raw = apply_overrides(yaml_load((REPO / "params.yaml").read_text()), changes)
    raw["evaluate"]["registered_model"] = None  # no model registry: figures only
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    params = load_params(root / "params.yaml")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ingest.run(params.ingest, params.paths)
    return root


def unseen_digits(root: Path) -> str:
    """The split's unseen digits ("2,4,6"): rotated train copies can look like one (a 9 turned 180° is a 6)."""
    items, _ = C.read_table(load_params(root / "params.yaml").paths["items"], C.ITEMS, columns=[C.LABEL, C.SPLIT])
    return ",".join(sorted(set(items.filter(pc.equal(items[C.SPLIT], C.TEST))[C.LABEL].to_pylist())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--splits", type=int, nargs="+", default=[5, 0, 1, 2, 3, 4, 6, 7, 8, 9], help="ingest.seed values (5: the default's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train and make_batches seeds")
    ap.add_argument("--recipes", nargs="+", default=TABLE, choices=list(RECIPES), help="default: the README's table")
    args = ap.parse_args()
    gains: dict[str, list[float]] = {name: [] for name in args.recipes}
    with tempfile.TemporaryDirectory(prefix="tripletflow-splits-") as tmp:
        projects: dict[str, Path] = {}  # ingest changes (the split's seed and a recipe's), as JSON -> its project

        def project(ingest_changes: dict) -> Path:
            key = json.dumps(ingest_changes, sort_keys=True)
            if key not in projects:
                projects[key] = ingested(Path(tmp) / f"project{len(projects)}", ingest_changes)
            return projects[key]

        for split in args.splits:
            plain = project({"ingest.seed": split})
            digits = unseen_digits(plain)
            # The untrained network of each train seed: its initial weights alone move mAP@R by ~0.05.
            untrained_of = {seed: map_at_r(plain, {"make_batches.epochs": 0, "train.seed": seed}) for seed in args.seeds}
            for name in args.recipes:
                root = project({"ingest.seed": split} | {k: v for k, v in RECIPES[name].items() if k.startswith("ingest.")})
                changes = {k: v for k, v in RECIPES[name].items() if not k.startswith("ingest.")}
                for seed in args.seeds:
                    untrained = untrained_of[seed]
                    m = map_at_r(root, changes | {"train.seed": seed, "make_batches.seed": seed})
                    gains[name].append(m - untrained)
                    print(json.dumps({"figure": "digits_split_map_at_r", "split": split, "test_digits": digits,
                                      "recipe": name, "seed": seed,
                                      "map_at_r": round(m, 4), "untrained": round(untrained, 4),
                                      "gain": round(m - untrained, 4)}), flush=True)
    for name, g in gains.items():
        print(json.dumps({"figure": "digits_recipe_gain", "recipe": name, "runs": len(g), "mean_gain": round(float(np.mean(g)), 4),
                          "worst_gain": round(min(g), 4), "runs_below_untrained": sum(x < 0 for x in g)}))


if __name__ == "__main__":
    main()
