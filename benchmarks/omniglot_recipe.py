"""The Omniglot setup the benchmarks share: official zips through the ImageFolder source
(background = train, evaluation = test) and the training recipe, as params overrides."""

from __future__ import annotations

from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "omniglot"


def source(data: Path) -> dict:
    """``ingest.source`` for the official zips in ``data`` (absolute: params paths resolve against
    the temporary project, not the cwd)."""
    data = data.resolve()
    for name in ("images_background.zip", "images_evaluation.zip"):
        if not (data / name).exists():
            raise SystemExit(f"{data / name} not found: pass --data DIR with the official Omniglot zips")
    return {"kind": "image_folder", "train_root": str(data / "images_background.zip"),
            "test_root": str(data / "images_evaluation.zip")}


def overrides(data: Path, image_size: int, epochs: int, p: int = 32, k: int = 4) -> dict:
    return {
        "ingest.source": source(data),
        "ingest.image_size": image_size,
        "make_batches.classes_per_batch": p,
        "make_batches.images_per_class": k,
        "make_batches.epochs": epochs,
        "train.embedding_dim": 128,
        "train.optimizer": {"name": "AdamW", "lr": 0.001, "weight_decay": 0.0001},
        "evaluate.recall_at": [1, 2, 4, 8],
    }
