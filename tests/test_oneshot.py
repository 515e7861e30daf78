"""tasks.oneshot: the Omniglot 20-run one-shot benchmark, on a tiny replica of all_runs.zip built
here (and on the real zip when the shared datasets are present)."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks import oneshot
from tasks.errors import DatasetError

REAL = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "omniglot" / "all_runs.zip"


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _replica(tmp: Path, n_runs: int = 2, ways: int = 4, as_zip: bool = True) -> Path:
    """all_runs layout: runNN/{training/classXX.png, test/itemXX.png, class_labels.txt}; test image
    i is a noisy copy of training class answer[i] (a shuffled mapping)."""
    rng = np.random.default_rng(0)
    files: dict[str, bytes] = {}
    for r in range(1, n_runs + 1):
        run = f"run{r:02d}"
        protos = rng.integers(0, 256, size=(ways, 20, 20))
        answer = rng.permutation(ways)
        lines = []
        for c in range(ways):
            files[f"{run}/training/class{c + 1:02d}.png"] = _png(protos[c].astype(np.uint8))
        for i, c in enumerate(answer):
            noisy = np.clip(protos[c] + rng.normal(0, 20, (20, 20)), 0, 255).astype(np.uint8)
            files[f"{run}/test/item{i + 1:02d}.png"] = _png(noisy)
            lines.append(f"{run}/test/item{i + 1:02d}.png {run}/training/class{c + 1:02d}.png")
        files[f"{run}/class_labels.txt"] = ("\n".join(lines) + "\n").encode()
    if as_zip:
        path = tmp / "all_runs.zip"
        with zipfile.ZipFile(path, "w") as zf:
            for name, data in files.items():
                zf.writestr(name, data)
        return path
    for name, data in files.items():
        (tmp / "runs" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp / "runs" / name).write_bytes(data)
    return tmp / "runs"


def _pixels_embed(pixels: np.ndarray) -> np.ndarray:
    """Centred, normalised raw pixels: enough to match a noisy copy to its original."""
    x = pixels.reshape(len(pixels), -1).astype(np.float64)
    x -= x.mean(axis=1, keepdims=True)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("as_zip", [True, False])
def test_replica_runs_are_read_and_scored(tmp_path, as_zip):
    runs = oneshot.read_runs(_replica(tmp_path, as_zip=as_zip))
    assert [r.name for r in runs] == ["run01", "run02"]
    assert all(len(r.training) == 4 and len(r.test) == 4 for r in runs)
    result = oneshot.score_runs(runs, _pixels_embed, image_size=20, channels=1)
    assert result["accuracy_per_run"] == {"run01": 1.0, "run02": 1.0}
    assert result["mean_accuracy"] == 1.0 and result["error_rate"] == 0.0 and result["runs"] == 2


def test_a_constant_embedding_scores_the_tie_rule(tmp_path):
    runs = oneshot.read_runs(_replica(tmp_path))
    result = oneshot.score_runs(runs, lambda p: np.ones((len(p), 3)), image_size=20, channels=1)
    # Every score ties: each test image is right with chance 1/4 (4 training images), whatever their order.
    assert result["accuracy_per_run"] == {"run01": 0.25, "run02": 0.25}



def test_a_test_image_tied_between_its_class_and_another_counts_one_half(tmp_path):
    """One-hot embeddings: test image i is its answer's vector, except that the image of class 1
    also scores 1 against class 0: right with chance 1/2 — not wrong because class 0 comes first."""
    runs = oneshot.read_runs(_replica(tmp_path))
    order = iter(runs)

    def embed(pixels: np.ndarray) -> np.ndarray:
        run = next(order)  # score_runs embeds one run at a time: its training images, then its tests
        n = len(run.training)
        e = np.zeros((len(pixels), n))
        e[np.arange(n), np.arange(n)] = 1
        e[n + np.arange(len(run.answer)), run.answer] = 1
        e[n + int(np.flatnonzero(run.answer == 1)[0]), 0] = 1
        return e

    result = oneshot.score_runs(runs, embed, image_size=20, channels=1)
    assert result["accuracy_per_run"] == {"run01": 3.5 / 4, "run02": 3.5 / 4}

def _shifted_embed(pixels: np.ndarray) -> np.ndarray:
    """_pixels_embed moved far off the origin by one fixed vector: L2 distances are unchanged (so
    the nearest is still right), inner products are not (they now favour whichever training image
    lies furthest along the shift, the same one for every test image)."""
    x = _pixels_embed(pixels)
    return x + 100 * np.random.default_rng(7).standard_normal(x.shape[1])


def test_l2_picks_the_nearest_training_image(tmp_path):
    runs = oneshot.read_runs(_replica(tmp_path))
    l2 = oneshot.score_runs(runs, _shifted_embed, image_size=20, channels=1, metric="l2")
    assert l2["accuracy_per_run"] == {"run01": 1.0, "run02": 1.0}  # nearest, not farthest
    # The shift fools inner product: the metric really changes the answer.
    ip = oneshot.score_runs(runs, _shifted_embed, image_size=20, channels=1, metric="inner_product")
    assert ip["mean_accuracy"] < 1.0


@pytest.mark.parametrize("metric", ["l2", "inner_product"])
def test_cli_scores_with_the_metric_asked_for(tmp_path, capsys, monkeypatch, metric):
    # The shifted embedding in place of a model: there l2 and inner product disagree (a model's
    # unit embeddings rank alike under both, so could not tell whether --metric is honoured).
    monkeypatch.setattr(oneshot, "model_embedder", lambda path, device: (_shifted_embed, 20, 1))
    zipped = _replica(tmp_path)
    oneshot.main(["--model", str(tmp_path / "unused.pt"), "--runs", str(zipped), "--metric", metric])
    out = json.loads(capsys.readouterr().out)["oneshot"]
    expected = oneshot.score_runs(oneshot.read_runs(zipped), _shifted_embed, 20, 1, metric)
    assert out["mean_accuracy"] == expected["mean_accuracy"]
    assert (out["mean_accuracy"] == 1.0) == (metric == "l2")  # l2 gets all right, inner product does not


def test_not_the_all_runs_layout_is_a_clear_error(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="class_labels.txt"):
        oneshot.read_runs(tmp_path / "x")


def _untrained_model(path: Path, image_size: int = 28) -> Path:
    import torch

    from tasks.models import EmbeddingNet, save_checkpoint

    torch.manual_seed(0)
    config = {"backbone": "small_cnn", "width": 8, "embedding_dim": 16, "in_channels": 1, "image_size": image_size}
    save_checkpoint(EmbeddingNet(config), path)
    return path


def test_cli_scores_a_saved_model(tmp_path, capsys):
    model = _untrained_model(tmp_path / "model.pt", image_size=20)
    oneshot.main(["--model", str(model), "--runs", str(_replica(tmp_path)), "--device", "cpu"])
    out = json.loads(capsys.readouterr().out)["oneshot"]
    assert out["runs"] == 2 and out["image_size"] == 20
    # The command reports what the library computes with that model on those runs.
    embed, size, channels = oneshot.model_embedder(model, "cpu")
    expected = oneshot.score_runs(oneshot.read_runs(tmp_path / "all_runs.zip"), embed, size, channels)
    assert out["accuracy_per_run"] == pytest.approx(expected["accuracy_per_run"])
    assert out["mean_accuracy"] == pytest.approx(expected["mean_accuracy"])
    assert out["error_rate"] == pytest.approx(1.0 - out["mean_accuracy"])


@pytest.mark.skipif(not REAL.exists(), reason="the shared Omniglot all_runs.zip is not here")
def test_the_official_runs_with_an_untrained_model(tmp_path):
    embed, size, channels = oneshot.model_embedder(_untrained_model(tmp_path / "model.pt"), "cpu")
    result = oneshot.score_runs(oneshot.read_runs(REAL), embed, size, channels)
    assert result["runs"] == 20 and len(result["accuracy_per_run"]) == 20
    assert all(len(r.test) == 20 for r in oneshot.read_runs(REAL)[:1])
    assert result["mean_accuracy"] > 0.05  # chance is 1/20; random conv features do better
