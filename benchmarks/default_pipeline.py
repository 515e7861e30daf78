"""`dvc repro` of the bundled default on a fresh clone: wall time, and the trained network's
retrieval on unseen classes against the same pipeline with an untrained network.

    python benchmarks/default_pipeline.py [--seeds 0 1 2]

Clones the committed HEAD into a temp dir, runs `dvc repro` (timed), then re-runs with
`make_batches.epochs: 0` (no training step: the untrained network) and, per extra seed, with other
train/make_batches seeds. Prints one JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tasks.params import yaml_load  # noqa: E402  (as params.yaml reads: 3e-4 is a float)


def sh(cmd: list[str], cwd: Path) -> None:
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True, text=True)


def repro_with(clone: Path, changes: dict[str, dict]) -> tuple[dict, float]:
    params = yaml_load((clone / "params.yaml").read_text())
    for section, values in changes.items():
        params[section].update(values)
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    start = time.perf_counter()
    sh([sys.executable, "-m", "dvc", "repro"], clone)
    return json.loads((clone / "metrics.json").read_text()), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        default, wall = repro_with(clone, {})
        print(json.dumps({"figure": "dvc_repro_wall_s", "value": round(wall, 2), "cpus": os.cpu_count(), "target_s": 60}))
        trained = {0: default}
        for seed in args.seeds:
            if seed != 0:
                trained[seed], _ = repro_with(clone, {"train": {"seed": seed}, "make_batches": {"seed": seed}})
        untrained, _ = repro_with(clone, {"make_batches": {"epochs": 0, "seed": 0}, "train": {"seed": 0}})
        for key in ("map_at_r", "recall_at_1", "precision_at_1", "map_at_100"):
            values = [trained[s][key] for s in sorted(trained)]
            print(json.dumps({
                "figure": f"default_{key}", "trained": [round(v, 4) for v in values],
                "untrained": round(untrained[key], 4),
                "trained_minus_untrained": round(sum(values) / len(values) - untrained[key], 4),
                "seeds": sorted(trained),
            }))


if __name__ == "__main__":
    main()
