"""export_embeddings: one table of every query/gallery embedding, also when sharded over processes."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import FAST, run_stages
from tasks import contracts as C
from tasks import export_embeddings
from tasks.params import load_params


def test_sharded_over_two_processes_the_table_equals_one_process(make_project):
    params_file = make_project(FAST)
    params = load_params(params_file)
    run_stages(params, last="train")
    assert export_embeddings.run(params.export_embeddings, params.paths)["processes"] == 1
    one, v1, meta1 = C.read_embeddings(params.paths["embeddings"])

    two = load_params(params_file, {"export_embeddings.processes": 2})
    result = export_embeddings.run(two.export_embeddings, two.paths)  # torchrun, 2 CPU processes
    assert result["n_embedded"] == one.num_rows and result["processes"] == 2
    sharded, v2, meta2 = C.read_embeddings(two.paths["embeddings"])
    assert sharded.equals(one) and meta2 == meta1
    np.testing.assert_allclose(v2, v1, rtol=1e-5, atol=1e-6)
    assert not list(params.paths["embeddings"].parent.glob(".*.npy"))  # the shards are cleaned up


def test_an_empty_slice_embeds_to_zero_rows_of_the_model_width():
    import torch

    from tasks.models import EmbeddingNet

    model = EmbeddingNet({"backbone": "small_cnn", "width": 8, "embedding_dim": 12, "in_channels": 1, "image_size": 8})
    out = export_embeddings.embed(model.eval(), torch.zeros((0, 1, 8, 8), dtype=torch.uint8), 4, torch.device("cpu"))
    assert out.shape == (0, 12) and out.dtype == np.float32  # so rank shards concatenate


def test_only_the_first_rank_reports_progress(capsys):
    """Each torchrun rank embeds its own slice: their progress lines, interleaved, would each
    count a part under the same name."""
    import torch

    from tasks.models import EmbeddingNet

    model = EmbeddingNet({"backbone": "small_cnn", "width": 8, "embedding_dim": 12, "in_channels": 1, "image_size": 8}).eval()
    pixels = torch.zeros((8, 1, 8, 8), dtype=torch.uint8)
    export_embeddings.embed(model, pixels, 4, torch.device("cpu"), show=False)
    assert capsys.readouterr().err == ""
    export_embeddings.embed(model, pixels, 4, torch.device("cpu"))  # no terminal here: log lines
    assert "export: embed: 100% (2/2 batch)" in capsys.readouterr().err


def test_a_model_that_gives_nan_embeddings_is_refused_before_anything_is_written(make_project):
    """A NaN in a checkpoint's weights (a corrupt or foreign file) makes every embedding NaN; exact
    search would rank a NaN first. The stage stops, naming the model, and writes nothing."""
    import torch

    params = load_params(make_project(FAST))
    run_stages(params, last="train")
    state = torch.load(params.paths["model"], weights_only=True)
    state["state_dict"]["head.weight"][0, 0] = float("nan")
    torch.save(state, params.paths["model"])
    with pytest.raises(C.ContractError, match=r"model.pt: (\d+) of \1 embeddings are not unit vectors .*norm nan"):
        export_embeddings.run(params.export_embeddings, params.paths)
    assert not params.paths["embeddings"].exists()


@pytest.mark.parametrize("change", [{"ingest.image_size": 12}, {"ingest.channels": 3}])
def test_items_ingested_again_at_another_size_are_refused(make_project, change):
    """Re-ingested after train at another size (a CNN embeds it silently, in a space it never
    learned) or with other channels (a conv traceback): a named error, nothing written."""
    from tasks import ingest

    params_file = make_project(FAST)
    params = load_params(params_file)
    run_stages(params, last="train")
    again = load_params(params_file, change)
    ingest.run(again.ingest, again.paths)
    with pytest.raises(C.ContractError, match=r"items\.parquet holds \d+×\d+ images of [13] channel\(s\), but .*model\.pt was "
                                              r"trained on \d+×\d+ of 1: re-run train"):
        export_embeddings.run(again.export_embeddings, again.paths)
    assert not params.paths["embeddings"].exists()


def test_test_classes_the_model_trained_on_are_counted_and_warned_of(make_project, capsys):
    """Another class split ingested by hand after train: some test classes were training classes,
    and their metrics would pass for those of unseen classes."""
    from tasks import ingest

    params_file = make_project(FAST)
    params = load_params(params_file)
    run_stages(params, last="train")
    assert export_embeddings.run(params.export_embeddings, params.paths)["n_test_classes_seen_in_training"] == 0
    assert "warning" not in capsys.readouterr().err
    again = load_params(params_file, {"ingest.seed": params.ingest.seed + 1})
    ingest.run(again.ingest, again.paths)
    seen = export_embeddings.run(again.export_embeddings, again.paths)["n_test_classes_seen_in_training"]
    assert seen > 0
    assert f"warning: {seen} of the" in capsys.readouterr().err


def test_classes_the_items_hold_on_both_sides_are_no_warning(make_project, capsys):
    """ingest.shared_classes: allow puts a class in train and test by choice (closed-set): the
    model trained on it and re-training cannot change that. A class it trained on that the items
    now hold in test only is still counted."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from tasks import make_batches, train
    from conftest import synthetic_items

    params = load_params(make_project(FAST))
    synthetic_items(params.paths["items"])
    make_batches.run(params.make_batches, params.paths)
    train.run(params.train, params.paths)
    items, meta = C.read_table(params.paths["items"], C.ITEMS)

    def with_test(rows):  # these rows of class0 (a trained class) moved to the test split, query and gallery
        moved = pc.is_in(items[C.ITEM_ID], pa.array(rows))
        table = items
        for col, value in ((C.SPLIT, C.TEST), (C.IS_QUERY, True), (C.IS_GALLERY, True)):
            table = table.set_column(table.schema.get_field_index(col), col, pc.if_else(moved, value, items[col]))
        C.write_table(table, params.paths["items"], C.ITEMS, meta)
        return export_embeddings.run(params.export_embeddings, params.paths)["n_test_classes_seen_in_training"]

    assert with_test([f"c0-{i}" for i in range(4)]) == 0  # class0 on both sides
    assert "warning" not in capsys.readouterr().err
    assert with_test([f"c0-{i}" for i in range(12)]) == 1  # class0 in test only
    assert "warning: 1 of the 3 test classes" in capsys.readouterr().err
