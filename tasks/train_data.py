"""The train stage's inputs: train pixels resident on the device, and the batch plan as row indices.

Shared by ``tasks.train`` and the benchmarks, so a benchmark trains on exactly what the stage reads.
"""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import torch

from tasks import contracts as C
from tasks.errors import DatasetError, ParamsError
from tasks.models import pixels_to_tensor
from tasks.params import Paths
from tasks.sampling import unlabelled_plan


def load_train_data(paths: Paths, device: torch.device):
    """-> pixels uint8 (N, C, H, W) on device, int64 labels (N,), item_id -> row, items metadata."""
    items, meta = C.read_table(paths["items"], C.ITEMS, columns=[C.ITEM_ID, C.LABEL, C.SPLIT, C.PIXELS])
    train = items.filter(pc.equal(items[C.SPLIT], C.TRAIN))
    names, codes = np.unique(np.asarray(train[C.LABEL].to_pylist(), dtype=object), return_inverse=True)
    pixels = pixels_to_tensor(train[C.PIXELS], meta["height"], meta["width"], meta["channels"])
    row_of = {item: i for i, item in enumerate(train[C.ITEM_ID].to_pylist())}
    # labels are 0..n-1 (what proxy losses need); class_names[label] is the dataset's label
    meta = meta | {"n_train_classes": len(names), "class_names": [str(n) for n in names]}
    return pixels.to(device), torch.as_tensor(codes, dtype=torch.int64, device=device), row_of, meta


def load_plan(paths: Paths, row_of: dict[str, int], labels: np.ndarray | None = None) -> tuple[list[list[np.ndarray]], dict]:
    """The batch plan as row indices: plan[epoch][batch] -> int64 (P·K,). With the train rows'
    ``labels`` (N,), each batch is checked to hold exactly ``images_per_class`` rows of each of its
    classes — what the fused objective's static shapes take for granted (a short class would
    make it pick a non-positive as a positive, silently). A plan make_batches could not fill loads
    as no batch: supervised training refuses it first (:func:`check_plan`)."""
    table, meta = C.read_table(paths["batches"], C.BATCHES)
    try:
        rows = np.fromiter((row_of[i] for i in table[C.ITEM_ID].to_pylist()), np.int64, table.num_rows)
    except KeyError as err:
        raise C.ContractError(f"{paths['batches']}: item {err} is not a train item of {paths['items']}") from None
    epochs, batches = table[C.EPOCH].to_numpy(), table[C.BATCH].to_numpy()
    plan = []
    for e in range(meta["epochs"]):
        in_epoch = epochs == e
        b = batches[in_epoch]
        r = rows[in_epoch]
        plan.append([r[b == i] for i in range(int(b.max()) + 1 if len(b) else 0)])
    if labels is not None:
        k = meta["images_per_class"]
        for e, epoch in enumerate(plan):
            for i, batch in enumerate(epoch):
                counts = np.unique(labels[batch], return_counts=True)[1]
                if (counts != k).any():
                    raise C.ContractError(f"{paths['batches']}: epoch {e} batch {i} is not P×K: its classes have "
                                          f"{sorted(set(counts.tolist()))} images, not {k} each")
    return plan, meta


def validation(plan_meta: dict, class_names: list[str], labels: torch.Tensor, patience: int) -> tuple[set[str], torch.Tensor]:
    """The train classes make_batches held out of the plan (never test classes): their names, and
    their rows (V,) of ``labels`` (N,). With an early-stopping ``patience``, a validation set whose
    Recall@1 cannot tell epochs apart is refused: one class (Recall@1 always 1: the first epoch
    would be kept), or classes of single images (unlabelled, one label each: always 0)."""
    names = set(plan_meta.get("validation_classes", []))
    codes = [c for c, name in enumerate(class_names) if name in names]
    rows = torch.nonzero(torch.isin(labels, torch.as_tensor(codes, device=labels.device))).flatten()
    sized = int((torch.bincount(labels[rows]) >= 2).sum()) if len(rows) else 0
    if patience and sized < 2:
        raise ParamsError(f"train.early_stopping_patience needs at least 2 validation classes, the plan holds out "
                          f"{len(codes)}" + (f" ({sized} of 2+ images)" if sized < len(codes) else "")
                          + ": raise make_batches.val_fraction")
    return names, rows


def check_plan(paths: Paths) -> None:
    """Refuse, for supervised training, a plan make_batches could not fill (labels it cannot use:
    its metadata says why) — not trained as no steps."""
    meta = C.read_meta(paths["batches"], C.BATCHES)
    if meta.get("unfilled") and meta["epochs"]:
        raise DatasetError(f"{paths['batches']} holds no batch: {meta['unfilled']}: lower P or K, or set "
                           "train.mode: self_supervised to train without labels")


def self_supervised_plan(plan_meta: dict, n_rows: int, held_out: np.ndarray, seed: int) -> list[list[np.ndarray]]:
    """The plan self-supervised training follows instead of make_batches' P×K one: as many epochs,
    batches of the same P·K size, drawn from every train row but the validation classes'
    (``held_out``, row indices) without looking at labels (tasks.sampling.unlabelled_plan)."""
    batch = plan_meta["classes_per_batch"] * plan_meta["images_per_class"]
    rows = np.setdiff1d(np.arange(n_rows), held_out)
    if plan_meta["epochs"] and len(rows) < batch:
        held = f" ({len(held_out)} held out for validation: make_batches.val_fraction)" if len(held_out) else ""
        raise ParamsError(f"train.mode self_supervised: {len(rows)} train images{held} cannot fill one batch of "
                          f"make_batches.classes_per_batch × images_per_class = {batch}; lower P or K")
    return unlabelled_plan(rows, plan_meta["epochs"], batch, seed)
