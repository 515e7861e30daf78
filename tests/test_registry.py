"""The MLflow Model Registry: logged model, versions, champion/challenger by mAP@R on the same set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from conftest import FAST, run_stages
from tasks import build_index, evaluate, export_embeddings, registry, tracking
from tasks.contracts import file_digest
from tasks.models import load_checkpoint, save_checkpoint
from tasks.params import load_params


@pytest.fixture
def evaluated(make_project):
    """A project through build_index (FAST, registry on); returns its params."""
    params = load_params(make_project(FAST | {"evaluate.registered_model": "embedder"}))
    run_stages(params, last="build_index")
    return params


def _client(params):
    return MlflowClient(tracking.tracking_uri(params.paths.root))


def test_first_version_is_champion_and_its_pyfunc_maps_images_to_embeddings(evaluated, monkeypatch):
    from tasks import contracts

    hashed = []
    monkeypatch.setattr(contracts, "file_digest", lambda path, *a: hashed.append(path) or file_digest(path, *a))
    result = evaluate.run(evaluated.evaluate, evaluated.paths)
    assert hashed.count(evaluated.paths["model"]) == 1  # checked against the embeddings, not again to register
    assert (result["model_version"], result["model_alias"]) == (1, "champion")
    client = _client(evaluated)
    mv = client.get_model_version_by_alias("embedder", "champion")
    assert float(mv.tags["map_at_r"]) == pytest.approx(result["map_at_r"])
    # register got the digest evaluate checked: the tag still names these weights
    assert mv.tags["model_sha256"] == file_digest(evaluated.paths["model"])
    assert mv.run_id == tracking.parent_from_run_info(evaluated.paths.root, evaluated.paths["run_info"])

    import mlflow.pyfunc

    mlflow_model = mlflow.pyfunc.load_model(f"{mv.source}")
    assert mlflow_model.metadata.get_input_schema().inputs[0].type == np.dtype("uint8")
    images = np.random.default_rng(0).integers(0, 256, (3, 1, 16, 16), dtype=np.uint8)
    want = load_checkpoint(evaluated.paths["model"])(torch.from_numpy(images)).detach().numpy()
    np.testing.assert_allclose(mlflow_model.predict(images), want, rtol=1e-5, atol=1e-6)


def _retrain(params, seed: int) -> None:
    """Other weights in ``paths.model`` (as a training run with another seed would leave), then
    its embeddings and index (evaluate refuses another model's)."""
    paths = params.paths
    model = load_checkpoint(paths["model"])
    with torch.no_grad():
        for t in model.parameters():
            t.add_(torch.randn(t.shape, generator=torch.Generator().manual_seed(seed)) * 1e-3)
    save_checkpoint(model, paths["model"])
    export_embeddings.run(params.export_embeddings, paths)
    build_index.run(params.build_index, paths)


def test_a_better_version_takes_champion_a_worse_one_is_challenger(evaluated):
    p = evaluated.paths
    first = evaluate.run(evaluated.evaluate, p)
    # Scores are compared as recorded on the versions: make the champion's look unbeatable.
    client = _client(evaluated)
    client.set_model_version_tag("embedder", "1", "map_at_r", "2.0")
    _retrain(evaluated, 1)
    second = evaluate.run(evaluated.evaluate, p)
    assert (second["model_version"], second["model_alias"]) == (2, "challenger")
    assert "does not beat champion v1" in second["alias_reason"]
    client.set_model_version_tag("embedder", "1", "map_at_r", repr(first["map_at_r"] - 0.1))
    _retrain(evaluated, 2)
    third = evaluate.run(evaluated.evaluate, p)
    assert (third["model_version"], third["model_alias"]) == (3, "champion")
    assert int(client.get_model_version_by_alias("embedder", "champion").version) == 3
    assert int(client.get_model_version_by_alias("embedder", "challenger").version) == 2


def test_the_same_weights_on_the_same_set_are_registered_once(evaluated, capsys):
    """Evaluate re-run for an evaluate-only change (dvc repro) reports the version the model is."""
    p = evaluated.paths
    first = evaluate.run(evaluated.evaluate, p)
    _retrain(evaluated, 1)
    second = evaluate.run(evaluated.evaluate, p)
    assert second["model_version"] == 2
    again = evaluate.run(evaluated.evaluate.model_copy(update={"recall_at": [1, 2]}), p)
    assert (again["model_version"], again["model_alias"]) == (2, second["model_alias"])
    assert again["alias_reason"].startswith("already registered: same weights, same evaluation set")
    assert "not registered again" in capsys.readouterr().out
    client = _client(evaluated)
    assert sorted(int(v.version) for v in client.search_model_versions("name = 'embedder'")) == [1, 2]
    assert first["model_alias"] == "champion"

    # Stopped after the version was created, before its alias was set: the retry sets it.
    client.delete_registered_model_alias("embedder", second["model_alias"])
    retried = evaluate.run(evaluated.evaluate, p)
    assert (retried["model_version"], retried["model_alias"]) == (2, second["model_alias"])
    assert int(client.get_model_version_by_alias("embedder", second["model_alias"]).version) == 2

    # The same weights scoring otherwise (searched through another index) are another result.
    client.set_model_version_tag("embedder", "2", "map_at_r", repr(second["map_at_r"] - 0.01))
    other = evaluate.run(evaluated.evaluate, p)
    assert other["model_version"] == 3


def test_a_champion_from_another_evaluation_set_is_not_compared(evaluated):
    p = evaluated.paths
    evaluate.run(evaluated.evaluate, p)
    _client(evaluated).set_model_version_tag("embedder", "1", "evaluation_set", "another")
    again = evaluate.run(evaluated.evaluate, p)
    assert again["model_alias"] == "challenger" and "another evaluation set" in again["alias_reason"]


def test_the_evaluation_set_id_depends_on_which_items_are_scored(evaluated):
    """Query ids and gallery ids each: a set that differs in either one is another set."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks import contracts as C

    before = registry.evaluation_set_id(evaluated.paths)
    assert before == registry.evaluation_set_id(evaluated.paths)
    path = evaluated.paths["embeddings"]
    original = pq.read_table(path)

    def with_one_flag_off(flag):
        """The original embeddings with one item's ``flag`` turned off; that item keeps its other flag."""
        flags = original[flag].to_pylist()
        flags[flags.index(True)] = False
        pq.write_table(original.set_column(original.schema.get_field_index(flag), flag, pa.array(flags)), path)
        return registry.evaluation_set_id(evaluated.paths)

    # The synthetic test split is query = gallery: one flag flipped leaves the other set as it was.
    query_changed = with_one_flag_off(C.IS_QUERY)
    gallery_changed = with_one_flag_off(C.IS_GALLERY)
    assert query_changed != before
    assert gallery_changed != before  # only the gallery changed: hashing the queries alone misses it
    assert query_changed != gallery_changed  # which set an item left matters, not only that one did
    pq.write_table(original, path)
    assert registry.evaluation_set_id(evaluated.paths) == before


def test_a_version_that_only_ties_the_champion_is_challenger(evaluated):
    """Promotion needs a strictly better mAP@R: an equal score (another seed landing on the same
    value, common on small test sets) leaves the champion in place."""
    p = evaluated.paths
    # register() directly with a chosen score: evaluate would only add seconds and an unknown mAP@R.
    run_id = tracking.parent_from_run_info(p.root, p["run_info"])
    first = registry.register(p, "embedder", run_id, {"map_at_r": 0.5})
    assert (first["model_version"], first["model_alias"]) == (1, "champion")
    _retrain(evaluated, 1)  # other weights, so it is a new version, not the one already registered
    tie = registry.register(p, "embedder", run_id, {"map_at_r": 0.5})
    assert (tie["model_version"], tie["model_alias"]) == (2, "challenger"), tie
    assert "does not beat champion v1" in tie["alias_reason"]
    assert int(_client(evaluated).get_model_version_by_alias("embedder", "champion").version) == 1
