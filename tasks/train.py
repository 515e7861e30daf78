"""Stage 3 — train: an embedding network on the P×K batch plan, loss and miner chosen by name
(self-supervised: on a label-free shuffle of the same size, tasks.sampling.unlabelled_plan).

Reads ``paths.items`` (train split) and ``paths.batches``; writes ``paths.model`` (weights-only
checkpoint), ``paths.train_curve`` (per-epoch CSV, a DVC plot) and ``paths.run_info`` (the MLflow
run downstream stages log into). The train pixels stay resident on the device as uint8 — a batch is
an index gather, never a decode or a host→device copy of a batch. Under ``torchrun`` it trains
data-parallel (tasks.distributed); rank 0 alone logs and writes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tasks import distributed, progress, resume, tracking, train_curve
from tasks.distributed import World
from tasks.engine import EarlyStopping, deterministic, make_scheduler, recall_at_1, train_epoch
from tasks.models import save_checkpoint
from tasks.params import MakeBatchesParams, Paths, TrainParams, flatten, pretrained_path
from tasks.recipe import build, use_bf16
from tasks.train_data import check_plan, load_plan, load_train_data, self_supervised_plan, validation


def run(params: TrainParams, paths: Paths, parent_run_id: str | None = None) -> dict:
    """Train for the epochs of the batch plan; save the checkpoint; log the curve to MLflow."""
    if params.mode == "supervised":
        check_plan(paths)  # one clear error, before torchrun's processes and the pixels
    if params.processes > 1 and not distributed.under_torchrun():
        return distributed.launch("tasks.train", params, paths, parent_run_id)
    world, device = distributed.init(params.device, "train")
    with distributed.leaving(world), deterministic(params.deterministic):
        return _train(params, paths, parent_run_id, world, device)


def _train(params: TrainParams, paths: Paths, parent_run_id: str | None, world: World, device: torch.device) -> dict:
    torch.manual_seed(params.seed)  # initial weights; batch order comes from the plan
    pixels, labels, row_of, items_meta = load_train_data(paths, device)
    plan, plan_meta = load_plan(paths, row_of, labels.cpu().numpy())
    val_names, val_idx = validation(plan_meta, items_meta["class_names"], labels, params.early_stopping_patience)
    if params.mode == "self_supervised":  # no labels, so no P×K either (see tasks.sampling)
        plan = self_supervised_plan(plan_meta, len(labels), val_idx.cpu().numpy(), params.seed)

    weights = pretrained_path(params.pretrained, paths.root)
    model, compute, _, optimizer, stateful = build(params, items_meta, device, plan_meta["images_per_class"], weights, world)
    steps = sum(len(e) for e in plan)
    warmup = sum(len(e) for e in plan[: params.warmup_epochs])
    scheduler = make_scheduler(optimizer, params.lr_schedule, warmup, steps)
    stateful["scheduler"] = scheduler
    stopper = stateful["early_stopping"] = EarlyStopping(params.early_stopping_patience)
    digests = resume.input_digests(paths)
    fp = resume.fingerprint(params, digests)
    # Rank 0 reads the state: on several machines only its own disk holds the file it wrote.
    state = distributed.broadcast_object(resume.load(paths["train_state"], fp, stateful, world.size) if world.main else None, world)
    curve: list[dict[str, float]] = state["curve"] if state else []
    if state:
        resume.restore(state, stateful, world)
        parent_run_id = parent_run_id or state["run_ids"]["parent"]
        if world.main:  # The killed attempt's runs never finished; say so. Its pipeline run too, when
            # this is another one (a new flow run's; under dvc repro the same run goes on).
            for old in {state["run_ids"]["child"], state["run_ids"]["parent"]} - {parent_run_id}:
                tracking.mark_killed(Path(paths.root), old)

    run_id = None
    if world.main:
        run_id = parent_run_id or tracking.start_pipeline_run(Path(paths.root), params.experiment)
    with tracking.stage_run(paths, "train", params, run_id) if world.main else tracking.no_run() as (child, parent):
        # The params that produced the data, read from the data itself (true even when DVC
        # restored it from cache), plus ours.
        plan_params = {k: v for k, v in plan_meta.items() if k in MakeBatchesParams.model_fields}
        upstream = {"ingest": items_meta["params"], "make_batches": plan_params}
        parent.params(flatten(upstream))
        parent.tags(tracking.provenance(Path(paths.root), digests, upstream | {"train": params.model_dump()},
                                        tuple(getattr(paths, k) for k in type(paths).model_fields if k not in ("root", "raw"))))
        tracking.log_upstream(parent, items_meta.get("summary", {}), plan_meta, paths["quarantine"], params.mode == "supervised")
        child.params({"device": str(device), "n_train_images": len(labels), "bf16": use_bf16(params, device)})
        # Resumed: the restored epochs go to this attempt's child run, and to the pipeline run if
        # it is a new one (a new flow run's): each run then holds the whole curve.
        for row in curve:
            train_curve.log_epoch(child, parent if state["run_ids"]["parent"] != run_id else None, row)
        done = len(curve)
        # Killed after the state of an early-stopped run was saved but before its model was.
        stopped = bool(done and params.early_stopping_patience) and stopper.exhausted(done - 1)
        if world.main and not stopped and params.freeze_backbone_epochs >= len(plan) > done:
            print(f"train: freeze_backbone_epochs {params.freeze_backbone_epochs} covers all {len(plan)} epochs: "
                  "only the head trains (the backbone keeps its initial weights)", file=sys.stderr)
        if world.main and not stopped and params.warmup_epochs >= len(plan) > done:
            print(f"train: warmup_epochs {params.warmup_epochs} covers all {len(plan)} epochs: the learning rate "
                  f"only rises, the {params.lr_schedule} schedule never starts", file=sys.stderr)
        bar = progress.bar(f"train ({device})", "batch", steps, sum(len(e) for e in plan[:done]), enabled=world.main)
        for epoch in range(done, done if stopped else len(plan)):
            model.trunk.requires_grad_(epoch >= params.freeze_backbone_epochs)
            row = train_epoch(model, compute, optimizer, pixels, labels, plan[epoch], epoch, lambda: bar.update(1),
                              params.grad_clip, scheduler, world)
            stop = False
            if len(val_idx):
                row["val_recall_at_1"] = recall_at_1(model, pixels[val_idx], labels[val_idx])
                stop = bool(params.early_stopping_patience) and stopper.update(epoch, row["val_recall_at_1"], model)
                stop = distributed.broadcast_object(stop, world)  # one decision, or ranks would wait on each other
            bar.set_postfix(epoch_done=epoch, loss=f"{row['loss']:.4f}")  # the bar runs on into the next epoch
            curve.append({"epoch": epoch, **row})
            train_curve.log_epoch(child, parent, curve[-1])
            resume.save(paths["train_state"], fp, epoch, stateful, curve, {"parent": run_id, "child": child.run_id}, world)
            if stop and world.main:
                print(f"train: no better validation Recall@1 for {params.early_stopping_patience} epochs; "
                      f"stopping after epoch {epoch}, keeping epoch {stopper.best_epoch}")
            if stop:
                break
        bar.close()
        # Early stopping keeps its best epoch's weights: the checkpoint and the summary say which
        # epochs ran and which one the model is (not the plan's length and the last epoch's loss).
        kept = {"kept_epoch": stopper.best_epoch} if stopper.weights is not None else {}
        if kept:
            model.load_state_dict(stopper.weights)
        ran = len(curve)
        if not world.main:
            return {"rank": world.rank, "epochs": ran}
        model.trained_classes = [name for name in items_meta["class_names"] if name not in val_names]
        sha = save_checkpoint(model.cpu(), paths["model"], {"epochs": ran} | kept)
        # Written with the model, not before training: a failed run leaves the previous model and
        # the run that made it, so a later stage run by hand logs into the run of the model it reads.
        tracking.write_run_info(paths["run_info"], run_id, params.experiment)
        paths["train_state"].unlink(missing_ok=True)
        train_curve.write(paths["train_curve"], curve)
        parent.artifact(paths["model"], "model")
        parent.artifact(paths["train_curve"], "plots")
        parent.tags({"model_sha256": sha})
    last = curve[kept["kept_epoch"]] if kept else curve[-1] if curve else {}
    return {"run_id": run_id, "epochs": ran, "planned_epochs": len(plan), "steps": sum(len(e) for e in plan[:ran]),
            "device": str(device), "processes": world.size, "model_sha256": sha, **kept, **last}


def main(argv: list[str] | None = None) -> None:
    from tasks.cli import stage_main

    stage_main("train", run, argv)


if __name__ == "__main__":
    main()
