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


def character_folder(root: Path, transform):
    """torchvision ImageFolder over extracted Omniglot PNGs (``root/<alphabet>/<character>/``),
    labelled by character — ImageFolder alone would label by the first level, the alphabet."""
    import torchvision

    data = torchvision.datasets.ImageFolder(str(root), transform=transform)
    chars = sorted({str(Path(p).parent) for p, _ in data.samples})
    index = {c: i for i, c in enumerate(chars)}
    data.samples = [(p, index[str(Path(p).parent)]) for p, _ in data.samples]
    data.targets = [t for _, t in data.samples]
    return data


def rotated_classes(data, degrees: list[int], transform):
    """``data`` (a :func:`character_folder` without transform) plus copies rotated counter-clockwise
    by each of ``degrees``, each angle of each character a new class — what
    ``ingest.train_rotations`` gives the pipeline — then ``transform``; ``.targets`` for pml's sampler."""
    import torch

    n_classes, angles = max(data.targets) + 1, [0, *degrees]

    class Rotated(torch.utils.data.Dataset):
        targets = [t + a * n_classes for a in range(len(angles)) for t in data.targets]

        def __len__(self) -> int:
            return len(angles) * len(data)

        def __getitem__(self, i: int):
            a, j = divmod(i, len(data))
            image, _ = data[j]
            return transform(image.rotate(angles[a]) if angles[a] else image), self.targets[i]

    return Rotated()


def reference_objective():
    """pytorch-metric-learning's own recipe: (TripletMarginLoss, semi-hard TripletMarginMiner), margin 0.2."""
    from pytorch_metric_learning import losses, miners

    return losses.TripletMarginLoss(margin=0.2), miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")


def reference_step(model, objective, optimizer, x, y) -> None:
    """One fp32 step of the reference loop: embed, mine, loss, update."""
    loss_fn, miner = objective
    emb = model(x)
    loss = loss_fn(emb, y, miner(emb, y))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
