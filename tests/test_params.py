"""Tests for tasks.params: the schema of params.yaml, overrides, flatten, Paths and the CLI's error path."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
import yaml

from conftest import ROOT, default_params
from tasks.params import (
    Component,
    ParamsError,
    Params,
    _check_component,
    apply_overrides,
    flatten,
    load_params,
    parse_params,
    yaml_load,
)


def _error(overrides: dict, tmp_path: Path | None = None) -> str:
    """The ParamsError message for the repository defaults + ``overrides`` (must be invalid)."""
    raw = apply_overrides(default_params(), overrides)
    with pytest.raises(ParamsError) as info:
        parse_params(raw, tmp_path or Path("."))
    return str(info.value)


# --------------------------------------------------------------------------------------------- valid


def test_repository_params_validate():
    raw = default_params()
    params = load_params(ROOT / "params.yaml")
    assert isinstance(params, Params)
    assert params.ingest.source.kind == raw["ingest"]["source"]["kind"]
    assert params.train.loss.name == raw["train"]["loss"]["name"]
    assert params.train.loss.kwargs == {k: v for k, v in raw["train"]["loss"].items() if k != "name"}
    assert params.make_batches.model_dump() == raw["make_batches"]
    assert params.evaluate.recall_at == raw["evaluate"]["recall_at"]
    assert Path(params.paths.root) == ROOT.resolve()
    assert params.paths.items == raw["paths"]["items"]


def test_params_are_frozen():
    params = load_params(ROOT / "params.yaml")
    with pytest.raises(pydantic.ValidationError):
        params.make_batches.epochs = 3  # type: ignore[misc]


def test_image_folder_source_layouts_accepted(make_project):
    one = load_params(make_project({"ingest.source": {"kind": "image_folder", "root": "imgs"}}))
    assert one.ingest.source.root == "imgs" and one.ingest.source.train_root is None
    split = load_params(
        make_project({"ingest.source": {"kind": "image_folder", "train_root": "a", "test_root": "b"}})
    )
    assert (split.ingest.source.train_root, split.ingest.source.test_root) == ("a", "b")


# ------------------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    "dotted",
    ["bogus", "make_batches.bogus", "train.bogus", "paths.bogus", "evaluate.bogus", "ingest.bogus"],
)
def test_unknown_key_is_named(dotted):
    msg = _error({dotted: 1})
    assert dotted in msg
    assert "Extra inputs are not permitted" in msg


def test_unknown_key_in_source_is_reported():
    msg = _error({"ingest.source": {"kind": "image_folder", "root": "x", "bogus": 1}})
    assert "ingest.source" in msg and "bogus" in msg


def test_unknown_key_in_source_names_exact_dotted_key():
    msg = _error({"ingest.source": {"kind": "image_folder", "root": "x", "bogus": 1}})
    assert "ingest.source.bogus:" in msg


def test_key_of_other_source_kind_names_exact_dotted_key():
    # `root` belongs to image_folder, not digits
    msg = _error({"ingest.source.root": "imgs"})
    assert "ingest.source.root:" in msg


def test_unknown_source_kind():
    msg = _error({"ingest.source": {"kind": "webdataset"}})
    assert "ingest.source" in msg and "webdataset" in msg


@pytest.mark.parametrize(
    "source",
    [
        {"kind": "image_folder"},
        {"kind": "image_folder", "train_root": "a"},
        {"kind": "image_folder", "root": "r", "train_root": "a", "test_root": "b"},
    ],
)
def test_image_folder_layout_rules(source):
    msg = _error({"ingest.source": source})
    assert "ingest.source" in msg and "root" in msg


def test_paths_root_may_not_be_set_in_file():
    msg = _error({"paths.root": "/elsewhere"})
    assert "paths.root" in msg


# -------------------------------------------------------------------------------- types and missing


@pytest.mark.parametrize(
    "dotted, value",
    [
        ("make_batches.epochs", "3"),  # strict: no str -> int coercion
        ("make_batches.epochs", 3.0),
        ("make_batches.epochs", True),
        ("ingest.image_size", "16"),
        ("ingest.channels", 2),
        ("ingest.test_fraction", 1.0),
        ("make_batches.small_classes", "keep"),
        ("train.device", "gpu"),
        ("train.compile", "max-autotune"),  # true, false or reduce-overhead
        ("train.compile", "true"),
        ("build_index.metric", "cosine"),
        ("evaluate.recall_at", []),
        ("evaluate.recall_at", [1, 0]),
        ("train.loss.name", 5),
        ("paths.items", 3),
    ],
)
def test_wrong_type_or_value_names_key(dotted, value):
    msg = _error({dotted: value})
    assert dotted in msg
    assert repr(value) in msg or "evaluate.recall_at" in dotted


@pytest.mark.parametrize(
    "dotted", ["make_batches.epochs", "paths.items", "train.loss.name", "ingest.source.kind"]
)
def test_missing_key_is_named(dotted):
    raw = default_params()
    *parents, leaf = dotted.split(".")
    node = raw
    for part in parents:
        node = node[part]
    del node[leaf]
    with pytest.raises(ParamsError) as info:
        parse_params(raw, Path("."))
    assert dotted.rsplit(".", 1)[0] in str(info.value)
    if dotted != "ingest.source.kind":  # a missing discriminator is reported at the union
        assert f"{dotted}: Field required" in str(info.value)


def test_missing_section_is_named():
    raw = default_params()
    del raw["build_index"]
    with pytest.raises(ParamsError, match=r"build_index: Field required"):
        parse_params(raw, Path("."))


def test_every_error_is_reported_at_once():
    msg = _error({"make_batches.epochs": "3", "ingest.bogus": 1, "train.width": 0})
    for key in ("make_batches.epochs", "ingest.bogus", "train.width"):
        assert key in msg


@pytest.mark.parametrize(
    "dotted, value, limit",
    [("evaluate.grid_queries", 10000, 100), ("evaluate.worst_queries", 101, 100), ("evaluate.grid_top_k", 600, 50)],
)
def test_retrieval_grids_past_their_limits_are_refused_naming_the_key(dotted, value, limit):
    # Refused, not clamped: the recorded params then always describe the pictures drawn.
    assert f"{dotted}: Input should be less than or equal to {limit} (got {value})" in _error({dotted: value})
    params = parse_params(apply_overrides(default_params(), {dotted: limit}), Path("."))
    assert getattr(params.evaluate, dotted.split(".")[1]) == limit


def test_top_level_not_a_mapping(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ParamsError, match="mapping"):
        load_params(path)


def test_empty_paths_section_is_params_error(tmp_path):
    raw = default_params()
    raw["paths"] = None
    with pytest.raises(ParamsError, match="paths"):
        parse_params(raw, tmp_path)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="no such params file"):
        load_params(tmp_path / "absent.yaml")
    bad = tmp_path / "params.yaml"
    bad.write_text("ingest: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML") as info:
        load_params(bad)
    # PyYAML's own marks name the file too (they said in "<unicode string>", line 2, column 1).
    assert f'in "{bad}", line 2, column 1' in str(info.value) and "<unicode string>" not in str(info.value)
    assert "ingest: [unclosed" in str(info.value)  # and still quote the line


# ------------------------------------------------------------------------------------- components


def test_unknown_component_classes_are_named():
    for dotted, module in (
        ("train.loss.name", "pytorch_metric_learning.losses"),
        ("train.miner.name", "pytorch_metric_learning.miners"),
        ("train.optimizer.name", "torch.optim"),
    ):
        msg = _error({dotted: "NoSuchThing"})
        assert "NoSuchThing" in msg and module in msg
        assert f"{dotted}:" in msg


def test_component_name_must_be_a_class():
    # a submodule of torch.optim is not a class
    msg = _error({"train.optimizer.name": "lr_scheduler"})
    assert "train.optimizer.name:" in msg


def test_unknown_loss_kwarg_is_reported():
    msg = _error({"train.loss.marginn": 0.1})
    assert "loss.marginn" in msg and "TripletMarginLoss" in msg
    msg = _error({"train.optimizer.momentum": 0.9})  # AdamW has no momentum
    assert "optimizer.momentum" in msg and "AdamW" in msg


def test_unknown_kwarg_names_dotted_key():
    assert "train.loss.marginn: TripletMarginLoss takes no argument 'marginn'" in _error(
        {"train.loss.marginn": 0.1}
    )
    msg = _error({"train.miner.epsilonn": 0.1, "train.optimizer.momentum": 0.9})
    assert "train.miner.epsilonn:" in msg and "train.optimizer.momentum:" in msg  # both reported


@pytest.mark.parametrize(
    "dotted, value",
    [
        ("train.loss.swap", True),  # TripletMarginLoss's own
        ("train.loss.smooth_loss", True),
        ("train.loss.embedding_reg_weight", 0.5),  # EmbeddingRegularizerMixin via **kwargs
        ("train.loss.reducer", None),  # ModuleWithRecordsAndReducer via **kwargs
        ("train.loss.distance", None),  # ModuleWithRecordsAndDistance via **kwargs
        ("train.loss.collect_stats", False),  # ModuleWithRecords, the end of the chain
        ("train.miner.distance", None),
        ("train.miner.collect_stats", False),
        ("train.optimizer.betas", [0.9, 0.99]),
        ("train.optimizer.amsgrad", True),
    ],
)
def test_valid_component_kwargs_accepted(dotted, value):
    params = parse_params(apply_overrides(default_params(), {dotted: value}), Path("."))
    section, component, kw = dotted.split(".")
    assert getattr(params.train, component).kwargs[kw] == value


def test_mro_walk_stops_at_init_without_var_kwargs():
    # torch.nn.Module.__init__ takes *args/**kwargs, but ModuleWithRecords.__init__ (no **kwargs)
    # ends the walk first: Module's names must not leak in, nor must `self`.
    errors = _check_component(
        Component(name="TripletMarginLoss", self=1, args=2, kwargs=3),
        "pytorch_metric_learning.losses",
        "loss",
    )
    assert len(errors) == 3
    # a class whose own __init__ has no **kwargs: only its own parameters
    assert _check_component(Component(name="SGD", lr=0.1, momentum=0.9), "torch.optim", "optimizer") == []
    assert _check_component(Component(name="SGD", distance=None), "torch.optim", "optimizer") == [
        "optimizer.distance: SGD takes no argument 'distance'"
    ]


def test_other_component_classes_accepted():
    raw = apply_overrides(
        default_params(),
        {
            "train.loss": {"name": "ContrastiveLoss", "pos_margin": 0.0, "neg_margin": 1.0},
            "train.miner": {"name": "MultiSimilarityMiner", "epsilon": 0.1},
            "train.optimizer": {"name": "SGD", "lr": 0.01, "momentum": 0.9},
        },
    )
    params = parse_params(raw, Path("."))
    assert params.train.loss.kwargs == {"pos_margin": 0.0, "neg_margin": 1.0}
    assert params.train.miner.name == "MultiSimilarityMiner"


def test_miner_null_accepted(make_project):
    params = load_params(make_project({"train.miner": None}))
    assert params.train.miner is None


# --------------------------------------------------------------------------------------- overrides


def test_apply_overrides_sets_copy():
    raw = default_params()
    before = copy.deepcopy(raw)
    out = apply_overrides(raw, {"train.loss.margin": 0.5, "make_batches.epochs": 1, "train.miner": None})
    assert out["train"]["loss"]["margin"] == 0.5
    assert out["make_batches"]["epochs"] == 1
    assert out["train"]["miner"] is None
    assert out["ingest"] == raw["ingest"]
    assert raw == before  # input untouched (deep copy)
    out["ingest"]["source"]["kind"] = "changed"
    assert raw["ingest"]["source"]["kind"] == before["ingest"]["source"]["kind"]


def test_load_params_with_overrides(make_project):
    path = make_project()
    params = load_params(path, {"make_batches.epochs": 1, "train.loss.margin": 0.3})
    assert params.make_batches.epochs == 1
    assert params.train.loss.kwargs["margin"] == 0.3
    # the file itself unchanged
    assert load_params(path).make_batches.epochs == default_params()["make_batches"]["epochs"] != 1


def test_override_into_missing_section(make_project):
    with pytest.raises(ParamsError, match=r"no section 'nosuch'"):
        load_params(make_project(), {"nosuch.key": 1})
    with pytest.raises(ParamsError, match=r"no section 'train.lossy'"):
        apply_overrides(default_params(), {"train.lossy.margin": 1})


def test_override_below_a_leaf(make_project):
    with pytest.raises(ParamsError, match="not a section"):
        load_params(make_project(), {"train.loss.margin.x": 1})


def test_override_with_unknown_leaf_fails_validation(make_project):
    with pytest.raises(ParamsError, match=r"make_batches\.epochz"):
        load_params(make_project(), {"make_batches.epochz": 1})


def test_override_with_wrong_type_fails(make_project):
    with pytest.raises(ParamsError, match=r"make_batches\.epochs"):
        load_params(make_project(), {"make_batches.epochs": "3"})


# ----------------------------------------------------------------------------------------- flatten


def test_flatten_params():
    raw = apply_overrides(
        default_params(),
        {
            "train.loss": {"name": "TripletMarginLoss", "margin": 0.25},
            "train.miner": {"name": "TripletMarginMiner", "type_of_triplets": "hard"},
            "evaluate.recall_at": [1, 2],
            "paths.items": "d/items.parquet",
        },
    )
    flat = flatten(parse_params(raw, Path(".")))
    assert flat["train.loss.margin"] == 0.25
    assert flat["train.loss.name"] == "TripletMarginLoss"
    assert flat["train.miner.type_of_triplets"] == "hard"
    assert flat["ingest.source.kind"] == raw["ingest"]["source"]["kind"]
    assert flat["evaluate.recall_at"] == [1, 2]
    assert flat["paths.items"] == "d/items.parquet"
    assert flat["make_batches.seed"] == raw["make_batches"]["seed"]
    assert not any(isinstance(v, dict) and v for v in flat.values())
    assert "train" not in flat and "train.loss" not in flat


def test_flatten_null_miner_and_dicts():
    params = parse_params(apply_overrides(default_params(), {"train.miner": None}), Path("."))
    assert flatten(params)["train.miner"] is None
    assert flatten({"a": {"b": {"c": 1}, "d": {}}, "e": [1]}) == {"a.b.c": 1, "a.d": {}, "e": [1]}
    assert flatten({"x": 1}, prefix="p.") == {"p.x": 1}


# ------------------------------------------------------------------------------------------- Paths


def test_paths_resolve_against_params_dir(make_project, tmp_path, monkeypatch):
    path = make_project()
    params = load_params(path)
    project = path.parent.resolve()
    assert params.paths["items"] == project / "data" / "items.parquet"
    assert params.paths["figures"] == project / "plots" / "figures"
    assert params.paths["items"].is_absolute()
    # a relative params path still anchors at its directory, not at the cwd
    monkeypatch.chdir(tmp_path)
    rel = load_params(Path(path.parent.name) / "params.yaml")
    assert rel.paths["items"] == project / "data" / "items.parquet"


def test_absolute_paths_kept(make_project, tmp_path):
    target = tmp_path / "elsewhere" / "items.parquet"
    params = load_params(make_project({"paths.items": str(target)}))
    assert params.paths["items"] == target


def test_paths_unknown_entry():
    params = load_params(ROOT / "params.yaml")
    with pytest.raises(AttributeError):
        params.paths["nope"]


# --------------------------------------------------------------------------------------------- CLI


def _run_cli(stage: str, params_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"tasks.{stage}", "--params", str(params_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_bad_params_exits_nonzero_and_writes_nothing(make_project):
    """The real entry point, in a subprocess: exit status, stderr, no output files."""
    path = make_project({"make_batches.epochs": "3", "ingest.image_size": "16"})
    proc = _run_cli("ingest", path)
    assert proc.returncode != 0
    assert "ingest.image_size" in proc.stderr
    assert "make_batches.epochs" in proc.stderr  # another stage's section also blocks this stage
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in path.parent.rglob("*")) == ["params.yaml"]


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"ingest.bogus": 1}, "ingest.bogus"),
        ({"train.loss.marginn": 1}, "loss.marginn"),
        ({"ingest.source": {"kind": "image_folder", "root": "imgs"}}, "imgs"),  # missing folder
    ],
)
def test_stage_main_bad_input_exits_2_and_writes_nothing(make_project, capsys, overrides, key):
    """Same path in-process (cheaper than a subprocess per case)."""
    from tasks import ingest

    path = make_project(overrides)
    with pytest.raises(SystemExit) as info:
        ingest.main(["--params", str(path)])
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert key in captured.err and captured.err.startswith("tripletflow ingest: error:")
    assert captured.out == ""
    # No output; the run lock (tasks/project_lock.py) may stay: it is not an output, and removing it would race.
    assert sorted(p.name for p in path.parent.rglob("*") if p.name != ".tripletflow.lock") == ["params.yaml"]


def test_cli_missing_params_file(tmp_path):
    proc = _run_cli("ingest", tmp_path / "params.yaml")
    assert proc.returncode != 0
    assert "no such params file" in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_stage_main_valid_params_runs(make_project, capsys):
    from tasks import ingest

    path = make_project({"ingest.source": {"kind": "digits"}, "ingest.image_size": 8, "ingest.workers": 1})
    ingest.main(["--params", str(path)])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ingest"]
    assert summary["ingested"] == 1797
    assert (path.parent / "data" / "items.parquet").is_file()
    assert (path.parent / "reports" / "ingest_quarantine.parquet").is_file()


def test_component_kwarg_values_are_type_checked_against_the_constructor_defaults(tmp_path):
    # A quoted number is a string: torch would fail deep inside AdamW.
    path = tmp_path / "params.yaml"
    raw = default_params()
    raw["train"]["optimizer"]["lr"] = "1e-3"
    raw["train"]["miner"]["type_of_triplets"] = 3
    path.write_text(yaml.safe_dump(raw).replace("lr: 1e-3", "lr: '1e-3'"))
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert "train.optimizer.lr: expected a number, got '1e-3' (a string: write the number without quotes)" in str(err.value)
    assert "train.miner.type_of_triplets: expected str" in str(err.value)


@pytest.mark.parametrize("text,value", [
    ("3e-4", 3e-4), ("1E3", 1000.0), ("-2.5e+2", -250.0), ("1.0e-3", 1e-3), ("3", 3), ("0x10", 16),
    ("1e", "1e"), ("e3", "e3"), ("1_000", 1000), (".5", 0.5), ("'3e-4'", "3e-4"), ("v1e3", "v1e3"),
])
def test_numbers_read_as_yaml_1_2_and_dvc_read_them(text, value):
    """PyYAML (YAML 1.1) reads 3e-4 as a string; DVC's YAML 1.2 reader as a float: params files
    and --set values are read the way DVC reads them."""
    got = yaml_load(f"x: {text}")["x"]
    assert got == value and type(got) is type(value)


def test_an_exponent_without_a_dot_in_params_yaml_is_a_number(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(default_params()).replace("lr: 0.0003", "lr: 3e-4"))
    assert "lr: 3e-4" in path.read_text()
    assert load_params(path).train.optimizer.kwargs["lr"] == 3e-4


@pytest.mark.parametrize("value, why", [([45], "should be 90, 180 or 270"), ([90, 90], "repeats a value")])
def test_train_rotations_are_distinct_right_angles(value, why):
    msg = _error({"ingest.train_rotations": value})
    assert "ingest.train_rotations" in msg and why in msg


# ------------------------------------------------------------- choices the stage's library checks


@pytest.mark.parametrize("overrides,message", [
    ({"train.miner.type_of_triplets": "semi"}, "train.miner.type_of_triplets: TripletMarginMiner takes one of all, hard, semihard, easy"),
    ({"train.miner": {"name": "BatchEasyHardMiner", "neg_strategy": "hardest"}}, 'neg_strategy must be one of "hard" or'),
    ({"train.miner": {"name": "BatchEasyHardMiner", "pos_strategy": "semihard", "neg_strategy": "semihard"}},
     "train.miner: BatchEasyHardMiner(pos_strategy='semihard', neg_strategy='semihard'): pos_strategy and neg_strategy cannot both be"),
    ({"train.backbone": "resnet_18"}, "train.backbone: unknown model 'resnet_18'"),
    ({"train.backbone": "fasterrcnn_resnet50_fpn"}, "train.backbone: unknown model"),  # not a classifier
    ({"train.pretrained": "default"}, "train.pretrained: small_cnn has no pretrained weights"),
    ({"build_index.factory": "Foo"}, "build_index.factory: faiss cannot build 'Foo' for 64-d vectors: could not parse index string Foo"),
    ({"build_index.factory": "IVF16,PQ7"}, "build_index.factory: faiss cannot build 'IVF16,PQ7' for 64-d vectors"),
    ({"build_index.factory": "IDMap,Flat"}, "build_index.factory: 'IDMap,Flat': drop the IDMap prefix"),
    ({"build_index.factory": "IDMap2,HNSW16"}, "build_index.factory: 'IDMap2,HNSW16': drop the IDMap prefix"),
])
def test_choices_a_later_stage_would_reject_stop_when_params_load(overrides, message):
    """Checked before any stage runs: found only when build_index starts, a typo would cost a
    full training run and overwrite the outputs before it (and a miner typo would silently mine
    every triplet)."""
    assert message in _error(overrides)


def test_early_stopping_without_validation_classes_stops_when_params_load():
    """val_fraction 0 holds out no class, so no data can make the patience work: train found it
    only after ingest and make_batches had rewritten their outputs. (A positive val_fraction that
    still holds out < 2 classes depends on the data: train's own check.)"""
    msg = _error({"train.early_stopping_patience": 2, "make_batches.val_fraction": 0.0})
    assert "train.early_stopping_patience: 2 needs validation classes, but make_batches.val_fraction is 0" in msg
    parse_params(apply_overrides(default_params(), {"train.early_stopping_patience": 2,
                                                    "make_batches.val_fraction": 0.2}), Path("."))
    parse_params(apply_overrides(default_params(), {"train.early_stopping_patience": 0,
                                                    "make_batches.val_fraction": 0.0}), Path("."))


@pytest.mark.parametrize("overrides", [
    {"train.miner.type_of_triplets": "hard"},
    {"train.miner": {"name": "BatchEasyHardMiner", "pos_strategy": "easy", "neg_strategy": "semihard"}},
    {"train.backbone": "resnet18", "train.pretrained": "default"},  # the weights file is looked for when training starts
    {"train.backbone": "ResNet18"},  # torchvision's get_model lowercases
    {"train.backbone": "quantized_resnet18"},
    {"build_index.factory": "IVF16,PQ8"},
    {"build_index.factory": "HNSW32", "build_index.metric": "l2"},
])
def test_valid_choices_pass(overrides):
    parse_params(apply_overrides(default_params(), overrides), Path("."))


@pytest.mark.parametrize("overrides, expected", [
    ({"train.optimizer": {"name": "AdamW", "lr": -1.0}}, "train.optimizer: AdamW(lr=-1.0): Invalid learning rate: -1.0"),
    ({"train.optimizer": {"name": "Adam", "lr": 0.001, "betas": [1.5, 0.9]}}, "train.optimizer: Adam(lr=0.001, betas=[1.5, 0.9]): Invalid beta parameter"),
    ({"train.loss": {"name": "TripletMarginLoss", "margin": float("nan")}}, "train.loss.margin: expected a finite number, got nan"),
])
def test_values_the_optimizer_or_no_library_checks_are_refused_at_load(overrides, expected):
    """Found when params load, not when train builds the optimizer after ingest and
    make_batches have rewritten their outputs (a NaN margin is checked by nothing downstream)."""
    assert expected in _error(overrides)


SSL = {"train.mode": "self_supervised", "train.loss": {"name": "NTXentLoss", "temperature": 0.1}, "train.miner": None}


@pytest.mark.parametrize("overrides, expected", [
    (SSL | {"train.miner": {"name": "TripletMarginMiner", "margin": 0.2}},
     "train.miner: self_supervised mode mines no pairs (each image's positive is its other view): set it to null"),
    (SSL | {"train.cross_batch_memory": 256}, "train.cross_batch_memory: not used in self_supervised mode"),
    (SSL | {"train.loss": {"name": "ArcFaceLoss"}}, "train.loss: ArcFaceLoss cannot learn from two views without labels"),
    ({"train.loss": {"name": "ArcFaceLoss"}, "train.miner": None, "train.cross_batch_memory": 256},
     "train.cross_batch_memory: pml's CrossBatchMemory cannot wrap ArcFaceLoss"),
    ({"train.loss": {"name": "ArcFaceLoss", "embedding_size": 128}, "train.miner": None},
     "train.loss.embedding_size: 128 is not train.embedding_dim (64)"),
])
def test_loss_miner_memory_and_mode_that_pml_would_refuse_or_ignore_stop_at_load(overrides, expected):
    """Found when params load: pml raised them with a traceback once training had started (or,
    self-supervised, silently left the miner and the memory unused)."""
    assert expected in _error(overrides)


@pytest.mark.parametrize("overrides", [
    SSL, SSL | {"train.loss": {"name": "TripletMarginLoss", "margin": 0.2}},
    {"train.loss": {"name": "MultiSimilarityLoss"}, "train.cross_batch_memory": 256},
    {"train.loss": {"name": "ArcFaceLoss", "embedding_size": 64}, "train.miner": None},
])
def test_objectives_pml_takes_pass(overrides):
    parse_params(apply_overrides(default_params(), overrides), Path("."))


@pytest.mark.parametrize("dotted, value, expected", [
    ("train.loss.distance", "CosineSimilarity", None),
    ("train.loss.distance", {"name": "LpDistance", "normalize_embeddings": False, "p": 1}, None),
    ("train.loss.reducer", {"name": "ThresholdReducer", "low": 0.0}, None),
    ("train.loss.embedding_regularizer", "LpRegularizer", None),
    ("train.miner.distance", "DotProductSimilarity", None),
    ("train.loss.triplets_per_anchor", 3, None),
    ("train.loss.distance", "cosine", "train.loss.distance.name: 'cosine' is not a class in pytorch_metric_learning.distances"),
    ("train.miner.distance", {"name": "LpDistance", "pp": 1}, "train.miner.distance.pp: LpDistance takes no argument 'pp'"),
    ("train.loss.distance", {"normalize_embeddings": False}, "train.loss.distance: expected a class name of "
                                                            "pytorch_metric_learning.distances or {name: <class>"),
    ("train.loss.distance", {"name": "LpDistance", "p": "2"}, "train.loss.distance.p: expected a number, got '2'"),
    ("train.loss.reducer", 3, "train.loss.reducer: expected a class name of pytorch_metric_learning.reducers"),
    ("train.loss.triplets_per_anchor", "some", "train.loss.triplets_per_anchor: expected \"all\" or a positive integer, got 'some'"),
    ("train.loss.triplets_per_anchor", True, "expected \"all\" or a positive integer, got True"),
])
def test_object_arguments_are_built_by_name_and_checked(dotted, value, expected):
    """pml takes a distance, reducer or regularizer object: params name its class (and give its
    arguments), checked like the loss itself. Before, a name reached the loss as a string and
    training failed with "'str' object is not callable"."""
    raw = apply_overrides(default_params(), {dotted: value})
    if expected is None:
        _, component, kw = dotted.split(".")
        spec = getattr(parse_params(raw, Path(".")).train, component)
        built = spec.built_kwargs()[kw]
        assert built == value if kw == "triplets_per_anchor" else type(built).__name__ == (value if isinstance(value, str) else value["name"])
    else:
        assert expected in _error({dotted: value})


@pytest.mark.parametrize("loss, expected", [
    ({"name": "ArcFaceLoss", "num_classes": "10"}, "train.loss.num_classes: expected an integer, got '10' (leave it out"),
    ({"name": "ArcFaceLoss", "num_classes": 10.0}, "train.loss.num_classes: expected an integer, got 10.0"),
    ({"name": "ArcFaceLoss", "num_classes": None}, "train.loss.num_classes: expected an integer, got None"),
    ({"name": "ProxyAnchorLoss", "embedding_size": "16"}, "train.loss.embedding_size: expected an integer, got '16'"),
    ({"name": "ProxyAnchorLoss", "weight_init_func": "xavier"}, "train.loss.weight_init_func: takes a Python object"),
    ({"name": "ContrastiveLoss", "reducer": {"name": "PerAnchorReducer", "aggregation_func": "sum"}},
     "train.loss.reducer.aggregation_func: takes a Python object"),
    ({"name": "SoftTripleLoss", "centers_per_class": 2.5}, "train.loss.centers_per_class: expected an integer, got 2.5"),
    ({"name": "FastAPLoss", "num_bins": 10.5}, "train.loss.num_bins: expected an integer, got 10.5"),
])
def test_integer_and_object_only_arguments_are_refused_when_params_cannot_give_them(loss, expected):
    assert expected in _error({"train.loss": loss, "train.miner": None})


def test_a_null_count_is_kept_where_the_class_defaults_to_null():
    params = parse_params(apply_overrides(default_params(), {"train.loss": {"name": "MarginLoss", "num_classes": None},
                                                             "train.miner": None}), Path("."))
    assert params.train.loss.kwargs == {"num_classes": None}  # MarginLoss: one beta for every class


def test_a_miner_count_is_checked_as_an_integer():
    assert "train.miner.num_bins: expected an integer, got 10.5" in _error(
        {"train.miner": {"name": "UniformHistogramMiner", "num_bins": 10.5}})


@pytest.mark.parametrize("section", ["train", "export_embeddings"])
def test_a_numbered_gpu_for_several_processes_stops_when_params_load(section):
    """torchrun's processes each take the GPU of their local rank only for device "cuda": with
    "cuda:1" every process would land on GPU 1 (NCCL fails, after the stages before it ran)."""
    msg = _error({f"{section}.device": "cuda:1", f"{section}.processes": 2})
    assert f"{section}.device: 'cuda:1' with {section}.processes 2: every process would use that one GPU" in msg
    for ok in ({f"{section}.device": "cuda", f"{section}.processes": 2}, {f"{section}.device": "cuda:1", f"{section}.processes": 1}):
        parse_params(apply_overrides(default_params(), ok), Path("."))
