"""Stage 4 — export_embeddings: embed every query/gallery image with the trained model.

Output ``paths.embeddings`` (contract ``EMBEDDINGS``): item_id, label, split, is_query, is_gallery
and ``embedding`` as fixed-size list<float32>[dim]; its metadata records dim, the model file's
SHA-256 (so an index can be traced to the exact weights) and that vectors are L2-normalised.

``export_embeddings.processes`` > 1 shards the rows over that many processes (one per GPU, launched
with torchrun like training): each embeds a contiguous slice, rank 0 writes the one table.
"""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from tasks import contracts as C
from tasks import distributed, progress, tracking
from tasks.cpu_memory import keep_freed_memory
from tasks.models import load_checkpoint, pixels_to_tensor
from tasks.params import ExportEmbeddingsParams, Paths


@torch.inference_mode()
def embed(
    model: torch.nn.Module, pixels: torch.Tensor, batch_size: int, device: torch.device, desc: str = "export: embed",
    show: bool = True,
) -> np.ndarray:
    """uint8 (N, C, H, W) on the CPU -> float32 (N, D), in batches, with a progress bar (``desc``;
    ``show`` false: none — a torchrun rank other than the first, which embeds only its slice).
    Also what the query and oneshot commands embed their images with."""
    if device.type == "cpu":
        keep_freed_memory()  # a batch's first-block maps are far over 32 MiB: see tasks.cpu_memory
    out = []
    starts = range(0, len(pixels), batch_size)
    bar = progress.bar(desc, "batch", len(starts), enabled=show)
    for i in starts:
        out.append(model(pixels[i : i + batch_size].to(device, non_blocking=True)).float().cpu())
        bar.update(1)
    bar.close()
    if not out:  # an empty slice (a rank with no rows): still (0, D), so shards concatenate
        return np.empty((0, model.config["embedding_dim"]), np.float32)
    return torch.cat(out).numpy()


def run(params: ExportEmbeddingsParams, paths: Paths) -> dict:
    """Embed query ∪ gallery items of ``paths.items`` with ``paths.model``; write ``paths.embeddings``."""
    if params.processes > 1 and not distributed.under_torchrun():
        return distributed.launch("tasks.export_embeddings", params, paths, None)
    world, device = distributed.init(params.device, "export_embeddings")
    with distributed.leaving(world):
        items, meta = C.read_table(paths["items"], C.ITEMS)
        # Only the label column filtered: the whole table's would copy every train image's pixels.
        split_classes = {s: set(pc.unique(items[C.LABEL].filter(pc.equal(items[C.SPLIT], s))).to_pylist())
                         for s in (C.TRAIN, C.TEST)}
        items = items.filter(pc.or_(items[C.IS_QUERY], items[C.IS_GALLERY]))
        model = load_checkpoint(paths["model"], device)
        # Re-ingested at another size after train (a stage run by hand): a CNN embeds any size without
        # complaint, into a space the model never learned (and the query command decodes at the model's).
        have, cfg = (meta["height"], meta["width"], meta["channels"]), model.config
        if have != (cfg["image_size"], cfg["image_size"], cfg["in_channels"]):
            raise C.ContractError(f"{paths['items']} holds {have[0]}×{have[1]} images of {have[2]} channel(s), but "
                                  f"{paths['model']} was trained on {cfg['image_size']}×{cfg['image_size']} of "
                                  f"{cfg['in_channels']}: re-run train (or ingest with the model's ingest.image_size / channels)")
        # Test classes the model trained on (a split changed by hand since train, or another
        # dataset whose labels share names): their metrics are not those of unseen classes. Not
        # those the items hold on both sides (ingest.shared_classes: allow, closed-set by choice).
        test = split_classes[C.TEST]
        seen = sorted((test - split_classes[C.TRAIN]) & set(model.trained_classes or ()))
        if seen and world.main:
            print(f"export_embeddings: warning: {len(seen):,} of the {len(test):,} test classes of {paths['items']} are "
                  f"classes {paths['model']} trained on (e.g. {seen[0]!r}): if they are the same classes, their metrics "
                  "are not those of unseen classes — re-run make_batches and train on this split", file=sys.stderr)
        lo, hi = (items.num_rows * world.rank // world.size, items.num_rows * (world.rank + 1) // world.size)
        pixels = pixels_to_tensor(items[C.PIXELS].slice(lo, hi - lo), meta["height"], meta["width"], meta["channels"])
        vectors = distributed.gather_rows(embed(model, pixels, params.batch_size, device, show=world.main), paths["embeddings"], world)
    if not world.main:
        return {"rank": world.rank}
    dim = model.config["embedding_dim"]
    # The model's last step normalises: a row that is not unit length came from NaN/Inf weights
    # (a corrupt or foreign checkpoint) or an all-zero feature, and would rank first or nowhere.
    norms = np.linalg.norm(vectors, axis=1)
    bad = ~(np.abs(norms - 1) <= 1e-3)  # NaN compares false: bad
    if bad.any():
        raise C.ContractError(f"{paths['model']}: {int(bad.sum()):,} of {len(vectors):,} embeddings are not unit "
                              f"vectors (first: item {items[C.ITEM_ID][int(np.argmax(bad))]}, norm {norms[bad][0]:.4g}); "
                              "is the checkpoint sound?")
    sha = C.file_digest(paths["model"])
    table = pa.table(
        {
            **{c: items[c] for c in (C.ITEM_ID, C.LABEL, C.SPLIT, C.IS_QUERY, C.IS_GALLERY)},
            C.EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), dim),
        },
        schema=C.EMBEDDINGS.schema({C.EMBEDDING: pa.list_(pa.float32(), dim)}),
    )
    C.write_table(table, paths["embeddings"], C.EMBEDDINGS, {"dim": dim, "model_sha256": sha, "normalized": True})

    with tracking.stage_run(paths, "export_embeddings", params) as (child, parent):
        child.metrics({"n_embedded": len(vectors)})
    return {"n_embedded": len(vectors), "n_test_classes_seen_in_training": len(seen), "dim": dim, "device": str(device), "processes": world.size, "model_sha256": sha}


def main(argv: list[str] | None = None) -> None:
    from tasks.cli import stage_main

    stage_main("export_embeddings", run, argv)


if __name__ == "__main__":
    main()
