"""Omniglot retrieval quality: every training recipe on the official protocol, and the reference loop.

Each row trains with ``params/omniglot.yaml`` (the preset; ``--preset params/omniglot-gpu.yaml`` for
the full-resolution GPU one) plus the row's loss/miner, for each seed,
through the six stage functions (what ``dvc repro`` and the flow run), all in one project folder so
every run lands in one MLflow store (``mlflow ui --backend-store-uri sqlite:///WORKDIR/mlflow.db``).
Per run: mAP@R, Recall@1 (leave-one-out over the 659 evaluation characters), 5/20-way 1-shot over
1,000 seeded episodes, the official 20 one-shot runs (Lake et al. 2015), train time and img/s.
The ``reference`` row is pytorch-metric-learning's own recipe — torchvision ImageFolder + DataLoader
with MPerClassSampler, TripletMarginMiner (semi-hard) + TripletMarginLoss, fp32 — with the preset's
network, batch, optimizer, epochs and augmentation, evaluated by the same stages.

``--protocol val`` is how the preset's hyper-parameters were chosen without touching the evaluation
set: train on 24 background alphabets, test on the other 6 (seeded choice among those with ≥ 20
characters), with 20 one-shot runs built from them as Lake's were (one alphabet, 20 characters,
two drawers).

Prints one JSON line per run and one per row (mean ± std over seeds); ``--markdown FILE`` writes
the README table with the commit it ran at.

    python benchmarks/omniglot_quality.py [--protocol test|val] [--preset FILE] [--rows semi-hard reference ...] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import shutil
import statistics
import subprocess
import tempfile
import time
import zipfile
from pathlib import Path

import omniglot_recipe
from tasks import build_index, evaluate, export_embeddings, ingest, make_batches, oneshot, train, tracking
from tasks.params import flatten, load_params
from tasks.params_preset import with_preset
from tasks.presets import PRESETS

REPO = Path(__file__).resolve().parents[1]
STAGES = (ingest, make_batches, train, export_embeddings, build_index, evaluate)


def _loss_row(name: str) -> dict:
    return {f"train.{k}": v for k, v in PRESETS[name].items()} | {"train.cross_batch_memory": PRESETS[name].get("cross_batch_memory", 0)}


def _self_supervised() -> dict:
    # No labels: two views of each image. Its augmentation is params.yaml's (made for it), not the
    # preset's milder supervised one.
    defaults = load_params(REPO / "params.yaml").train.augment.model_dump()
    return {"train.mode": "self_supervised", "train.loss": {"name": "NTXentLoss", "temperature": 0.1},
            "train.miner": None, "train.cross_batch_memory": 0, "train.augment": defaults}


ROWS = {name: _loss_row(name) for name in ("batch-all", "semi-hard", "batch-hard", "easy-positive-hard-negative",
                                           "multi-similarity", "cross-batch-memory", "nt-xent")}
ROWS["self-supervised"] = _self_supervised()
ROWS["reference"] = {}  # the preset's params; trained by reference_train instead of the train stage


def validation_split(data: Path, work: Path, n_alphabets: int = 6, seed: int = 0) -> tuple[dict, Path]:
    """The background set as a manifest (24 alphabets train, ``n_alphabets`` test) and 20 one-shot
    runs from the held-out alphabets -> (ingest.source, runs folder)."""
    root = work / "validation"
    if not (root / "manifest.csv").exists():
        with zipfile.ZipFile(data / "images_background.zip") as zf:
            zf.extractall(root)
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.png"))
        chars: dict[str, list[str]] = {}
        for f in files:
            chars.setdefault(f.split("/")[1], []).append(f.split("/")[2])
        chars = {a: sorted(set(c)) for a, c in chars.items()}
        held = sorted(random.Random(seed).sample(sorted(a for a, c in chars.items() if len(c) >= 20), n_alphabets))
        with open(root / "manifest.csv", "w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["path", "label", "split"])
            out.writerows([f, "/".join(f.split("/")[1:3]), "test" if f.split("/")[1] in held else "train"] for f in files)
        _make_runs(root, held, chars, random.Random(seed + 1))
    return {"kind": "manifest", "path": str(root / "manifest.csv")}, root / "runs"


def _make_runs(root: Path, alphabets: list[str], chars: dict[str, list[str]], rng: random.Random) -> None:
    """20 runs in all_runs.zip's layout: run r uses one alphabet, 20 of its characters, the
    training image by one drawer and the test image by another (files ``<id>_<drawer>.png``)."""
    for r in range(1, 21):
        alphabet = alphabets[(r - 1) % len(alphabets)]
        picked = sorted(rng.sample(chars[alphabet], 20))
        first, second = rng.sample(range(1, 21), 2)
        run = root / "runs" / f"run{r:02d}"
        (run / "training").mkdir(parents=True)
        (run / "test").mkdir()
        order = list(range(20))
        rng.shuffle(order)
        by_drawer = [{int(p.stem.split("_")[1]): p for p in (root / "images_background" / alphabet / c).glob("*.png")}
                     for c in picked]
        lines = []
        for i, drawings in enumerate(by_drawer):
            shutil.copy(drawings[first], run / "training" / f"class{i + 1:02d}.png")
        for j, i in enumerate(order):
            shutil.copy(by_drawer[i][second], run / "test" / f"item{j + 1:02d}.png")
            lines.append(f"run{r:02d}/test/item{j + 1:02d}.png run{r:02d}/training/class{i + 1:02d}.png")
        (run / "class_labels.txt").write_text("\n".join(lines) + "\n")


def reference_train(params, images_root: Path) -> dict:
    """pml's recipe on the preset's network, batch, optimizer, epochs and augmentation; writes the
    checkpoint where the train stage would, and the MLflow run the later stages log into."""
    import torch
    from pytorch_metric_learning import samplers
    from torchvision import transforms as T

    from tasks.models import EmbeddingNet, pick_device, save_checkpoint

    tp, mb, size = params.train, params.make_batches, params.ingest.image_size
    aug = tp.augment
    steps = [T.Grayscale(params.ingest.channels), T.Resize((size, size))]
    if aug.supervised:  # the same warp as tasks.augment: zoom-in crop, rotation, shift; white fill
        zoom = 1 / min(aug.crop_scale) ** 0.5
        steps.append(T.RandomAffine(aug.rotate, (aug.translate, aug.translate), (1.0, zoom), fill=255))
    # The pipeline's data: rotated copies as new classes if the preset adds them in ingest.
    data = omniglot_recipe.rotated_classes(omniglot_recipe.character_folder(images_root, None),
                                           params.ingest.train_rotations, T.Compose([*steps, T.PILToTensor()]))
    torch.manual_seed(tp.seed)
    batch = mb.classes_per_batch * mb.images_per_class
    sampler = samplers.MPerClassSampler(data.targets, m=mb.images_per_class, batch_size=batch, length_before_new_iter=len(data))
    loader = torch.utils.data.DataLoader(data, batch_size=batch, sampler=sampler, num_workers=2, drop_last=True,
                                         persistent_workers=True)
    device = pick_device(tp.device)  # the train stage's device, so a GPU run compares like with like
    model = EmbeddingNet({"backbone": tp.backbone, "width": tp.width, "embedding_dim": tp.embedding_dim,
                          "in_channels": params.ingest.channels, "image_size": size, "pooling": tp.pooling}).to(device).train()
    objective = omniglot_recipe.reference_objective()
    opt = getattr(torch.optim, tp.optimizer.name)(model.parameters(), **tp.optimizer.kwargs)
    seen, start = 0, time.perf_counter()
    for _ in range(mb.epochs):
        for x, y in loader:
            omniglot_recipe.reference_step(model, objective, opt, x.to(device), y.to(device))
            seen += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    paths = params.paths
    root = Path(paths.root)
    run_id = tracking.start_pipeline_run(root, tp.experiment, {"tripletflow.runner": "reference (pml recipe)"})
    tracking.Tracker(root, run_id).params(flatten(params.model_dump(exclude={"paths"})))
    tracking.write_run_info(paths["run_info"], run_id, tp.experiment)
    save_checkpoint(model.cpu().eval(), paths["model"], {"epochs": mb.epochs})
    return {"img_per_s": seen / seconds, "train_s": seconds}


def run_one(work: Path, preset: Path, overrides: dict, runs: Path, reference_images: Path | None) -> dict:
    params = load_params(work / "params.yaml", with_preset(preset, overrides))
    # Every run trains from scratch: a state left by a stopped invocation in this workdir would
    # otherwise resume (same params) and the train time would cover only the remaining epochs.
    params.paths["train_state"].unlink(missing_ok=True)
    times, result = {}, {}
    for module in STAGES:
        name = module.__name__.rsplit(".", 1)[-1]
        start = time.perf_counter()
        if name == "train" and reference_images is not None:
            result = reference_train(params, reference_images)
        else:
            module.run(getattr(params, name), params.paths)
            if name == "train":
                curve = list(csv.DictReader((work / "plots" / "train_curve.csv").open()))
                result = {"img_per_s": statistics.mean(float(r["img_per_s"]) for r in curve)}
        times[name] = time.perf_counter() - start
    result["train_s"] = result.get("train_s", times["train"])
    metrics = json.loads((work / "metrics.json").read_text())
    embed, size, channels = oneshot.model_embedder(work / "models" / "model.pt", params.evaluate.device)
    official = oneshot.score_runs(oneshot.read_runs(runs), embed, size, channels)
    keys = ("map_at_r", "recall_at_1", "few_shot_5way_1shot", "few_shot_20way_1shot")
    run_id = json.loads(params.paths["run_info"].read_text())["run_id"]
    return {k: metrics[k] for k in keys} | {"oneshot_20_runs": official["mean_accuracy"], "run_id": run_id,
                                            "stage_s": {k: round(v, 1) for k, v in times.items()}} | result


def summarize(row: str, runs: list[dict]) -> dict:
    out = {"figure": "omniglot_quality_row", "row": row, "seeds": len(runs)}
    for key in ("map_at_r", "recall_at_1", "few_shot_5way_1shot", "few_shot_20way_1shot", "oneshot_20_runs", "train_s", "img_per_s"):
        values = [r[key] for r in runs]
        out[key] = round(statistics.mean(values), 4)
        out[key + "_std"] = round(statistics.stdev(values), 4) if len(values) > 1 else 0.0
    return out


def markdown(rows: list[dict], commit: str, protocol: str) -> str:
    def pm(r: dict, k: str, f: float = 100, d: int = 1) -> str:  # mean ± std, or the one value
        return f"{r[k] * f:.{d}f}" + (f" ± {r[k + '_std'] * f:.{d}f}" if r["seeds"] > 1 else "")

    head = ("| recipe | mAP@R (%) | Recall@1 (%) | 20-way 1-shot, official runs (%) | 20-way 1-shot, 1,000 episodes (%) "
            "| 5-way 1-shot (%) | train time (s) | img/s | seeds |\n|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['row']} | {pm(r, 'map_at_r')} | {pm(r, 'recall_at_1')} | {pm(r, 'oneshot_20_runs')} | "
        f"{pm(r, 'few_shot_20way_1shot')} | {pm(r, 'few_shot_5way_1shot')} | {pm(r, 'train_s', 1, 0)} | {r['img_per_s']:,.0f} | {r['seeds']} |\n"
        for r in rows
    )
    return f"Protocol `{protocol}`, commit `{commit}`; mean ± std over the seeds of each row (column `seeds`).\n\n" + head + body


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=omniglot_recipe.DEFAULT_DATA)
    parser.add_argument("--protocol", choices=("test", "val"), default="test")
    parser.add_argument("--preset", type=Path, default=REPO / "params" / "omniglot.yaml",
                        help="the preset every row starts from (params/omniglot-gpu.yaml: full resolution, for a GPU)")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--seeded-rows", nargs="*", choices=list(ROWS), default=None,
                        help="rows run with every seed (default: all); the others with the first seed only")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="extra overrides for every row")
    parser.add_argument("--workdir", type=Path, default=None, help="project folder (default: a temporary one)")
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="omniglot-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", work / "params.yaml")
    data = args.data.resolve()
    if args.protocol == "val":
        source, runs = validation_split(data, work)
        reference_images = None
    else:
        source, runs = omniglot_recipe.source(data), data / "all_runs.zip"
        reference_images = work / "background"
        if not reference_images.exists():
            with zipfile.ZipFile(data / "images_background.zip") as zf:
                zf.extractall(reference_images)
        reference_images = reference_images / "images_background"
    if args.protocol == "val" and "reference" in args.rows:
        raise SystemExit("the reference row runs on --protocol test only (its ImageFolder would see the held-out alphabets)")
    extra = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    try:  # a copy of the tree without git (the lent GPU machine) still runs, commit "unknown"
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    commit = commit or "unknown"
    print(json.dumps({"figure": "omniglot_quality_setup", "workdir": str(work), "protocol": args.protocol, "commit": commit,
                      "preset": str(args.preset),
                      "mlflow": f"mlflow ui --backend-store-uri sqlite:///{work / 'mlflow.db'}"}), flush=True)
    summaries = []
    for row in args.rows:
        runs_of_row = []
        for seed in args.seeds if args.seeded_rows is None or row in args.seeded_rows else args.seeds[:1]:
            overrides = {"ingest.source": source, "make_batches.seed": seed, "train.seed": seed,
                         "train.experiment": f"omniglot-{args.protocol}", "evaluate.registered_model": None} | ROWS[row] | extra
            result = run_one(work, args.preset.resolve(), overrides, runs, reference_images if row == "reference" else None)
            runs_of_row.append(result)
            print(json.dumps({"figure": "omniglot_quality_run", "row": row, "seed": seed, **result}), flush=True)
        summaries.append(summarize(row, runs_of_row))
        print(json.dumps(summaries[-1]), flush=True)
    if args.markdown:
        args.markdown.write_text(markdown(summaries, commit, args.protocol))


if __name__ == "__main__":
    main()
