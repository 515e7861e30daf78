"""The official Omniglot one-shot classification benchmark: 20 runs of 20-way, 1-shot.

Lake, Salakhutdinov, Tenenbaum, "Human-level concept learning through probabilistic program
induction", Science 2015 (and ``all_runs.zip`` of github.com/brendenlake/omniglot): each run holds
20 training images (one per character, all from one alphabet, one drawer), 20 test images (another
drawing of each character, another drawer) and ``class_labels.txt`` — one line per test image,
``runNN/test/itemXX.png runNN/training/classYY.png``, its correct training image. Every test image
is classified as its nearest training image (here: in the model's embedding space); a run's
accuracy is the share right; the paper reports the **error rate** averaged over the 20 runs
(humans 4.5%, BPL 3.3%; chance is 95%).

Images are decoded exactly as ingest decodes them (:func:`tasks.sources.decode`), at the model's
image size and channels.

    python -m tasks.oneshot --model models/model.pt --runs ../shared/datasets/omniglot/all_runs.zip
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from tasks import ties
from tasks.cli import USER_ERRORS, device_arg
from tasks.errors import DatasetError
from tasks.sources import decode


@dataclass(frozen=True)
class OneShotRun:
    """One run: ``training`` and ``test`` encoded images; ``answer[i]`` indexes test i's class in
    ``training``."""

    name: str
    training: list[bytes]
    test: list[bytes]
    answer: np.ndarray


def read_runs(path: Path) -> list[OneShotRun]:
    """All runs (``run*/class_labels.txt``) under ``path``, a directory or a zip of one."""
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = set(zf.namelist())
            return _parse(sorted(names), lambda name: zf.read(name), path)
    if path.is_dir():
        names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
        return _parse(names, lambda name: (path / name).read_bytes(), path)
    raise FileNotFoundError(f"{path}: no such directory or zip file of one-shot runs")


def _parse(names: list[str], read: Callable[[str], bytes], where: Path) -> list[OneShotRun]:
    label_files = [n for n in names if PurePosixPath(n).name == "class_labels.txt"]
    if not label_files:
        raise DatasetError(f"{where}: no run*/class_labels.txt (expected the all_runs layout)")
    runs = []
    for lf in label_files:
        root = PurePosixPath(lf).parent.parent  # class_labels.txt names files as runNN/...
        pairs = [line.split() for line in read(lf).decode().splitlines() if line.strip()]
        if any(len(p) != 2 for p in pairs):
            raise DatasetError(f"{where}/{lf}: every line must be '<test image> <training image>'")
        training = sorted({t for _, t in pairs})
        try:
            test_bytes = [read(str(root / q)) for q, _ in pairs]
            train_bytes = [read(str(root / t)) for t in training]
        except KeyError as err:  # zip member named in class_labels.txt but absent
            raise DatasetError(f"{where}/{lf}: names a missing image {err}") from None
        answer = np.array([training.index(t) for _, t in pairs])
        runs.append(OneShotRun(PurePosixPath(lf).parent.name, train_bytes, test_bytes, answer))
    return runs


def score_runs(
    runs: list[OneShotRun],
    embed: Callable[[np.ndarray], np.ndarray],
    image_size: int,
    channels: int,
    metric: str = "inner_product",
) -> dict:
    """Classify each test image as its nearest training image; per-run and mean accuracy, error rate.

    ``embed``: uint8 (N, H, W, C) -> float (N, D). Nearest = largest inner product (cosine on the
    pipeline's unit embeddings) or smallest L2 distance; tied nearest images share the credit
    (:func:`tasks.ties.argmax_hit`).
    """
    per_run = {}
    for run in runs:
        pixels = np.stack([decode(b, image_size, channels) for b in run.training + run.test])
        emb = np.asarray(embed(pixels), dtype=np.float64)
        train, test = emb[: len(run.training)], emb[len(run.training) :]
        if metric == "l2":
            score = -((test[:, None, :] - train[None, :, :]) ** 2).sum(-1)
        else:
            score = test @ train.T
        per_run[run.name] = float(ties.argmax_hit(score, run.answer).mean())
    mean = float(np.mean(list(per_run.values())))
    return {"runs": len(runs), "accuracy_per_run": per_run, "mean_accuracy": mean, "error_rate": 1.0 - mean}


def model_embedder(model_path: Path, device: str = "cpu") -> tuple[Callable[[np.ndarray], np.ndarray], int, int]:
    """A saved model as an ``embed`` function -> (embed, image_size, channels)."""
    import torch

    from tasks.export_embeddings import embed as embed_batches
    from tasks.models import load_checkpoint, pick_device

    dev = pick_device(device)
    model = load_checkpoint(model_path, dev)

    def embed(pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).contiguous()
        return embed_batches(model, x, 512, dev, "oneshot: embed")

    return embed, int(model.config["image_size"]), int(model.config["in_channels"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tasks.oneshot", description="Omniglot 20-run one-shot benchmark")
    p.add_argument("--model", type=Path, required=True, help="a checkpoint written by train")
    p.add_argument("--runs", type=Path, required=True, help="all_runs.zip (or its unpacked directory)")
    p.add_argument("--metric", choices=("inner_product", "l2"), default="inner_product")
    p.add_argument("--device", type=device_arg, default="auto", help="cpu | cuda | cuda:N | auto")
    args = p.parse_args(argv)
    try:
        embed, size, channels = model_embedder(args.model, args.device)
        result = score_runs(read_runs(args.runs), embed, size, channels, args.metric)
    except USER_ERRORS as err:
        print(f"tripletflow oneshot: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps({"oneshot": result | {"model": str(args.model), "image_size": size}}))


if __name__ == "__main__":
    main()
