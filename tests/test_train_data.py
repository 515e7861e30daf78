"""Tests for tasks.train_data: the batch plan as row indices, checked to be P×K."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from conftest import FAST, synthetic_items
from tasks import contracts as C
from tasks import make_batches
from tasks.params import load_params
from tasks.errors import ParamsError
from tasks.train_data import load_plan, load_train_data, self_supervised_plan


def test_a_plan_that_is_not_p_by_k_is_refused_by_name(make_project):
    params = load_params(make_project(FAST))
    synthetic_items(params.paths["items"])
    make_batches.run(params.make_batches, params.paths)
    _, labels, row_of, _ = load_train_data(params.paths, torch.device("cpu"))
    plan, meta = load_plan(params.paths, row_of, labels.numpy())
    k = meta["images_per_class"]
    assert all(set(np.unique(labels.numpy()[b], return_counts=True)[1]) == {k} for e in plan for b in e)

    table, meta = C.read_table(params.paths["batches"], C.BATCHES)
    ids = table[C.ITEM_ID].to_pylist()
    label_of = {item: int(labels[row]) for item, row in row_of.items()}
    other = next(i for i in row_of if label_of[i] != label_of[ids[0]])
    ids[0] = other  # batch 0: one class one image short, another one over
    C.write_table(table.set_column(table.schema.get_field_index(C.ITEM_ID), C.ITEM_ID, pa.array(ids, pa.string())),
                  params.paths["batches"], C.BATCHES, meta)
    with pytest.raises(C.ContractError, match=r"epoch 0 batch 0 is not P×K"):
        load_plan(params.paths, row_of, labels.numpy())
    load_plan(params.paths, row_of)  # without labels: not checked (benchmarks that know their plan)


def test_the_self_supervised_plan_keeps_the_validation_rows_out_and_needs_one_batch():
    meta = {"classes_per_batch": 2, "images_per_class": 4, "epochs": 3}
    held_out = np.arange(10, 20)
    plan = self_supervised_plan(meta, 40, held_out, seed=0)
    assert len(plan) == 3 and all(len(e) == 3 for e in plan)  # 30 rows: 3 batches of 8
    assert not set(np.concatenate([b for e in plan for b in e]).tolist()) & set(held_out.tolist())
    with pytest.raises(ParamsError, match="classes_per_batch × images_per_class = 8"):
        self_supervised_plan(meta, 17, np.arange(7, 17), seed=0)  # 7 rows left
    assert self_supervised_plan(meta | {"epochs": 0}, 17, held_out, seed=0) == []
