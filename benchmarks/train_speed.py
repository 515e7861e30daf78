"""Training throughput: our train stage vs the usual reference loop vs the hardware limit.

One run measures, on the same model, batch (P×K), miner and loss:
- **reference**: what pytorch-metric-learning's examples do — torchvision ImageFolder over the
  extracted PNGs, PIL decode + transforms per image, DataLoader with MPerClassSampler, fp32;
- **ours**: the train stage's engine (``tasks.recipe.build`` + ``tasks.engine.train_epoch``, what
  ``tasks.train.run`` runs, minus its per-epoch MLflow calls) on the ingested uint8 Parquet;
- **limit**: forward + backward + optimizer step on one batch already on the device, with and
  without mining + loss (the share of the step spent mining), on random uint8 data (the usual
  "synthetic" limit) and on a real batch (on CPUs, kernels run faster on mostly-blank strokes than
  on noise, so the real batch is the ceiling that matters for our data path).
On a CPU, ours and the limit run with glibc keeping freed memory (``tasks.cpu_memory``), the
reference without it unless ``--reference-keeps-memory``.
Prints one JSON line per figure (img/s and the ratios; on CUDA each phase's own peak GPU memory).
The limits run ``--limit-rounds`` times, interleaved, and each keeps its best: the objective's
share of a step is a difference of two timings, and one window each on a shared machine made it
negative at times (rounds lower that noise; too few ``--steps`` still measure nothing).

    python benchmarks/train_speed.py [--data ../shared/datasets/omniglot] [--image-size 28] [--device auto]
                                     [--compile [true] [reduce-overhead]]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
import zipfile
from pathlib import Path

import torch
from pytorch_metric_learning import samplers  # the reference loop's sampler

import omniglot_recipe
from tasks import ingest, make_batches, train_data
from tasks.cpu_memory import keep_freed_memory
from tasks.engine import loss_of, train_epoch
from tasks.objectives import build_objective
from tasks.recipe import build, use_bf16
from tasks.models import EmbeddingNet, pick_device
from tasks.params import load_params

REPO = Path(__file__).resolve().parents[1]


def emit(figure: str, **values) -> None:
    print(json.dumps({"figure": figure, **values}), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak(device: torch.device) -> dict:
    """``{"peak_gpu_memory_gib": ...}``: the peak since the last call (then reset), so each phase
    reports its own, not the process's (the fp32 reference's would hide ours); {} on a CPU."""
    if device.type != "cuda":
        return {}
    gib = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return {"peak_gpu_memory_gib": round(gib, 2)}


def best_of(rounds: int, *runs) -> list[float]:
    """Each of ``runs`` (no-argument functions -> img/s) ``rounds`` times, interleaved; each one's best."""
    best = [0.0] * len(runs)
    for _ in range(rounds):
        for i, run in enumerate(runs):
            best[i] = max(best[i], run())
    return best


def reference_loop(root: Path, size: int, channels: int, p: int, k: int, steps: int, device, model_cfg, workers: int) -> float:
    """img/s of the pml-examples recipe: ImageFolder + PIL + DataLoader(MPerClassSampler), fp32."""
    from torchvision import transforms as T

    data = omniglot_recipe.character_folder(root, T.Compose([T.Grayscale(channels), T.Resize((size, size)), T.PILToTensor()]))
    sampler = samplers.MPerClassSampler(data.targets, m=k, batch_size=p * k, length_before_new_iter=len(data))
    loader = torch.utils.data.DataLoader(data, batch_size=p * k, sampler=sampler, num_workers=workers, drop_last=True)
    torch.manual_seed(0)
    model = EmbeddingNet(model_cfg).to(device).train()
    objective = omniglot_recipe.reference_objective()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    seen, start = 0, None
    for step, (x, y) in enumerate(loader):
        if step == 2:  # after warm-up (workers started, kernels chosen)
            sync(device)
            start, seen = time.perf_counter(), 0
        omniglot_recipe.reference_step(model, objective, opt, x.to(device), y.to(device))
        seen += len(y)
        if step >= steps + 2:
            break
    sync(device)
    return seen / (time.perf_counter() - start)


def _no_objective(emb: torch.Tensor, _labels: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """A trivial loss in place of mining + loss: the limit's step without an objective."""
    return emb.square().sum(), {}


def limit(
    x: torch.Tensor, steps: int, model_cfg, objective=None, bf16: bool = False, channels_last: bool = False,
    compile: bool | str = False, k: int = 4,
) -> float:
    """img/s of the bare step (forward, objective or a trivial loss, backward, AdamW) on one
    device-resident uint8 batch x (B, C, H, W); ``compile``: forward + loss through torch.compile
    (a mode name: in that mode), as ``train.compile`` does."""
    torch.manual_seed(0)
    model = EmbeddingNet(model_cfg).to(x.device).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    y = torch.arange(len(x), device=x.device) // k  # P×K labels, as the fused objective expects
    # The train stage's own forward (autocast, float32 objective, torch.compile in that mode).
    compute = loss_of(model, objective or _no_objective, bf16, compile)
    for step in range(steps + 3):
        if step == 3:  # after warm-up (and compiling)
            sync(x.device)
            start = time.perf_counter()
        loss = compute(x, y)[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(x.device)
    return steps * len(x) / (time.perf_counter() - start)


def ours(params, device) -> tuple[list[float], torch.Tensor]:
    """Our train stage's engine on the ingested data: img/s of each planned epoch, and the first
    planned batch (a real batch for the limit)."""
    torch.manual_seed(params.train.seed)
    pixels, labels, row_of, meta = train_data.load_train_data(params.paths, device)
    plan, plan_meta = train_data.load_plan(params.paths, row_of)
    model, compute, _, optimizer, _ = build(params.train, meta, device, plan_meta["images_per_class"])
    rows = [train_epoch(model, compute, optimizer, pixels, labels, b, e) for e, b in enumerate(plan)]
    return [r["img_per_s"] for r in rows], pixels[torch.from_numpy(plan[0][0]).to(device)]


def steady(epochs: list[float]) -> float:
    """Mean img/s after the first epoch (which also pays warm-up: kernel choice, allocator
    growth), or the one epoch there is."""
    rest = epochs[1:] or epochs
    return sum(rest) / len(rest)


def epoch_figures(epochs: list[float]) -> dict:
    """The JSON fields of one of our runs: its steady img/s and each epoch's. With one epoch the
    figure includes warm-up (and compiling), which the reference and the limit leave out: said."""
    return {"value": round(steady(epochs), 1), "per_epoch": [round(v, 1) for v in epochs],
            "includes_warmup": len(epochs) < 2}


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=omniglot_recipe.DEFAULT_DATA)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--p", type=int, default=32)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40, help="timed steps of the reference and the limit")
    parser.add_argument("--epochs", type=int, default=2,
                        help="epochs of our stage (each timed; figures: the mean after the first, which pays warm-up)")
    parser.add_argument("--limit-rounds", type=positive, default=2, help="interleaved runs of each eager limit (best kept)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--reference-keeps-memory", action="store_true",
                        help="give the reference loop our glibc malloc setting too (tasks.cpu_memory; ours always has it on "
                             "a CPU): how much of the gap that setting is")
    parser.add_argument("--compile", nargs="*", choices=["true", "reduce-overhead"], default=None,
                        help="also time ours and the limit compiled, as train.compile in each mode given (none given: true)")
    args = parser.parse_args()
    device = pick_device(args.device)
    size, channels, batch = args.image_size, 1, args.p * args.k
    work = Path(tempfile.mkdtemp(prefix="train-speed-"))
    try:
        shutil.copy(REPO / "params.yaml", work / "params.yaml")
        params = load_params(work / "params.yaml", {
            "ingest.source": omniglot_recipe.source(args.data),
            "ingest.image_size": size,
            "make_batches.classes_per_batch": args.p,
            "make_batches.images_per_class": args.k,
            "make_batches.epochs": args.epochs,
            "train.device": str(device),
        })
        cfg = {"backbone": "small_cnn", "width": params.train.width, "embedding_dim": params.train.embedding_dim,
               "in_channels": channels, "image_size": size}
        common = {"device": str(device), "image_size": size, "batch": batch, "model": f"small_cnn w{params.train.width}"}

        with zipfile.ZipFile(args.data / "images_background.zip") as zf:
            zf.extractall(work / "raw")
        # Ours sets it in tasks.recipe.build, after the reference has run: the reference is what
        # users run today unless asked otherwise (process-wide and permanent once set).
        kept = keep_freed_memory() if args.reference_keeps_memory and device.type == "cpu" else False
        peak(device)
        ref = reference_loop(work / "raw" / "images_background", size, channels, args.p, args.k, args.steps, device, cfg, args.workers)
        emit("reference_img_per_s", value=round(ref, 1), workers=args.workers, keeps_freed_memory=kept, **common, **peak(device))
        if device.type == "cpu":
            keep_freed_memory()  # what recipe.build does for ours: the limits below run with it too

        ingest.run(params.ingest, params.paths)
        make_batches.run(params.make_batches, params.paths)
        per_epoch, real_batch = ours(params, device)
        fast = steady(per_epoch)
        t = params.train
        emit("ours_img_per_s", **epoch_figures(per_epoch), fused_mining=t.fused_mining, precision=t.precision,
             channels_last=t.channels_last, bf16=use_bf16(t, device), **common, **peak(device))
        plain_params = params.model_copy(update={"train": t.model_copy(
            update={"fused_mining": False, "precision": "fp32", "channels_last": False})})
        plain_epochs, _ = ours(plain_params, device)
        plain = steady(plain_epochs)
        emit("ours_pml_fp32_img_per_s", **epoch_figures(plain_epochs), **common, **peak(device))
        modes = [] if args.compile is None else [True if m == "true" else m for m in args.compile or ["true"]]
        compiled_ours = {}
        for mode in modes:
            start = time.perf_counter()
            compiled, _ = ours(params.model_copy(update={"train": t.model_copy(update={"compile": mode})}), device)
            compiled_ours[mode] = steady(compiled)
            emit("ours_compiled_img_per_s", mode=mode, **epoch_figures(compiled),
                 wall_s_incl_compile=round(time.perf_counter() - start, 1), **common, **peak(device))

        bf16 = use_bf16(t, device)
        fused = build_objective(t.loss, t.miner, True, device, per_class=args.k)[0]
        pml = build_objective(t.loss, t.miner, False, device)[0]
        random_batch = torch.randint(0, 256, real_batch.shape, dtype=torch.uint8, device=device)
        for name, x in (("real", real_batch), ("random", random_batch)):
            bare, with_fused, bare32, with_pml32 = best_of(
                args.limit_rounds,
                lambda: limit(x, args.steps, cfg, None, bf16, t.channels_last, k=args.k),
                lambda: limit(x, args.steps, cfg, fused, bf16, t.channels_last, k=args.k),
                lambda: limit(x, args.steps, cfg, None, k=args.k),
                lambda: limit(x, args.steps, cfg, pml, k=args.k),
            )
            emit(f"limit_img_per_s_{name}_batch", no_objective=round(bare, 1), fused_objective=round(with_fused, 1),
                 fp32_no_objective=round(bare32, 1), fp32_pml_objective=round(with_pml32, 1),
                 objective_share_fused=round(1 - with_fused / bare, 3), objective_share_pml_fp32=round(1 - with_pml32 / bare32, 3),
                 rounds=args.limit_rounds, bf16=bf16, channels_last=t.channels_last, **common, **peak(device))
            emit(f"ratios_{name}_batch", ours_vs_reference=round(fast / ref, 2), ours_vs_ours_pml_fp32=round(fast / plain, 2),
                 ours_vs_limit=round(fast / bare, 3), ours_vs_limit_with_objective=round(fast / with_fused, 3), **common)
        for mode, img_s in compiled_ours.items():  # the compiled step's own limit, on the real batch
            bare = limit(real_batch, args.steps, cfg, None, bf16, t.channels_last, mode, args.k)
            with_fused = limit(real_batch, args.steps, cfg, fused, bf16, t.channels_last, mode, args.k)
            emit("limit_compiled_img_per_s_real_batch", mode=mode, no_objective=round(bare, 1),
                 fused_objective=round(with_fused, 1), objective_share_fused=round(1 - with_fused / bare, 3),
                 ours_compiled_vs_limit=round(img_s / bare, 3), ours_compiled_vs_reference=round(img_s / ref, 2),
                 **common, **peak(device))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
