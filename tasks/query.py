"""Try the system: image files in, their nearest items out (JSON on stdout) and a grid PNG.

    python -m tasks.query --params params.yaml photo1.png photo2.jpg --k 5 --out grid.png

Loads what the pipeline saved — the model (``paths.model``), the index (``paths.index``, searched
as built, with its nprobe/efSearch) and its id map (``paths.index_ids``) — and decodes each image
exactly as ingest does (:func:`tasks.sources.decode`, at the size and channels the model takes).
Prints ``{"query": [{"image", "results": [{"rank", "item_id", "label", "source", "score"}, ...]},
...]}`` — ``source``: where ingest read the item (its file, or zip member); scores are "higher is
more similar" (inner product, or minus the squared L2 distance).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from tasks import contracts as C
from tasks import figures, search
from tasks.errors import ContractError, DatasetError
from tasks.eval_figures import pixels_of
from tasks.export_embeddings import embed
from tasks.models import load_checkpoint, pick_device
from tasks.params import Params, load_params
from tasks.sources import decode

BATCH = 512  # images per forward pass


def query(params: Params, images: list[Path], k: int, out: Path | None = None, device: str = "cpu") -> list[dict]:
    """Top-``k`` gallery items for each image file; writes a grid PNG to ``out`` when given."""
    paths = params.paths
    ids_table, ids_meta = C.read_table(paths["index_ids"], C.INDEX_IDS)
    # The index must come from this model's embeddings, or the scores mean nothing.
    if ids_meta["model_sha256"] != C.file_digest(paths["model"]):
        raise ContractError(f"{paths['index']} was built from another model than {paths['model']}: re-run export_embeddings and build_index")
    model = load_checkpoint(paths["model"], pick_device(device))
    size, channels = model.config["image_size"], model.config["in_channels"]  # what it was trained on
    pixels = []
    for image in images:
        try:
            pixels.append(decode(Path(image).read_bytes(), size, channels))
        except (OSError, ValueError) as err:
            raise DatasetError(f"{image}: {err}") from None
    batch = np.stack(pixels)  # (n, H, W, C) uint8
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
    emb = embed(model, x, BATCH, next(model.parameters()).device, "query: embed")
    index = faiss.read_index(str(paths["index"]))
    # One chunk for all images (index_chunks splits every 4096 queries by default).
    chunk = next(search.index_chunks(index, emb, min(k, index.ntotal), query_chunk=max(len(emb), 1),
                                     negate=ids_meta["metric"] == "l2"))
    item_ids = ids_table[C.ITEM_ID].to_numpy(zero_copy_only=False)
    labels = ids_table[C.LABEL].to_numpy(zero_copy_only=False)
    found_ids = np.where(chunk.pos >= 0, item_ids[np.maximum(chunk.pos, 0)], None)
    found_labels = np.where(chunk.pos >= 0, labels[np.maximum(chunk.pos, 0)], "")
    items, _ = C.read_table(paths["items"], C.ITEMS, columns=[C.ITEM_ID, C.SOURCE])
    found = items.filter(pc.is_in(items[C.ITEM_ID], value_set=pa.array(np.unique(item_ids[chunk.pos[chunk.pos >= 0]]))))
    source_of = dict(zip(found[C.ITEM_ID].to_pylist(), found[C.SOURCE].to_pylist()))  # the results' only
    results = [
        {"image": str(image), "results": [
            {"rank": j + 1, "item_id": found_ids[i, j], "label": found_labels[i, j],
             "source": source_of.get(found_ids[i, j]), "score": float(chunk.scores[i, j])}
            for j in range(chunk.pos.shape[1]) if chunk.pos[i, j] >= 0
        ]}
        for i, image in enumerate(images)
    ]
    if out is not None:
        figures.retrieval_grid(batch, pixels_of(paths, found_ids), None, chunk.scores, [Path(i).name for i in images], out, found_labels)
    return results


def main(argv: list[str] | None = None) -> None:
    from tasks.cli import USER_ERRORS, device_arg

    p = argparse.ArgumentParser(prog="python -m tasks.query", description=__doc__.split("\n")[0])
    p.add_argument("images", nargs="+", type=Path, help="image files")
    p.add_argument("--params", type=Path, default=Path("params.yaml"))
    p.add_argument("--k", type=int, default=5, help="results per image")
    p.add_argument("--out", type=Path, default=None, help="write a grid PNG here")
    p.add_argument("--device", type=device_arg, default="cpu", help="cpu | cuda | cuda:N | auto (for the model)")
    args = p.parse_args(argv)
    if args.k < 1:
        p.error("--k must be >= 1")
    try:
        results = query(load_params(args.params), args.images, args.k, args.out, args.device)
    except USER_ERRORS as err:
        print(f"tripletflow query: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps({"query": results}))


if __name__ == "__main__":
    main()
