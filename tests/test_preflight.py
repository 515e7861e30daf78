"""tasks.preflight: what the params ask of this machine, checked before a whole-pipeline run starts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import FAST, default_params
from tasks.params import apply_overrides, parse_params
from tasks.preflight import machine_errors


def _params(overrides: dict, root: Path):
    return parse_params(apply_overrides(default_params(), overrides), root)


@pytest.mark.parametrize("overrides, n, expected", [
    ({"train.device": "cuda"}, 0, ["train.device: 'cuda' asked for, but CUDA is not available here"]),
    ({"export_embeddings.device": "cuda:0", "evaluate.device": "cuda"}, 0,
     ["export_embeddings.device: 'cuda:0' asked for, but CUDA is not available here",
      "evaluate.device: 'cuda' asked for, but CUDA is not available here"]),
    ({"evaluate.device": "cuda:2"}, 2, ["evaluate.device: 'cuda:2' asked for, but this machine has 2 GPU(s)"]),
    ({"train.processes": 4}, 2, ["train.processes: 4 processes but 2 GPUs here"]),  # auto: CUDA is here
    ({"train.processes": 4, "train.device": "cpu"}, 2, []),
    ({"train.processes": 4}, 0, []),  # auto on a CPU: processes share its cores
    ({"train.device": "cuda:1", "export_embeddings.device": "cuda"}, 2, []),
])
def test_devices_this_machine_lacks_are_named(tmp_path, gpus, overrides, n, expected):
    gpus(n)
    assert machine_errors(_params(overrides, tmp_path)) == expected


def test_cuda_is_not_asked_about_unless_the_params_ask_for_it(tmp_path, monkeypatch):
    """device auto and one process (the defaults): torch.cuda is not touched before the stages."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: pytest.fail("CUDA asked about"))
    assert machine_errors(_params({}, tmp_path)) == []


def test_a_missing_weights_file_is_named_where_train_would_look(tmp_path):
    resnet = {"train.backbone": "resnet18"}
    assert machine_errors(_params(resnet | {"train.pretrained": "/nonexistent/w.pth"}, tmp_path)) == [
        "train.pretrained: no weights file at /nonexistent/w.pth"]
    # Relative to the project root, as train resolves it, not to the current folder.
    assert machine_errors(_params(resnet | {"train.pretrained": "weights/w.pth"}, tmp_path)) == [
        f"train.pretrained: no weights file at {tmp_path / 'weights/w.pth'}"]
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "w.pth").write_bytes(b"")
    assert machine_errors(_params(resnet | {"train.pretrained": "weights/w.pth"}, tmp_path)) == []


def test_default_weights_missing_from_torchs_cache_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    [error] = machine_errors(_params({"train.backbone": "resnet18", "train.pretrained": "default"}, tmp_path))
    assert error.startswith("train.pretrained: default weights of resnet18 are not in torch's cache")


def test_the_flow_cli_stops_before_prefect_and_any_output(make_project, gpus, capsys):
    """train.device=cuda without CUDA, or a missing weights file: the flow ran ingest and
    make_batches (rewriting their outputs) and failed in train."""
    from flows.pipeline import main

    gpus(0)
    params_file = make_project(FAST)
    with pytest.raises(SystemExit) as info:
        main(["--params", str(params_file), "--set", "train.device=cuda", "--set", "train.backbone=resnet18",
              "--set", "train.pretrained=w.pth"])
    assert str(info.value) == ("tripletflow: error: params this machine cannot run\n"
                               "  train.device: 'cuda' asked for, but CUDA is not available here\n"
                               f"  train.pretrained: no weights file at {params_file.parent / 'w.pth'}")
    assert sorted(p.name for p in params_file.parent.iterdir()) == ["params.yaml"]
