"""Tests for tasks.params_preset: reading presets, and the same params through the flow's loader and
through DVC's --set-param (Hydra) path, for every preset shipped in params/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from dvc.utils.hydra import apply_overrides as dvc_apply_overrides

from conftest import ROOT
from tasks.errors import ParamsError
from tasks.params import load_params
from tasks.params_preset import dvc_set_params, main, read_preset, with_preset

SHIPPED = sorted((ROOT / "params").rglob("*.yaml"))  # datasets, and loss + miner presets in mining/


def _write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_read_preset_flattens_to_section_keys(tmp_path):
    preset = _write(tmp_path / "p.yaml", {"train": {"loss": {"name": "NTXentLoss"}, "miner": None}, "ingest": {"image_size": 8}})
    assert read_preset(preset) == {"train.loss": {"name": "NTXentLoss"}, "train.miner": None, "ingest.image_size": 8}


@pytest.mark.parametrize("bad", [[1, 2], {"train": 3}, {"paths": {"model": "x"}}, {"train": {}}])
def test_bad_presets_name_the_file(tmp_path, bad):
    with pytest.raises(ParamsError, match="p.yaml"):
        read_preset(_write(tmp_path / "p.yaml", bad))


def test_extends_starts_from_another_preset_and_refuses_cycles(tmp_path):
    _write(tmp_path / "base.yaml", {"train": {"width": 8, "embedding_dim": 4}})
    child = _write(tmp_path / "child.yaml", {"extends": "base.yaml", "train": {"width": 16}})
    assert read_preset(child) == {"train.width": 16, "train.embedding_dim": 4}
    _write(tmp_path / "base.yaml", {"extends": "child.yaml", "train": {"width": 8}})
    with pytest.raises(ParamsError, match="cycle"):
        read_preset(child)


def test_missing_preset_is_a_params_error(tmp_path):
    with pytest.raises(ParamsError, match="no such preset"):
        load_params(ROOT / "params.yaml", with_preset(tmp_path / "nope.yaml"))


def test_preset_replaces_whole_keys_and_overrides_win(tmp_path):
    preset = _write(tmp_path / "p.yaml", {"train": {"loss": {"name": "MultiSimilarityLoss"}, "miner": None, "width": 8}})
    p = load_params(ROOT / "params.yaml", with_preset(preset, {"train.width": 4}))
    # The default loss's margin is not merged into the preset's loss (MultiSimilarityLoss has none).
    assert p.train.loss.name == "MultiSimilarityLoss" and p.train.loss.kwargs == {}
    assert p.train.miner is None and p.train.width == 4
    assert p.train.embedding_dim == load_params(ROOT / "params.yaml").train.embedding_dim


def test_unknown_key_in_a_preset_is_named(tmp_path):
    preset = _write(tmp_path / "p.yaml", {"train": {"widht": 8}})
    with pytest.raises(ParamsError, match="widht"):
        load_params(ROOT / "params.yaml", with_preset(preset))


def test_shipped_presets_exist():
    assert {p.parent.name for p in SHIPPED} == {"params", "mining"}


KINDS = {  # every kind of value a preset holds: mapping replacing a mapping, null for a mapping, list, bool, quotes
    "train": {"loss": {"name": "NTXentLoss", "temperature": 0.05}, "miner": None, "channels_last": False,
              "experiment": "it's \\ odd \\"},
    "ingest": {"source": {"kind": "image_folder", "train_root": "../a b/bg.zip", "test_root": "/abs/ev.zip"}},
    "evaluate": {"recall_at": [1, 3], "registered_model": None},
}


@pytest.mark.parametrize("preset", [*SHIPPED, "kinds"], ids=lambda p: getattr(p, "name", p))
def test_dvc_set_params_give_the_same_params_as_the_flow(tmp_path, preset):
    """DVC applies --set-param through Hydra onto params.yaml: the result must validate to exactly
    what the flow's loader makes of params.yaml + the preset."""
    if preset == "kinds":
        preset = _write(tmp_path / "kinds.yaml", KINDS)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    dvc_apply_overrides(str(tmp_path / "params.yaml"), dvc_set_params(read_preset(preset), tmp_path / "params.yaml"))
    via_dvc = load_params(tmp_path / "params.yaml").model_dump(exclude={"paths"})
    via_flow = load_params(ROOT / "params.yaml", with_preset(preset)).model_dump(exclude={"paths"})
    assert via_dvc == via_flow
    default = load_params(ROOT / "params.yaml").model_dump(exclude={"paths"})
    assert (via_flow == default) is (getattr(preset, "name", "") == "semi-hard.yaml")  # params.yaml's own mining


def test_cli_prints_the_dvc_command(tmp_path, capsys):
    preset = _write(tmp_path / "p.yaml", {"train": {"loss": {"name": "NTXentLoss", "temperature": 0.1}, "miner": None}})
    main([str(preset), "--params", str(ROOT / "params.yaml"), "--print", "--", "--queue", "-n", "x"])
    cmd = json.loads(capsys.readouterr().out)
    assert cmd[:3] == ["dvc", "exp", "run"] and cmd[-3:] == ["--queue", "-n", "x"]
    assert "~train.loss" in cmd and "+train.loss={name:'NTXentLoss',temperature:0.1}" in cmd
    assert "~train.miner" in cmd and "+train.miner=null" in cmd


def test_cli_error_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path / "none.yaml"), "--print"])
    assert info.value.code == 2 and "no such preset" in capsys.readouterr().err


def test_cli_validates_the_merged_params_before_running_dvc(tmp_path, capsys, monkeypatch):
    """A bad preset must not reach `dvc exp run`, which rewrites params.yaml and deletes the
    stages' outputs before train finds the error."""
    import subprocess

    monkeypatch.setattr(subprocess, "call", lambda *a, **k: pytest.fail("dvc exp run started"))
    preset = _write(tmp_path / "bad.yaml", {"train": {"loss": {"name": "Foo"}}})
    with pytest.raises(SystemExit) as info:
        main([str(preset), "--params", str(ROOT / "params.yaml")])
    assert info.value.code == 2 and "train.loss" in capsys.readouterr().err


def test_presets_apply_in_order_a_later_one_winning(tmp_path, capsys):
    """A dataset preset, then a loss + miner preset: both through the flow's loader and through
    the DVC command."""
    omniglot, hard = ROOT / "params" / "omniglot.yaml", ROOT / "params" / "mining" / "batch-hard.yaml"
    both = load_params(ROOT / "params.yaml", with_preset([omniglot, hard]))
    alone = load_params(ROOT / "params.yaml", with_preset(omniglot))
    assert both.train.miner.name == "BatchHardMiner" and both.train.loss.name == "TripletMarginLoss"
    assert alone.train.loss != both.train.loss
    assert both.ingest == alone.ingest and both.train.embedding_dim == alone.train.embedding_dim
    assert with_preset([omniglot, hard], {"train.width": 3})["train.width"] == 3  # overrides win over both
    main([str(omniglot), str(hard), "--params", str(ROOT / "params.yaml"), "--print"])
    cmd = json.loads(capsys.readouterr().out)
    assert "+train.miner={name:'BatchHardMiner'}" in cmd and "++ingest.image_size=36" in cmd


def test_a_preset_component_without_its_name_says_it_replaces_the_whole_key(tmp_path):
    """``train: {loss: {margin: 0.3}}`` replaces the loss whole, dropping the default's name: the
    error says so and how to change one argument (which then works)."""
    preset = _write(tmp_path / "p.yaml", {"train": {"loss": {"margin": 0.3}}})
    with pytest.raises(ParamsError) as info:
        load_params(ROOT / "params.yaml", with_preset(preset))
    assert ("train.loss.name: Field required (train.loss is given whole, its class name with its arguments: a preset "
            "replaces it all; to change one argument, --set train.loss.<argument>=<value>)") in str(info.value)
    default = load_params(ROOT / "params.yaml").train.loss
    changed = load_params(ROOT / "params.yaml", {"train.loss.margin": 0.3}).train.loss
    assert changed.name == default.name and changed.kwargs == default.kwargs | {"margin": 0.3}
