import csv
import json
from pathlib import Path

import pytest
import torch
from pytorch_metric_learning import losses, miners

from tasks import make_batches, train, train_data
from tasks.params import load_params
from tasks.objectives import mining_stats
from conftest import FAST, synthetic_items


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_training_lowers_the_loss_and_writes_its_outputs(make_project):
    params = load_params(make_project(FAST | {"make_batches.epochs": 6, "train.miner": None}))
    synthetic_items(params.paths["items"])
    make_batches.run(params.make_batches, params.paths)
    result = train.run(params.train, params.paths)

    curve = _csv(params.paths["train_curve"])
    assert len(curve) == 6
    assert float(curve[-1]["loss"]) < 0.5 * float(curve[0]["loss"])
    state = torch.load(params.paths["model"], weights_only=True)
    assert state["config"]["embedding_dim"] == FAST["train.embedding_dim"]
    assert json.loads(params.paths["run_info"].read_text())["run_id"] == result["run_id"]


def test_zero_epochs_saves_the_untrained_network(make_project):
    params = load_params(make_project(FAST | {"make_batches.epochs": 0}))
    synthetic_items(params.paths["items"])
    make_batches.run(params.make_batches, params.paths)
    result = train.run(params.train, params.paths)
    assert result["epochs"] == 0 and result["steps"] == 0
    assert params.paths["model"].exists()


def test_non_finite_loss_stops_with_the_epoch_and_step(make_project):
    # A huge lr (inf is refused when params load) overflows the weights after the first step.
    params = load_params(make_project(FAST | {"train.optimizer": {"name": "SGD", "lr": 1e38}}))
    synthetic_items(params.paths["items"])
    make_batches.run(params.make_batches, params.paths)
    with pytest.raises(FloatingPointError, match=r"not finite at epoch 0, step 1"):
        train.run(params.train, params.paths)
    assert not params.paths["model"].exists()
    assert not params.paths["run_info"].exists()  # no pointer to the failed run


def test_a_failed_run_leaves_the_previous_model_and_its_run(make_project):
    root = make_project(FAST)
    params = load_params(root)
    synthetic_items(params.paths["items"])
    make_batches.run(params.make_batches, params.paths)
    good = train.run(params.train, params.paths)
    model = params.paths["model"].read_bytes()
    diverging = load_params(root, {"train.optimizer": {"name": "SGD", "lr": 1e38}})
    with pytest.raises(FloatingPointError):
        train.run(diverging.train, diverging.paths)
    assert params.paths["model"].read_bytes() == model
    assert json.loads(params.paths["run_info"].read_text())["run_id"] == good["run_id"]


def _stats(*args):
    return {k: float(v) for k, v in mining_stats(*args).items()}


def test_mining_stats_on_a_hand_made_batch():
    # 1-D embeddings on the unit circle: class 0 at angle 0 and 0.1, class 1 at angle 0.5.
    ang = torch.tensor([0.0, 0.1, 0.5])
    emb = torch.stack([ang.cos(), ang.sin()], 1)
    labels = torch.tensor([0, 0, 1])
    loss_fn = losses.TripletMarginLoss(margin=0.2)
    triplets = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    stats = _stats(emb, triplets, loss_fn)
    d_ap, d_an = 2 * torch.sin(torch.tensor(0.05)), 2 * torch.sin(torch.tensor(0.25))
    assert stats["mined"] == 1
    assert stats["pos_distance"] == pytest.approx(d_ap.item(), abs=1e-5)
    assert stats["neg_distance"] == pytest.approx(d_an.item(), abs=1e-5)
    assert stats["frac_active"] == (1.0 if d_ap - d_an + 0.2 > 0 else 0.0)
    # The miner's own output feeds the same statistics: with a margin of 1 both triplets
    # (0,1,2) and (1,0,2) violate it; with 0.2 neither does (d_an - d_ap ≈ 0.39).
    wide = miners.TripletMarginMiner(margin=1.0, type_of_triplets="all")(emb, labels)
    assert _stats(emb, wide, loss_fn)["mined"] == 2
    narrow = miners.TripletMarginMiner(margin=0.2, type_of_triplets="all")(emb, labels)
    assert _stats(emb, narrow, loss_fn) | {"pos_distance": 0, "neg_distance": 0} == {
        "mined": 0, "frac_active": 0.0, "pos_distance": 0, "neg_distance": 0}


def test_mining_stats_on_pairs():
    emb = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    pairs = miners.MultiSimilarityMiner()(emb, labels)
    stats = _stats(emb, pairs, losses.MultiSimilarityLoss())
    assert stats["mined"] == sum(len(p) for p in pairs) / 2


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


@pytest.mark.slow
@pytest.mark.parametrize("device,mode", [
    ("cpu", True),
    ("cpu", "reduce-overhead"),  # accepted on a CPU, where there are no CUDA graphs to replay
    pytest.param("cuda", True, marks=CUDA),
    pytest.param("cuda", "reduce-overhead", marks=CUDA),
])
def test_compiled_training_matches_eager(make_project, device, mode):
    """train.compile runs network + objective through torch.compile; the train stage end to end
    gives the same losses as eager. The objective is a smooth one (supervised NT-Xent, fused):
    with semi-hard mining a triplet at the margin flips in or out on a 1e-7 difference and the
    runs part (seen on an AVX2 CPU: 1e-6 for six steps, then 9e-4) — the compiled semi-hard step
    is compared on the same weights in tests/test_recipe.py."""
    curves = []
    for name, compile_ in (("eager", False), ("compiled", mode)):
        fast = FAST | {"train.device": device, "train.precision": "fp32", "train.miner": None,
                       "train.loss": {"name": "NTXentLoss", "temperature": 0.1}}
        params = load_params(make_project(fast | {"make_batches.epochs": 2, "train.compile": compile_}, name=name))
        synthetic_items(params.paths["items"])
        make_batches.run(params.make_batches, params.paths)
        train.run(params.train, params.paths)
        curves.append([float(row["loss"]) for row in _csv(params.paths["train_curve"])])
    assert curves[1] == pytest.approx(curves[0], rel=1e-4)


def test_frozen_backbone_epochs_train_only_the_head(make_project):
    params = load_params(make_project(FAST | {"make_batches.epochs": 1, "train.freeze_backbone_epochs": 1}))
    synthetic_items(params.paths["items"])
    make_batches.run(params.make_batches, params.paths)
    torch.manual_seed(params.train.seed)
    from tasks.models import EmbeddingNet

    start = EmbeddingNet({  # the same seed and config as train.run: the same initial weights
        "backbone": "small_cnn", "width": FAST["train.width"], "embedding_dim": FAST["train.embedding_dim"],
        "in_channels": 1, "image_size": 16, "pooling": "avg"}).state_dict()
    train.run(params.train, params.paths)
    end = torch.load(params.paths["model"], weights_only=True)["state_dict"]
    # All of the trunk's state: its BatchNorm statistics too (in train mode they followed the batches).
    trunk_state = [k for k in start if k.startswith("trunk.")]
    assert any("running_mean" in k for k in trunk_state)
    assert all(torch.equal(start[k], end[k]) for k in trunk_state), [k for k in trunk_state if not torch.equal(start[k], end[k])]
    assert not torch.equal(start["head.weight"], end["head.weight"])


def test_self_supervised_mode_trains_without_labels(make_project):
    """Two augmented views of each image are positives (NT-Xent); labels are never used."""
    params = load_params(make_project(FAST | {
        "make_batches.epochs": 8,  # 48 train images: one batch of 4 × 8 an epoch
        "train.mode": "self_supervised",
        "train.loss": {"name": "NTXentLoss", "temperature": 0.1}, "train.miner": None,
    }))
    synthetic_items(params.paths["items"])
    make_batches.run(params.make_batches, params.paths)
    train.run(params.train, params.paths)
    curve = _csv(params.paths["train_curve"])
    assert float(curve[-1]["loss"]) < float(curve[0]["loss"])
    # pos_distance: NT-Xent's cosine similarity between the two views of an image (as supervised
    # NT-Xent logs it: larger is closer), which training raises, and above the negatives'.
    assert float(curve[-1]["pos_distance"]) > float(curve[0]["pos_distance"])
    assert float(curve[-1]["pos_distance"]) > float(curve[-1]["neg_distance"])


def _relabel_train(params, original, meta, relabel) -> None:
    """Write ``original`` (the items table, its metadata ``meta``) with its train rows' labels
    replaced by ``relabel(labels)``: labels (N,) object -> the train rows' new labels."""
    import numpy as np
    import pyarrow as pa

    from tasks import contracts as C

    labels = np.array(original[C.LABEL].to_pylist(), dtype=object)
    labels[np.array(original[C.SPLIT].to_pylist()) == C.TRAIN] = relabel(labels)
    table = original.set_column(original.schema.get_field_index(C.LABEL), C.LABEL, pa.array(labels.tolist(), pa.string()))
    C.write_table(table, params.paths["items"], C.ITEMS, meta)


def test_self_supervised_training_does_not_depend_on_the_labels(make_project, capsys, monkeypatch):
    """The same images under other labels train the same weights: no label decides which images
    train or share a batch. Permuted labels (make_batches plans other P×K batches), and unlabelled
    images — one label for all, or one label each — which no P×K plan can use: make_batches warns
    and plans no batch, and self-supervised training takes only the plan's size and epochs."""
    import numpy as np

    from tasks import contracts as C
    from tasks.errors import DatasetError

    params = load_params(make_project(FAST | {
        "make_batches.epochs": 2, "train.mode": "self_supervised",
        "train.loss": {"name": "NTXentLoss", "temperature": 0.1}, "train.miner": None,
    }))
    synthetic_items(params.paths["items"])
    original, meta = C.read_table(params.paths["items"], C.ITEMS)
    train_rows = np.flatnonzero(np.array(original[C.SPLIT].to_pylist()) == C.TRAIN)
    relabellings = {
        "as made": lambda labels: labels[train_rows],
        "permuted": lambda labels: labels[np.random.default_rng(0).permutation(train_rows)],
        "one label": lambda labels: np.full(len(train_rows), "unlabelled", dtype=object),
        "one label each": lambda labels: np.array([f"img{i}" for i in range(len(train_rows))], dtype=object),
    }
    weights, batches = [], []
    for name, relabel in relabellings.items():
        _relabel_train(params, original, meta, relabel)
        capsys.readouterr()
        make_batches.run(params.make_batches, params.paths)
        warned = "the plan holds no batch. Supervised training will refuse it" in capsys.readouterr().err
        assert warned == name.startswith("one label"), name
        batches.append(C.read_table(params.paths["batches"], C.BATCHES)[0][C.ITEM_ID].to_pylist())
        train.run(params.train, params.paths)
        weights.append(torch.load(params.paths["model"], weights_only=True)["state_dict"])
    assert batches[0] != batches[1] and batches[2] == batches[3] == []  # the labels did change make_batches' plan
    for other in weights[1:]:
        assert all(torch.equal(weights[0][k], other[k]) for k in weights[0])
    # The plan make_batches could not fill is refused by supervised training, saying why: at once,
    # before torchrun would start processes that each fail on it.
    from tasks import distributed

    monkeypatch.setattr(distributed, "launch", lambda *a: pytest.fail("torchrun started"))
    supervised = load_params(Path(params.paths.root) / "params.yaml", {"train.mode": "supervised", "train.processes": 2,
                                                                      "train.loss": {"name": "TripletMarginLoss"}})
    with pytest.raises(DatasetError, match=r"holds no batch: make_batches.classes_per_batch=4 but only 0 train classes can "
                                           r"fill 8 images each \(small_classes='replace'\): lower P or K, or set train.mode: self_supervised"):
        train.run(supervised.train, supervised.paths)


def test_early_stopping_on_unlabelled_validation_images_is_refused(make_project):
    """Unlabelled images given one label each: held-out "classes" are single images, whose
    Recall@1 is 0 in every epoch — early stopping on it would keep the first epoch."""
    import numpy as np

    from tasks import contracts as C
    from tasks.errors import ParamsError

    params = load_params(make_project(FAST | {
        "make_batches.val_fraction": 0.25, "train.early_stopping_patience": 1, "train.mode": "self_supervised",
        "train.loss": {"name": "NTXentLoss", "temperature": 0.1}, "train.miner": None,
    }))
    synthetic_items(params.paths["items"])
    original, meta = C.read_table(params.paths["items"], C.ITEMS)
    n_train = int(np.sum(np.array(original[C.SPLIT].to_pylist()) == C.TRAIN))
    _relabel_train(params, original, meta, lambda labels: np.array([f"img{i}" for i in range(n_train)], dtype=object))
    make_batches.run(params.make_batches, params.paths)
    with pytest.raises(ParamsError, match=r"needs at least 2 validation classes, the plan holds out 12 \(0 of 2\+ images\): "
                                          r"raise make_batches.val_fraction"):
        train.run(params.train, params.paths)


def test_validation_recall_is_logged_and_early_stopping_keeps_the_best_epoch(make_project):
    # lr = 0: only BatchNorm's running statistics move, so validation Recall@1 soon stops improving.
    params = load_params(make_project(FAST | {
        "make_batches.epochs": 6, "make_batches.val_fraction": 0.25, "make_batches.classes_per_batch": 2,
        "train.optimizer": {"name": "SGD", "lr": 0.0}, "train.early_stopping_patience": 2,
    }))
    synthetic_items(params.paths["items"], n_classes=10, test_classes=2)
    plan = make_batches.run(params.make_batches, params.paths)
    assert plan["n_validation_classes"] == 2  # a quarter of the 8 train classes
    result = train.run(params.train, params.paths)
    curve = _csv(params.paths["train_curve"])
    recalls = [float(r["val_recall_at_1"]) for r in curve]
    best = recalls.index(max(recalls))
    assert len(curve) < 6, "stopped early"
    assert len(curve) - 1 - best == 2  # stopped exactly `patience` epochs after the best one
    assert all(0 <= r <= 1 for r in recalls)
    assert not params.paths["train_state"].exists()
    # The summary and the checkpoint say what ran and which epoch the model is.
    assert (result["epochs"], result["planned_epochs"], result["kept_epoch"]) == (len(curve), 6, best)
    assert result["val_recall_at_1"] == pytest.approx(max(recalls)) and result["loss"] == pytest.approx(float(curve[best]["loss"]), rel=1e-5)
    saved = torch.load(params.paths["model"], weights_only=True)
    assert (saved["epochs"], saved["kept_epoch"]) == (len(curve), best)
    # The saved model is the best epoch's: it scores the best validation Recall@1 again.
    from tasks.engine import recall_at_1
    from tasks.models import load_checkpoint

    pixels, labels, row_of, meta = train_data.load_train_data(params.paths, torch.device("cpu"))
    _, plan_meta = train_data.load_plan(params.paths, row_of)
    val = [c for c, n in enumerate(meta["class_names"]) if n in set(plan_meta["validation_classes"])]
    rows = torch.isin(labels, torch.tensor(val))
    model = load_checkpoint(params.paths["model"])
    assert recall_at_1(model, pixels[rows], labels[rows]) == pytest.approx(max(recalls), abs=1e-6)


@pytest.mark.parametrize("val_fraction, held", [(0.0, 0), (0.25, 1)])
def test_early_stopping_without_two_validation_classes_is_a_clear_error(make_project, capsys, val_fraction, held):
    """One validation class: its Recall@1 is 1 in every epoch, and the first epoch would be kept.
    (val_fraction 0 with a patience is refused when params load, tests/test_params.py; here the
    plan on disk was made without validation classes and train is given a patience all the same.)"""
    from tasks.errors import ParamsError

    params = load_params(make_project(FAST | {"train.early_stopping_patience": 2 if held else 0,
                                              "make_batches.val_fraction": val_fraction, "make_batches.classes_per_batch": 2}))
    synthetic_items(params.paths["items"])  # 4 train classes
    make_batches.run(params.make_batches, params.paths)
    assert ("holds out 1 of 4 train classes" in capsys.readouterr().err) is (held == 1)
    with pytest.raises(ParamsError, match=f"at least 2 validation classes, the plan holds out {held}: raise make_batches.val_fraction"):
        train.run(params.train.model_copy(update={"early_stopping_patience": 2}), params.paths)


def test_deterministic_mode_trains_with_deterministic_kernels_and_restores_the_global_flags(make_project, monkeypatch):
    """On a CPU our training is deterministic either way (identical reruns prove nothing about the
    switch): the flags are read inside the epochs themselves."""
    params = load_params(make_project(FAST | {"train.deterministic": True}))
    synthetic_items(params.paths["items"])
    make_batches.run(params.make_batches, params.paths)
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    assert before[0] is False  # torch's default: so that restoring it shows
    seen = []

    def epoch_noting_the_flags(*args, **kwargs):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark,
                     torch.backends.cudnn.deterministic))
        return train_epoch(*args, **kwargs)

    from tasks.engine import train_epoch

    monkeypatch.setattr(train, "train_epoch", epoch_noting_the_flags)
    shas = {train.run(params.train, params.paths)["model_sha256"] for _ in range(2)}
    assert len(shas) == 1
    assert seen == [(True, False, True)] * 4  # 2 epochs × 2 runs
    # A Prefect flow runs export and evaluate in the same process: the flags must not leak.
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark) == before


def test_supervised_augmentation_is_seeded_and_changes_what_is_learnt(make_project):
    """train.augment.supervised warps every batch (fresh draws from the train seed): reruns are
    identical, the weights differ from training on the plain images, and the loss still falls."""
    aug = {"supervised": True, "crop_scale": [0.7, 1.0], "rotate": 10.0, "translate": 0.1, "hflip": False,
           "brightness": 0.0, "contrast": 0.0}
    shas = []
    for name, overrides in (("plain", {}), ("aug", {"train.augment": aug}), ("aug2", {"train.augment": aug})):
        params = load_params(make_project(FAST | {"make_batches.epochs": 4} | overrides, name=name))
        synthetic_items(params.paths["items"])
        make_batches.run(params.make_batches, params.paths)
        shas.append(train.run(params.train, params.paths)["model_sha256"])
        curve = _csv(params.paths["train_curve"])
        assert float(curve[-1]["loss"]) < float(curve[0]["loss"])
    assert shas[1] == shas[2] and shas[0] != shas[1]


def test_a_loss_and_miner_with_a_distance_by_name_train(make_project):
    """``distance: CosineSimilarity`` (a similarity: larger = closer) reaches pml as the object;
    the mining statistics follow its direction (positives more similar than negatives)."""
    params = load_params(make_project(FAST | {
        "make_batches.epochs": 3,
        "train.loss": {"name": "TripletMarginLoss", "margin": 0.2, "distance": "CosineSimilarity"},
        "train.miner": {"name": "TripletMarginMiner", "margin": 0.2, "distance": {"name": "CosineSimilarity"}},
    }))
    synthetic_items(params.paths["items"])
    make_batches.run(params.make_batches, params.paths)
    train.run(params.train, params.paths)
    curve = _csv(params.paths["train_curve"])
    assert float(curve[-1]["loss"]) < float(curve[0]["loss"])
    assert float(curve[-1]["pos_distance"]) > float(curve[-1]["neg_distance"])  # similarities


def test_a_warm_up_or_a_frozen_backbone_that_covers_every_epoch_is_told(make_project, capsys):
    params = load_params(make_project(FAST | {"make_batches.epochs": 2, "train.freeze_backbone_epochs": 2,
                                              "train.warmup_epochs": 3, "train.lr_schedule": "cosine"}))
    synthetic_items(params.paths["items"])
    make_batches.run(params.make_batches, params.paths)
    train.run(params.train, params.paths)
    err = capsys.readouterr().err
    assert "freeze_backbone_epochs 2 covers all 2 epochs: only the head trains" in err
    assert "warmup_epochs 3 covers all 2 epochs: the learning rate only rises, the cosine schedule never starts" in err
