"""A training run killed with SIGKILL mid-epoch and restarted ends exactly like an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

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
    assert len([r for r in runs if r.data.tags.get("tripletflow.kind") == "pipeline"]) == 1


def test_a_state_from_other_params_is_not_resumed(make_project, capsys):
    params = _project(make_project, "p")
    other = params.train.model_copy(update={"seed": 123})
    fp_other = resume.fingerprint(other, resume.input_digests(params.paths))
    assert fp_other != resume.fingerprint(params.train, resume.input_digests(params.paths))
    meta = {"channels": 1, "height": 48, "n_train_classes": 6}
    stateful = build(params.train, meta, torch.device("cpu")).stateful
    resume.save(params.paths["train_state"], fp_other, 0, stateful, [{"epoch": 0}], {"parent": "x", "child": "y"})
    assert resume.load(params.paths["train_state"], resume.fingerprint(params.train, resume.input_digests(params.paths)), torch.device("cpu")) is None
    assert "starting afresh" in capsys.readouterr().out
