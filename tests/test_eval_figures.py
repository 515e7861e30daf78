"""tasks.eval_figures: the projection is deterministic and the pictures are written
(the full evaluate stage draws them all in tests/test_evaluate.py)."""

from __future__ import annotations

import numpy as np

from tasks import figures
from tasks.eval_figures import _csv, _project


def test_pca_projection_is_deterministic_and_separates_clusters():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (50, 8)), rng.normal(0, 0.1, (50, 8)) + 3]).astype(np.float32)
    a, b = _project(x, "pca", 0), _project(x[::-1].copy(), "pca", 0)[::-1]
    np.testing.assert_allclose(a, b, atol=1e-5)  # sign pinned: same picture whatever the order
    assert abs(a[:50, 0].mean() - a[50:, 0].mean()) > 3


def test_pictures_are_pngs(tmp_path):
    figures.ap_histogram(np.array([0.1, 0.5, 0.9, 1.0]), tmp_path / "ap.png", "t")
    labels = np.array(["a", "b"] * 10)
    figures.projection(np.random.default_rng(0).normal(size=(20, 2)), labels, tmp_path / "p.png", "t")
    for name in ("ap.png", "p.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_csv_quotes_labels_with_commas():
    assert _csv("a,b") == '"a,b"' and _csv("plain") == "plain" and _csv('x"y,') == '"x""y,"'
