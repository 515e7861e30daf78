"""tasks.query on the outputs of a pipeline run in this test: image files in, nearest items out."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from tasks import build_index, export_embeddings, query
from tasks import contracts as C

from test_evaluate import _trained


@pytest.fixture
def pipeline(make_project):
    params = _trained(make_project, {"make_batches.epochs": 1})
    export_embeddings.run(params.export_embeddings, params.paths)
    build_index.run(params.build_index, params.paths)
    return params


def test_query_finds_the_item_an_image_came_from(pipeline, tmp_path, capsys):
    items, meta = C.read_table(pipeline.paths["items"], C.ITEMS)
    test = items.filter(items[C.SPLIT].to_numpy(zero_copy_only=False) == C.TEST)
    files, ids = [], []
    for i in (0, 13):  # one item of each test class
        px = C.pixels_numpy(test[C.PIXELS])[i].reshape(meta["height"], meta["width"])
        files.append(tmp_path / f"q{i}.png")
        Image.fromarray(px, mode="L").save(files[-1])
        ids.append(test[C.ITEM_ID][i].as_py())
    out = tmp_path / "grid.png"
    query.main([*map(str, files), "--params", str(pipeline.paths.root + "/params.yaml"), "--k", "3", "--out", str(out)])
    answer = json.loads(capsys.readouterr().out)["query"]
    assert [a["image"] for a in answer] == [str(f) for f in files]
    for a, item_id in zip(answer, ids):
        assert [r["rank"] for r in a["results"]] == [1, 2, 3]
        top = a["results"][0]
        assert top["item_id"] == item_id and top["score"] == pytest.approx(1.0, abs=1e-4)  # itself
        row = test.filter(test[C.ITEM_ID].to_numpy(zero_copy_only=False) == item_id)
        assert top["label"] == row[C.LABEL][0].as_py() and top["source"] == row[C.SOURCE][0].as_py()
        assert a["results"][0]["score"] >= a["results"][1]["score"] >= a["results"][2]["score"]
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_a_file_that_is_not_an_image_is_a_clear_error(pipeline, tmp_path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(SystemExit) as exit_:
        query.main([str(bad), "--params", str(pipeline.paths.root + "/params.yaml")])
    assert exit_.value.code == 2
    assert "notes.png" in capsys.readouterr().err


def test_more_images_than_one_search_chunk_all_get_answers(pipeline, tmp_path):
    """Search runs in chunks of 4,096 queries; the command answers every image, not the first chunk."""
    items, meta = C.read_table(pipeline.paths["items"], C.ITEMS)
    items = items.filter(items[C.SPLIT].to_numpy(zero_copy_only=False) == C.TEST)  # the gallery
    px = C.pixels_numpy(items[C.PIXELS])[0].reshape(meta["height"], meta["width"])
    files = []
    for i in range(4100):
        files.append(tmp_path / f"q{i}.png")
        Image.fromarray(px, mode="L").save(files[-1])
    answer = query.query(pipeline, files, 2)
    assert len(answer) == 4100
    assert answer[-1]["results"][0]["item_id"] == items[C.ITEM_ID][0].as_py()


def test_images_are_read_at_the_size_the_model_takes(pipeline, tmp_path, capsys):
    """params.yaml's ingest section may have moved on since the model was trained: the model's
    own input size decides how a query image is decoded."""
    items, meta = C.read_table(pipeline.paths["items"], C.ITEMS)
    items = items.filter(items[C.SPLIT].to_numpy(zero_copy_only=False) == C.TEST)  # the gallery
    px = C.pixels_numpy(items[C.PIXELS])[-1].reshape(meta["height"], meta["width"])
    big = tmp_path / "q.png"
    Image.fromarray(px, mode="L").save(big)  # at 64 px (params' size now) it would not be itself
    params = pipeline.model_copy(update={"ingest": pipeline.ingest.model_copy(update={"image_size": 64})})
    top = query.query(params, [big], 1)[0]["results"][0]
    assert top["item_id"] == items[C.ITEM_ID][-1].as_py() and top["score"] == pytest.approx(1.0, abs=1e-4)


def _save_test_item(pipeline, tmp_path, i: int):
    """Test item ``i`` (a gallery item) written as a PNG -> (file, item_id)."""
    items, meta = C.read_table(pipeline.paths["items"], C.ITEMS)
    test = items.filter(items[C.SPLIT].to_numpy(zero_copy_only=False) == C.TEST)
    px = C.pixels_numpy(test[C.PIXELS])[i].reshape(meta["height"], meta["width"])
    path = tmp_path / f"q{i}.png"
    Image.fromarray(px, mode="L").save(path)
    return path, test[C.ITEM_ID][i].as_py()


def test_an_l2_index_scores_higher_is_more_similar(pipeline, tmp_path):
    """faiss reports L2 as squared distances, smallest first; query must turn them into "higher is
    more similar" scores: minus the squared distance to each result's embedding."""
    build_index.run(pipeline.build_index.model_copy(update={"metric": "l2"}), pipeline.paths)
    image, item_id = _save_test_item(pipeline, tmp_path, 0)
    results = query.query(pipeline, [image], 24)[0]["results"]  # the whole gallery: both test classes
    assert len(results) == 24
    assert results[0]["item_id"] == item_id and results[0]["score"] == pytest.approx(0.0, abs=1e-4)  # itself
    scores = [r["score"] for r in results]
    assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores[1:])
    # Exactly minus the squared distance, from the exported embeddings.
    table, vectors, _ = C.read_embeddings(pipeline.paths["embeddings"])
    row = {v: n for n, v in enumerate(table[C.ITEM_ID].to_pylist())}
    q = vectors[row[item_id]]
    for r in results:
        assert r["score"] == pytest.approx(-float(((vectors[row[r["item_id"]]] - q) ** 2).sum()), abs=1e-5)


def test_an_index_built_from_another_model_is_refused(pipeline, tmp_path, capsys):
    """A model retrained after build_index: its embeddings are not the index's, so scores would
    mean nothing. The command says so rather than answer."""
    import torch

    from tasks.models import EmbeddingNet, load_checkpoint, save_checkpoint

    config = load_checkpoint(pipeline.paths["model"]).config
    torch.manual_seed(123)
    save_checkpoint(EmbeddingNet(config), pipeline.paths["model"])  # same shape, other weights
    image, _ = _save_test_item(pipeline, tmp_path, 0)
    with pytest.raises(SystemExit) as exit_:
        query.main([str(image), "--params", str(pipeline.paths.root + "/params.yaml")])
    assert exit_.value.code == 2
    assert "built from another model" in capsys.readouterr().err
