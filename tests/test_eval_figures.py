"""tasks.eval_figures: the projection is deterministic and the pictures are written
(the full evaluate stage draws them all in tests/test_evaluate.py), and a big retrieval grid is one
picture of bounded size."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from tasks import figures, mosaic
from tasks.eval_figures import _csv, _project
from tasks.params import GRID_MAX_RESULTS, GRID_MAX_ROWS


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


def _grid_inputs(q: int, k: int, side: int = 16):
    rng = np.random.default_rng(0)
    return (rng.integers(0, 256, (q, side, side, 1), dtype=np.uint8), rng.integers(0, 256, (q, k, side, side, 1), dtype=np.uint8),
            rng.random((q, k)) < 0.5, np.sort(rng.random((q, k)), axis=1)[:, ::-1], [f"class{i}\nAP@R 0.50" for i in range(q)])


def test_a_large_retrieval_grid_is_one_png_of_bounded_size(tmp_path):
    queries, neighbors, correct, scores, labels = _grid_inputs(64, 32)
    figures.retrieval_grid(queries, neighbors, correct, scores, labels, tmp_path / "grid.png")
    picture = np.asarray(Image.open(tmp_path / "grid.png").convert("RGB"))
    height, width = picture.shape[:2]
    assert width * height <= mosaic.BUDGET
    # 16 px thumbnails enlarged 4 times, 33 per row, 64 rows: the picture is a whole number of cells.
    cell_w, cell_h = width // 33, height // 64
    assert width % 33 == 0 and height % 64 == 0 and cell_w >= 64 + 2 * mosaic.FRAME and cell_h > cell_w
    # Every result's frame is green or red, as ``correct`` says (its left edge, mid-height).
    top = height - mosaic.GAP - (64 + 2 * mosaic.FRAME) // 2  # the last row's frames, half-way down
    left = [int(j * cell_w + (cell_w - mosaic.GAP - 64 - 2 * mosaic.FRAME) // 2 + mosaic.GAP // 2) for j in range(1, 33)]
    green, red = (np.round(np.array(c) * 255) for c in (figures.GREEN, figures.RED))
    np.testing.assert_array_equal(picture[top, left], np.where(correct[-1, :, None], green, red))


def test_a_grid_past_the_limits_is_drawn_in_part_with_a_warning(tmp_path, capsys):
    queries, neighbors, correct, scores, labels = _grid_inputs(GRID_MAX_ROWS + 1, GRID_MAX_RESULTS + 1, side=4)
    figures.retrieval_grid(queries, neighbors, None, scores, labels, tmp_path / "q.png", np.full(scores.shape, "lab"))
    err = capsys.readouterr().err
    assert f"first {GRID_MAX_ROWS} of {GRID_MAX_ROWS + 1} rows" in err and f"{GRID_MAX_RESULTS} of {GRID_MAX_RESULTS + 1} results" in err
    width, height = Image.open(tmp_path / "q.png").size
    assert width % (GRID_MAX_RESULTS + 1) == 0 and height % GRID_MAX_ROWS == 0 and width * height <= mosaic.BUDGET


def test_a_grid_of_queries_at_another_size_than_their_results_is_drawn(tmp_path):
    """tasks.query decodes its images at the model's size; the results' pixels come from the items."""
    path = tmp_path / "grid.png"
    figures.retrieval_grid(np.zeros((2, 20, 20, 3), np.uint8), np.zeros((2, 3, 16, 16, 1), np.uint8), None,
                           np.zeros((2, 3)), ["a", "b"], path)
    assert path.stat().st_size > 0
    with pytest.raises(ValueError, match="at least one query"):
        figures.retrieval_grid(np.zeros((0, 16, 16, 1), np.uint8), np.zeros((0, 3, 16, 16, 1), np.uint8), None,
                               np.zeros((0, 3)), [], path)


def test_long_labels_are_cut_at_the_front_to_their_column_and_never_touch(tmp_path):
    """Omniglot-like labels (``Alphabet/character12``) differ at the end: a caption line keeps its
    end after "…", and no ink crosses into the gap between two columns."""
    q, k = 2, 3
    queries, neighbors, correct, scores, _ = _grid_inputs(q, k)
    long = "Inuktitut_(Canadian_Aboriginal_Syllabics)/WIDE_MW_CHARACTER_12"
    figures.retrieval_grid(queries, neighbors, correct, scores, [long, "short"], tmp_path / "g.png",
                           np.full((q, k), long.replace("12", "07")))
    picture = np.asarray(Image.open(tmp_path / "g.png").convert("L"))
    cell_w = picture.shape[1] // (k + 1)
    # The captions' strip of each row is above its frames; the gaps between columns stay white there.
    for boundary in range(cell_w, picture.shape[1], cell_w):
        gap = picture[:, boundary - mosaic.GAP // 2 + 1 : boundary + mosaic.GAP // 2 - 1]
        assert (gap == 255).all(), f"ink in the gap at x={boundary}"


def test_fit_keeps_a_short_line_and_cuts_a_long_one_at_the_front():
    from PIL import ImageFont
    from matplotlib import font_manager

    font = ImageFont.truetype(font_manager.findfont(font_manager.FontProperties()), figures.FONT_PX)
    assert figures._fit("#1 0.873", font, 80) == "#1 0.873"
    cut = figures._fit("Inuktitut_(Canadian_Aboriginal_Syllabics)/character12", font, 80)
    assert cut.startswith("…") and cut.endswith("character12") and font.getlength(cut) <= 80
    assert font.getlength("…" + "Inuktitut_(Canadian_Aboriginal_Syllabics)/character12"[-len(cut):]) > 80  # the most that fits
