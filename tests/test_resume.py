"""A training run killed with SIGKILL mid-epoch and restarted ends exactly like an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import FAST, ROOT, synthetic_items
from tasks import make_batches, resume, tracking, train
from tasks.recipe import build
from tasks.params import load_params

EPOCHS = 6
# Big enough images that an epoch takes a noticeable time, so the kill lands inside one.
# A warm-up + cosine schedule and clipping, so the scheduler's state must survive the kill too.
SLOW = FAST | {
    "make_batches.epochs": EPOCHS, "train.width": 32, "make_batches.images_per_class": 4,
    "train.lr_schedule": "cosine", "train.warmup_epochs": 1, "train.grad_clip": 1.0,
}


def _project(make_project, name):
    params = load_params(make_project(SLOW, name=name))
    synthetic_items(params.paths["items"], n_classes=8, per_class=40, size=48, test_classes=2)
    make_batches.run(params.make_batches, params.paths)
    return params


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def test_sigkill_mid_epoch_then_restart_matches_an_uninterrupted_run(make_project):
    straight = _project(make_project, "straight")
    train.run(straight.train, straight.paths)

    killed = _project(make_project, "killed")
    state_path = killed.paths["train_state"]
    cmd = [sys.executable, "-m", "tasks.train", "--params", str(killed.paths.root) + "/params.yaml"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    done = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if state_path.exists():
            done = torch.load(state_path, weights_only=True)["epochs_done"]
            if done >= 2:
                break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 2 <= done < EPOCHS, f"killed after {done} epochs: the run was not interrupted mid-training"
    assert not killed.paths["model"].exists()

    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "resuming after epoch" in result.stdout
    assert not state_path.exists()  # crash-recovery state is removed once the model is written

    a, b = _weights(straight.paths["model"]), _weights(killed.paths["model"])
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert killed.paths["train_curve"].read_text().count("\n") == EPOCHS + 1

    # MLflow: one pipeline run; the killed attempt's train run is marked KILLED, not left RUNNING.
    client = MlflowClient(tracking.tracking_uri(killed.paths.root))
    runs = client.search_runs([client.get_experiment_by_name("tripletflow").experiment_id])
    statuses = sorted(r.info.status for r in runs if r.data.tags.get("tripletflow.stage") == "train")
    assert statuses == ["FINISHED", "KILLED"]
    # ... and the pipeline run goes on (evaluate ends it): the resumed attempt's, not a killed one.
    assert [r.info.status for r in runs if r.data.tags.get("tripletflow.kind") == "pipeline"] == ["RUNNING"]


@pytest.mark.parametrize("killed", [True, False])
def test_a_new_flow_run_resuming_ends_the_killed_attempts_runs(make_project, monkeypatch, capsys, killed):
    """A flow run killed in train leaves its pipeline run and train run RUNNING; the next flow run
    (a new pipeline run) resumes and ends both KILLED. An attempt that failed (its runs ended
    FAILED by itself) keeps its status."""
    params = _project(make_project, "flow")
    root = params.paths.root
    client = MlflowClient(tracking.tracking_uri(root))
    first = tracking.start_pipeline_run(root, params.train.experiment)
    real = train.train_epoch

    def dies_in_epoch_2(*args, **kwargs):
        if args[6] == 2:  # the epoch argument
            raise RuntimeError("the machine went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_epoch", dies_in_epoch_2)
    with pytest.raises(RuntimeError, match="went away"):
        train.run(params.train, params.paths, first)
    monkeypatch.setattr(train, "train_epoch", real)
    state = torch.load(params.paths["train_state"], weights_only=True)
    old_child = state["run_ids"]["child"]
    assert state["run_ids"]["parent"] == first and state["epochs_done"] == 2
    if killed:  # SIGKILL: nothing ended the runs (this process's exception handler did)
        for run_id in (first, old_child):
            client.update_run(run_id, status="RUNNING")

    second = tracking.start_pipeline_run(root, params.train.experiment)
    capsys.readouterr()
    result = train.run(params.train, params.paths, second)
    assert "train: resuming after epoch 1 (2 epochs done)" in capsys.readouterr().out  # epochs 0 and 1 ran
    assert result["epochs"] == EPOCHS
    ended = "KILLED" if killed else "FAILED"
    assert client.get_run(first).info.status == ended and client.get_run(old_child).info.status == ended
    assert client.get_run(second).info.status == "RUNNING"  # evaluate ends it


def test_a_state_from_other_params_is_not_resumed(make_project, capsys):
    params = _project(make_project, "p")
    other = params.train.model_copy(update={"seed": 123})
    fp_other = resume.fingerprint(other, resume.input_digests(params.paths))
    assert fp_other != resume.fingerprint(params.train, resume.input_digests(params.paths))
    meta = {"channels": 1, "height": 48, "n_train_classes": 6}
    stateful = build(params.train, meta, torch.device("cpu")).stateful
    resume.save(params.paths["train_state"], fp_other, 0, stateful, [{"epoch": 0}], {"parent": "x", "child": "y"})
    assert resume.load(params.paths["train_state"], resume.fingerprint(params.train, resume.input_digests(params.paths)), stateful) is None
    assert "starting afresh" in capsys.readouterr().out



def test_a_state_saved_for_other_input_data_is_not_resumed(make_project, capsys):
    """The same params over other items or batches (a new data drop, a re-made plan) must not
    continue a state trained on the old files: the fingerprint holds each input's digest."""
    params = load_params(make_project(FAST))
    digests = {"items": "a" * 32, "batches": "b" * 32}
    fp = resume.fingerprint(params.train, digests)
    assert fp == resume.fingerprint(params.train, dict(digests))  # a pure function of its inputs
    # Each input on its own changes it (one digest left out of the hash would go unnoticed).
    for name in resume.INPUTS:
        assert resume.fingerprint(params.train, digests | {name: "c" * 32}) != fp, name
    stateful = _fresh(params, torch.device("cpu")).stateful
    path = params.paths["train_state"]
    resume.save(path, fp, 0, stateful, [{"epoch": 0}], {"parent": "p", "child": "c"})
    assert resume.load(path, fp, stateful) is not None  # the control: same data, resumed
    capsys.readouterr()
    assert resume.load(path, resume.fingerprint(params.train, digests | {"items": "c" * 32}), stateful) is None
    assert "from other params or data; starting afresh" in capsys.readouterr().out


def test_train_killed_then_restarted_on_new_data_starts_afresh(make_project, monkeypatch, capsys):
    """The stage end to end: a run killed after its last epoch's state was saved, the items then
    replaced (same ids and shapes, other pixels) and the plan re-made: the restart trains anew
    rather than keep the old data's weights."""
    params = load_params(make_project(FAST))
    synthetic_items(params.paths["items"])
    make_batches.run(params.make_batches, params.paths)

    def killed_here(*_args, **_kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(train, "save_checkpoint", killed_here)  # every epoch's state saved, no model
        with pytest.raises(KeyboardInterrupt):
            train.run(params.train, params.paths)
    assert torch.load(params.paths["train_state"], weights_only=True)["epochs_done"] == 2
    synthetic_items(params.paths["items"], seed=1)
    make_batches.run(params.make_batches, params.paths)
    capsys.readouterr()
    result = train.run(params.train, params.paths)
    out = capsys.readouterr().out
    assert "from other params or data; starting afresh" in out
    assert "resuming after epoch" not in out
    assert result["epochs"] == 2 and not params.paths["train_state"].exists()


# ------------------------------------------------------------------------ every random stream resumes

AUGMENT = {"supervised": True, "crop_scale": [0.7, 1.0], "rotate": 10.0, "translate": 0.1, "hflip": True,
           "brightness": 0.2, "contrast": 0.2}
STREAMS = {
    # pml's DistanceWeightedMiner samples negatives from torch's global generator
    "global_rng": {"train.miner": {"name": "DistanceWeightedMiner"}, "train.loss": {"name": "TripletMarginLoss", "margin": 0.2}},
    # the cross-batch memory's queue: the next epoch mines against the last one's embeddings
    "xbm": {"train.cross_batch_memory": 48, "train.miner": {"name": "MultiSimilarityMiner"},
            "train.loss": {"name": "MultiSimilarityLoss"}},
    "augmenter": {"train.augment": AUGMENT},
}
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here"))


def _fresh(params, device):
    torch.manual_seed(params.train.seed)  # as tasks.train._train does: weights, then the generators
    return build(params.train, {"channels": 1, "height": 16, "n_train_classes": 8}, device, per_class=4)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("stream", STREAMS)
def test_a_resumed_epoch_continues_every_random_stream(make_project, stream, device):
    """Two epochs straight = one epoch, the state saved and loaded (as a new process would),
    a fresh build restored, the second epoch: the same weights, bit for bit on a CPU."""
    import numpy as np

    from tasks.engine import train_epoch

    params = load_params(make_project(FAST | {"train.precision": "fp32", "train.device": device} | STREAMS[stream]))
    dev = torch.device(device)
    g = torch.Generator().manual_seed(1)
    pixels = torch.randint(0, 255, (64, 1, 16, 16), dtype=torch.uint8, generator=g).to(dev)
    labels = torch.arange(8).repeat_interleave(8).to(dev)
    plan = [[np.random.default_rng(10 * e + b).permutation(64)[:32] for b in range(3)] for e in range(2)]
    straight = _fresh(params, dev)
    for e in range(2):
        train_epoch(straight.model, straight.compute, straight.optimizer, pixels, labels, plan[e], e)

    first = _fresh(params, dev)
    train_epoch(first.model, first.compute, first.optimizer, pixels, labels, plan[0], 0)
    path = params.paths["train_state"]
    resume.save(path, "fp", 0, first.stateful, [{"epoch": 0}], {"parent": "p", "child": "c"})
    again = _fresh(params, dev)
    state = resume.load(path, "fp", again.stateful)
    resume.restore(state, again.stateful)
    train_epoch(again.model, again.compute, again.optimizer, pixels, labels, plan[1], 1)

    a, b = straight.model.state_dict(), again.model.state_dict()
    exact = device == "cpu"
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6, msg=key)
    # The control: everything restored but the random streams and the queue -> other weights.
    partial = _fresh(params, dev)
    resume.restore(state, {k: v for k, v in partial.stateful.items() if k not in ("rng", "memory", "augment")})
    train_epoch(partial.model, partial.compute, partial.optimizer, pixels, labels, plan[1], 1)
    assert any(not torch.equal(partial.model.state_dict()[k], a[k]) for k in a)


def test_a_state_saved_by_another_version_is_not_resumed(make_project, capsys):
    params = _project(make_project, "v")
    stateful = _fresh(params, torch.device("cpu")).stateful
    resume.save(params.paths["train_state"], "fp", 0, {k: v for k, v in stateful.items() if k != "rng"}, [], {})
    assert resume.load(params.paths["train_state"], "fp", stateful) is None
    assert "another version" in capsys.readouterr().out


def test_a_state_saved_by_another_number_of_processes_is_not_resumed(make_project, capsys):
    """Each rank kept its own generators: a torchrun started by hand with another process count
    (same params, so the same fingerprint) starts afresh, rather than index a rank that was never saved."""
    params = _project(make_project, "w")
    stateful = _fresh(params, torch.device("cpu")).stateful
    resume.save(params.paths["train_state"], "fp", 0, stateful, [], {})
    assert resume.load(params.paths["train_state"], "fp", stateful, world_size=2) is None
    assert "saved by 1 process(es), this run has 2; starting afresh" in capsys.readouterr().out
    assert resume.load(params.paths["train_state"], "fp", stateful, world_size=1) is not None
    # A state saved before the count was recorded: one process's (it could only be resumed by one).
    state = torch.load(params.paths["train_state"], weights_only=True)
    del state["world_size"]
    torch.save(state, params.paths["train_state"])
    assert resume.load(params.paths["train_state"], "fp", stateful, world_size=1) is not None


def _ranks_resume_their_own_augmenter(rank: int, world_size: int, port: int, path) -> None:
    """Under torchrun each rank's augmenter draws its own images; a resumed rank continues its own."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    from tasks import distributed
    from tasks.augment import Augmenter

    world, _ = distributed.init("cpu")
    aug = load_params(ROOT / "params.yaml", {"train.augment": AUGMENT}).train.augment
    x = torch.randint(0, 255, (4, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    stateful = {"augment": Augmenter(aug, 7 + rank, torch.device("cpu")), "rng": resume.GlobalRng(torch.device("cpu"))}
    torch.manual_seed(100 + rank)
    stateful["augment"](x)
    resume.save(path, "fp", 0, stateful, [], {}, world)
    expected = stateful["augment"](x), torch.rand(3)
    dist_barrier = torch.distributed.barrier
    dist_barrier()
    fresh = {"augment": Augmenter(aug, 7 + rank, torch.device("cpu")), "rng": resume.GlobalRng(torch.device("cpu"))}
    resume.restore(resume.load(path, "fp", fresh, world.size), fresh, world)
    got = fresh["augment"](x), torch.rand(3)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), f"rank {rank}"
    gathered = distributed.gather_objects(got[0], world)
    if world.main:  # the ranks' draws differ (seeds 7 and 8): each restored its own state
        assert not torch.equal(gathered[0], gathered[1])
    distributed.shutdown(world)


def test_each_torchrun_rank_resumes_its_own_augmenter_and_generators(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ranks_resume_their_own_augmenter, args=(2, port, tmp_path / "state.pt"), nprocs=2, join=True)
    saved = torch.load(tmp_path / "state.pt", weights_only=True)["states"]
    assert len(saved["augment"]) == len(saved["rng"]) == 2
    assert not torch.equal(saved["augment"][0]["generator"], saved["augment"][1]["generator"])


def test_killed_between_an_early_stop_and_the_model_the_restart_trains_no_further(make_project, monkeypatch):
    """The state of the stopping epoch is saved before the model is written: a run killed in
    between must not train on when restarted (it would, on a fresh validation improvement)."""
    early = FAST | {
        "make_batches.epochs": 6, "make_batches.val_fraction": 0.25, "make_batches.classes_per_batch": 2,
        "train.optimizer": {"name": "SGD", "lr": 0.0}, "train.early_stopping_patience": 2,
    }
    runs = {}
    for name in ("straight", "killed"):
        params = load_params(make_project(early, name=name))
        synthetic_items(params.paths["items"], n_classes=10, test_classes=2)
        make_batches.run(params.make_batches, params.paths)
        runs[name] = params
    train.run(runs["straight"].train, runs["straight"].paths)
    stopped_after = runs["straight"].paths["train_curve"].read_text().count("\n") - 1
    assert stopped_after < 6

    killed = runs["killed"]

    def killed_here(*_args, **_kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(train, "save_checkpoint", killed_here)
        with pytest.raises(KeyboardInterrupt):
            train.run(killed.train, killed.paths)
    assert torch.load(killed.paths["train_state"], weights_only=True)["epochs_done"] == stopped_after
    train.run(killed.train, killed.paths)
    assert killed.paths["train_curve"].read_text().count("\n") - 1 == stopped_after
    a, b = _weights(runs["straight"].paths["model"]), _weights(killed.paths["model"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resumed_under_a_new_pipeline_run_the_restored_epochs_are_logged_there(make_project, monkeypatch):
    """A flow run killed in train, then run again: the new flow opens a new pipeline run, which
    must hold the epochs trained before the kill as well (they were only in the failed run)."""
    params = _project(make_project, "flow")
    root, experiment = params.paths.root, params.train.experiment
    first = tracking.start_pipeline_run(root, experiment)
    save = resume.save

    def save_then_die(path, fp, epoch, *args, **kwargs):
        save(path, fp, epoch, *args, **kwargs)
        if epoch == 2:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(resume, "save", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            train.run(params.train, params.paths, parent_run_id=first)
    second = tracking.start_pipeline_run(root, experiment)
    train.run(params.train, params.paths, parent_run_id=second)
    client = MlflowClient(tracking.tracking_uri(root))
    assert [m.step for m in client.get_metric_history(second, "train.loss")] == list(range(EPOCHS))
    child = [r for r in client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
             if r.data.tags.get("mlflow.parentRunId") == second]
    assert len(child) == 1 and [m.step for m in client.get_metric_history(child[0].info.run_id, "train.loss")] == list(range(EPOCHS))
    assert len(client.get_metric_history(first, "train.loss")) == 3  # the failed run keeps what it saw
