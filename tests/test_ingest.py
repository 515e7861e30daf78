"""Tests for tasks.ingest: digits and image-folder sources, class-disjoint splits, quarantine, errors."""

from __future__ import annotations

import io
import shutil
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks import contracts as C
from tasks import decoding, ingest
from tasks.ingest import DatasetError
from tasks.params import load_params

SMALL = {
    "ingest.source": {"kind": "digits"},
    "ingest.image_size": 8,
    "ingest.channels": 1,
    "ingest.test_fraction": 0.4,
    "ingest.workers": 1,
    "ingest.seed": 0,
}  # pinned: params.yaml defaults may change


def png(seed: int, shape=(6, 6)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_tree(root: Path, sizes: dict[str, int], seed: int = 0) -> dict[str, list[bytes]]:
    """``root/<label>/img<i>.png`` with distinct random images; returns the bytes per label."""
    out: dict[str, list[bytes]] = {}
    for c, (label, n) in enumerate(sorted(sizes.items())):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        out[label] = []
        for i in range(n):
            data = png(seed * 100_000 + c * 1000 + i, (6, 6) if i % 2 else (5, 7))
            (folder / f"img{i:03d}.png").write_bytes(data)
            out[label].append(data)
    return out


def run_ingest(params_path: Path, overrides: dict | None = None):
    params = load_params(params_path, overrides)
    summary = ingest.run(params.ingest, params.paths)
    items, meta = C.read_table(params.paths["items"], C.ITEMS)
    quarantine, _ = C.read_table(params.paths["quarantine"], C.QUARANTINE)
    return summary, items, meta, quarantine


def folder_project(make_project, source: dict, name: str = "project", **extra) -> Path:
    return make_project({**SMALL, "ingest.source": {"kind": "image_folder", **source}, **extra}, name=name)


def classes_of(items: pa.Table, split: str) -> set[str]:
    return {l for l, s in zip(items[C.LABEL].to_pylist(), items[C.SPLIT].to_pylist()) if s == split}


def assert_flags(items: pa.Table) -> None:
    split = np.array(items[C.SPLIT].to_pylist())
    is_test = split == C.TEST
    assert set(split) <= {C.TRAIN, C.TEST}
    assert np.array_equal(np.array(items[C.IS_QUERY].to_pylist()), is_test)
    assert np.array_equal(np.array(items[C.IS_GALLERY].to_pylist()), is_test)


# ------------------------------------------------------------------------------------------ digits


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One digits ingest shared by the read-only checks below."""
    import yaml

    from conftest import default_params, set_dotted

    root = tmp_path_factory.mktemp("digits")
    raw = default_params()
    for key, value in {**SMALL, "ingest.source": {"kind": "digits"}, "ingest.test_fraction": 0.4}.items():
        set_dotted(raw, key, value)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return run_ingest(root / "params.yaml")


def test_digits_table(digits_run):
    summary, items, meta, quarantine = digits_run
    assert items.num_rows == 1797
    assert items.column_names == [name for name, _ in C.ITEMS.columns]
    assert len(set(items[C.ITEM_ID].to_pylist())) == 1797
    assert set(items[C.LABEL].to_pylist()) == {str(d) for d in range(10)}
    assert all(s.startswith("digits/") for s in items[C.SOURCE].to_pylist())
    assert items.schema.field(C.PIXELS).type == pa.binary(8 * 8 * 1)
    assert (meta["height"], meta["width"], meta["channels"]) == (8, 8, 1)
    assert meta["summary"] == summary
    assert meta["params"]["image_size"] == 8
    assert quarantine.num_rows == 0 and quarantine.column_names == [C.PATH, C.REASON]
    assert summary["ingested"] == 1797 and summary["skipped"] == 0


def test_digits_splits_are_class_disjoint(digits_run):
    _, items, _, _ = digits_run
    train, test = classes_of(items, C.TRAIN), classes_of(items, C.TEST)
    assert not train & test
    assert train | test == {str(d) for d in range(10)}
    assert len(test) == round(10 * 0.4)
    assert_flags(items)
    counts = Counter(items[C.SPLIT].to_pylist())
    assert digits_run[0]["images"] == dict(counts)
    assert digits_run[0]["classes"] == {C.TRAIN: len(train), C.TEST: len(test)}


def test_digits_rows_sorted_by_split_label_source(digits_run):
    _, items, _, _ = digits_run
    keys = list(zip(items[C.SPLIT].to_pylist(), items[C.LABEL].to_pylist(), items[C.SOURCE].to_pylist()))
    assert keys == sorted(keys) and len(set(keys)) == len(keys)


def test_digits_pixels_match_source(digits_run):
    from sklearn.datasets import load_digits

    from tasks import sources

    _, items, _, _ = digits_run
    data = load_digits()
    by_source = dict(zip(items[C.SOURCE].to_pylist(), range(items.num_rows)))
    px = C.pixels_numpy(items[C.PIXELS])
    for i in (0, 5, 1796):
        row = by_source[f"digits/{i:04d}"]
        want = np.rint(data.images[i] * 255 / 16).astype(np.uint8).ravel()
        assert np.array_equal(px[row], want)
        assert items[C.LABEL][row].as_py() == str(data.target[i])
        assert items[C.ITEM_ID][row].as_py() == next(
            r.item_id for j, r in enumerate(sources.digits()) if j == i
        )


@pytest.mark.parametrize("size, channels, fraction", [(5, 3, 0.2), (12, 1, 0.5)])
def test_digits_shape_and_fraction(make_project, size, channels, fraction):
    path = make_project(
        {**SMALL, "ingest.image_size": size, "ingest.channels": channels, "ingest.test_fraction": fraction}
    )
    summary, items, meta, quarantine = run_ingest(path)
    assert (meta["height"], meta["width"], meta["channels"]) == (size, size, channels)
    assert items.schema.field(C.PIXELS).type.byte_width == size * size * channels
    assert len(classes_of(items, C.TEST)) == round(10 * fraction)
    assert quarantine.num_rows == 0
    if channels == 3:
        px = C.pixels_numpy(items[C.PIXELS])[0].reshape(size, size, 3)
        assert np.array_equal(px[..., 0], px[..., 1]) and np.array_equal(px[..., 1], px[..., 2])


def test_digits_deterministic_and_seeded(make_project, digits_run):
    _, first, _, _ = digits_run
    again = run_ingest(make_project({**SMALL, "ingest.test_fraction": 0.4}, name="again"))[1]
    assert again.equals(first)
    other = run_ingest(make_project({**SMALL, "ingest.test_fraction": 0.4, "ingest.seed": 1}, name="other"))[
        1
    ]
    assert classes_of(other, C.TEST) != classes_of(first, C.TEST)


def test_workers_2_matches_workers_1(make_project, monkeypatch, digits_run):
    _, serial, serial_meta, _ = digits_run
    contexts = []
    real = decoding.multiprocessing.get_context

    def spy(method=None):
        contexts.append(method)
        return real(method)

    monkeypatch.setattr(decoding.multiprocessing, "get_context", spy)
    monkeypatch.setattr(ingest, "PARALLEL_MIN_IMAGES", 0)  # digits are below the real threshold
    # 8×8 digits are 64 bytes: chunks of 100 rows, 18 of them through 8 shared slots (each reused)
    monkeypatch.setattr(ingest, "CHUNK_BYTES", 6400)
    sizes = []
    real_chunks = decoding.decode_chunks

    def chunks_spy(jobs, *args):
        sizes.append(args[-1])
        return real_chunks(jobs, *args)

    monkeypatch.setattr(decoding, "decode_chunks", chunks_spy)
    _, parallel, meta, quarantine = run_ingest(
        make_project({**SMALL, "ingest.test_fraction": 0.4, "ingest.workers": 2}, name="w2")
    )
    assert sizes == [100]
    assert contexts == ["forkserver"]  # the decode pool really ran
    assert parallel.equals(serial)
    assert meta["summary"] == serial_meta["summary"]
    assert quarantine.num_rows == 0


def test_prints_summary_line(make_project, capsys):
    root = make_project({**SMALL, "ingest.source": {"kind": "image_folder", "root": "imgs"}}).parent
    write_tree(root / "imgs", {f"c{i}": 3 for i in range(5)})
    (root / "imgs" / "c0" / "x.txt").write_text("x")
    run_ingest(root / "params.yaml")
    out = capsys.readouterr().out
    assert "ingest: 15 ingested, 1 skipped: 1 not an image" in out


# ------------------------------------------------------------------------------------ image folder


def test_image_folder_single_root_split_by_class(make_project):
    path = folder_project(make_project, {"root": "imgs"}, **{"ingest.test_fraction": 0.4})
    tree = write_tree(path.parent / "imgs", {f"class{i}": 2 + i % 3 for i in range(6)})
    summary, items, meta, quarantine = run_ingest(path)
    assert items.num_rows == sum(len(v) for v in tree.values())
    train, test = classes_of(items, C.TRAIN), classes_of(items, C.TEST)
    assert not train & test and train | test == set(tree)
    assert len(test) == round(6 * 0.4)
    assert_flags(items)
    assert quarantine.num_rows == 0
    assert set(items[C.SOURCE].to_pylist()) == {
        f"imgs/{label}/img{i:03d}.png" for label, blobs in tree.items() for i in range(len(blobs))
    }
    assert summary["images"] == dict(Counter(items[C.SPLIT].to_pylist()))


def test_image_folder_nested_labels_and_pixels(make_project):
    path = folder_project(make_project, {"root": "imgs"}, **{"ingest.channels": 3, "ingest.image_size": 6})
    root = path.parent / "imgs"
    for seed, alphabet in enumerate(("greek", "latin"), start=1):
        write_tree(root / alphabet, {"char01": 2, "char02": 3}, seed=seed)
    _, items, meta, _ = run_ingest(path)
    assert set(items[C.LABEL].to_pylist()) == {f"{a}/char0{i}" for a in ("greek", "latin") for i in (1, 2)}
    assert meta["channels"] == 3
    row = items[C.SOURCE].to_pylist().index("imgs/greek/char01/img001.png")  # a 6×6 image
    with Image.open(root / "greek/char01/img001.png") as img:
        want = np.asarray(img.convert("RGB")).ravel()
    got = C.pixels_numpy(items[C.PIXELS])[row]
    assert np.array_equal(got, want)


def test_image_folder_official_split_is_kept(make_project):
    # test_fraction would send 1 of 7 classes to test; the official split has 3 test classes
    path = folder_project(
        make_project,
        {"train_root": "background", "test_root": "evaluation.zip"},
        **{"ingest.test_fraction": 0.1},
    )
    root = path.parent
    train_tree = write_tree(root / "background", {"a": 3, "b": 2, "c": 4, "d": 2}, seed=1)
    test_tree = write_tree(root / "eval_src" / "evaluation", {"x": 2, "y": 3, "z": 1}, seed=2)
    with zipfile.ZipFile(root / "evaluation.zip", "w") as zf:  # the test root as a zip, Omniglot style
        for file in sorted((root / "eval_src").rglob("*.png")):
            zf.write(file, file.relative_to(root / "eval_src").as_posix())
    summary, items, _, quarantine = run_ingest(path)
    assert classes_of(items, C.TRAIN) == set(train_tree)
    assert classes_of(items, C.TEST) == set(test_tree)  # zip top folder stripped from labels
    assert summary["classes"] == {C.TRAIN: 4, C.TEST: 3}
    assert summary["images"] == {C.TRAIN: 11, C.TEST: 6}
    assert_flags(items)
    assert quarantine.num_rows == 0
    test_sources = [
        s for s, sp in zip(items[C.SOURCE].to_pylist(), items[C.SPLIT].to_pylist()) if sp == C.TEST
    ]
    assert all(s.startswith("evaluation.zip/evaluation/") for s in test_sources)


def test_image_folder_absolute_root(make_project, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    write_tree(elsewhere, {f"k{i}": 2 for i in range(5)})
    path = folder_project(make_project, {"root": str(elsewhere)})
    _, items, _, _ = run_ingest(path)
    assert items.num_rows == 10


def test_bad_files_are_quarantined(make_project):
    path = folder_project(make_project, {"root": "imgs"})
    root = path.parent / "imgs"
    tree = write_tree(root, {f"c{i}": 3 for i in range(5)})
    good = png(999_999)
    (root / "c0" / "corrupt.png").write_bytes(good[: len(good) // 2])
    (root / "c1" / "zero.png").write_bytes(b"")
    (root / "c1" / "garbage.png").write_bytes(b"this is not a png")
    (root / "c2" / "notes.txt").write_text("not an image")
    (root / "c3" / "copy.png").write_bytes(tree["c0"][0])  # duplicate of c0/img000.png
    (root / "stray.png").write_bytes(png(123_456))  # no class folder

    summary, items, _, quarantine = run_ingest(path)
    assert items.num_rows == 15
    assert set(items[C.LABEL].to_pylist()) == set(tree)
    reasons = dict(zip(quarantine[C.PATH].to_pylist(), quarantine[C.REASON].to_pylist()))
    assert set(reasons) == {
        "imgs/c0/corrupt.png",
        "imgs/c1/zero.png",
        "imgs/c1/garbage.png",
        "imgs/c2/notes.txt",
        "imgs/c3/copy.png",
        "imgs/stray.png",
    }
    assert reasons["imgs/c0/corrupt.png"].startswith("corrupt or unsupported image")
    assert reasons["imgs/c1/garbage.png"].startswith("corrupt or unsupported image")
    assert reasons["imgs/c1/zero.png"] == "empty file"
    assert reasons["imgs/c2/notes.txt"].startswith("not an image file")
    assert reasons["imgs/c3/copy.png"] == "duplicate of imgs/c0/img000.png (labelled 'c0' there, 'c3' here)"
    assert reasons["imgs/stray.png"].startswith("no label")
    assert all(reasons.values())
    assert summary["skipped"] == 6 and summary["ingested"] == 15
    assert summary["skipped_by_reason"] == {
        "corrupt": 2,
        "empty": 1,
        "not an image": 1,
        "duplicate": 1,
        "no label": 1,
    }
    # the duplicate's first copy is kept, under its own label
    assert "imgs/c0/img000.png" in items[C.SOURCE].to_pylist()
    assert "imgs/c3/copy.png" not in items[C.SOURCE].to_pylist()


def test_rerun_replaces_outputs(make_project):
    path = folder_project(make_project, {"root": "imgs"})
    root = path.parent / "imgs"
    write_tree(root, {f"c{i}": 2 for i in range(5)})
    (root / "c0" / "bad.png").write_bytes(b"x")
    assert run_ingest(path)[3].num_rows == 1
    (root / "c0" / "bad.png").unlink()
    write_tree(root, {"c9": 2}, seed=7)
    summary, items, _, quarantine = run_ingest(path)
    assert items.num_rows == 12 and quarantine.num_rows == 0 and summary["skipped"] == 0


# ---------------------------------------------------------------------------------- unusable data


def _assert_no_outputs(path: Path) -> None:
    params = load_params(path)
    assert not params.paths["items"].exists()
    assert not params.paths["quarantine"].exists()


def test_single_class_is_dataset_error(make_project):
    path = folder_project(make_project, {"root": "imgs"})
    write_tree(path.parent / "imgs", {"only": 6})
    with pytest.raises(DatasetError, match="classes"):
        run_ingest(path)
    _assert_no_outputs(path)


def test_no_class_with_two_images_is_dataset_error(make_project):
    path = folder_project(make_project, {"root": "imgs"})
    write_tree(path.parent / "imgs", {f"c{i}": 1 for i in range(8)})
    with pytest.raises(DatasetError, match="at least 2 images"):
        run_ingest(path)
    _assert_no_outputs(path)


def test_a_train_split_without_two_usable_classes_is_ingested_with_a_warning(make_project, capsys):
    """Official split: train has 2 classes but only one with 2+ images — unusable for supervised
    training, fine for self-supervised training (unlabelled images), so kept, with a warning."""
    path = folder_project(make_project, {"train_root": "tr", "test_root": "te"})
    write_tree(path.parent / "tr", {"a": 3, "b": 1})
    write_tree(path.parent / "te", {"x": 2, "y": 2}, seed=3)
    summary = run_ingest(path)[0]
    assert summary["images"] == {C.TRAIN: 4, C.TEST: 4}
    err = capsys.readouterr().err
    assert err.count("ingest: warning: train split has 2 classes, 1 with at least 2 images") == 1  # once, not per check
    assert "only train.mode self_supervised can train on it" in err


def test_test_split_needs_two_classes(make_project):
    path = folder_project(make_project, {"train_root": "tr", "test_root": "te"})
    write_tree(path.parent / "tr", {"a": 3, "b": 2})
    write_tree(path.parent / "te", {"x": 4}, seed=3)
    with pytest.raises(DatasetError, match=r"test split has 1 class,"):
        run_ingest(path)


def test_nothing_decodable_is_dataset_error(make_project):
    path = folder_project(make_project, {"root": "imgs"})
    for c in ("a", "b", "c", "d", "e"):  # enough classes to pass the check made before decoding
        (path.parent / "imgs" / c).mkdir(parents=True)
        for i in range(2):
            (path.parent / "imgs" / c / f"{i}.png").write_bytes(f"junk {c}{i}".encode())
    with pytest.raises(DatasetError, match="no usable image"):
        run_ingest(path)
    _assert_no_outputs(path)


def test_no_usable_file_listed_says_why_each_was_skipped(make_project):
    """A flat folder (no class folders) and a stray text file: nothing is decoded, and the error
    gives the reasons (found before decoding), not only "no usable image"."""
    path = folder_project(make_project, {"root": "imgs"})
    write_tree(path.parent / "imgs", {".": 3})
    (path.parent / "imgs" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"no usable image.*4 files were skipped \(3 no label, 1 not an image\), "
                       r"e\.g\. imgs/img000\.png: no label: the file is not inside a class folder"):
        run_ingest(path)
    _assert_no_outputs(path)


def test_classes_emptied_by_decode_failures_are_caught_after_decoding(make_project):
    # 5 classes pass the check on the file list; all but one of the test classes' files are junk
    path = folder_project(make_project, {"root": "imgs"}, **{"ingest.test_fraction": 0.4})
    write_tree(path.parent / "imgs", {f"c{i}": 2 for i in range(5)})
    items = run_ingest(path)[1]
    test = sorted(classes_of(items, C.TEST))
    for label in test[1:]:
        for f in (path.parent / "imgs" / label).iterdir():
            f.write_bytes(b"junk " + f.name.encode() + label.encode())
    params = load_params(path)
    params.paths["items"].unlink()
    params.paths["quarantine"].unlink()
    with pytest.raises(DatasetError, match="test split has 1 class,"):
        run_ingest(path)
    _assert_no_outputs(path)


def test_missing_root_is_file_not_found(make_project):
    path = folder_project(make_project, {"root": "does-not-exist"})
    with pytest.raises(FileNotFoundError):
        run_ingest(path)
    _assert_no_outputs(path)


OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "omniglot"


@pytest.mark.slow
@pytest.mark.skipif(not (OMNIGLOT / "images_evaluation.zip").exists(), reason=f"Omniglot zips not at {OMNIGLOT}")
def test_the_official_omniglot_zips_ingest_as_image_folders(make_project):
    """The real benchmark: background = train (964 characters), evaluation = test (659)."""
    params = load_params(make_project({
        "ingest.source": {
            "kind": "image_folder",
            "train_root": str(OMNIGLOT / "images_background.zip"),
            "test_root": str(OMNIGLOT / "images_evaluation.zip"),
        },
        "ingest.image_size": 28,
    }))
    summary = ingest.run(params.ingest, params.paths)
    assert summary["classes"] == {"train": 964, "test": 659}
    # 20 drawers per character; one background image is byte-identical to another of its class.
    assert summary["images"] == {"train": 19_279, "test": 13_180}
    quarantine = pq.read_table(params.paths["quarantine"]).to_pylist()
    assert [q["reason"].split(" of ")[0] for q in quarantine] == ["duplicate"]
    table = pq.read_table(params.paths["items"], columns=["label", "split"])
    labels = {(row["split"], row["label"]) for row in table.to_pylist()}
    assert ("train", "Greek/character01") in labels  # label = path below the zip's top folder


def test_the_number_of_decode_workers_does_not_change_the_output_file(make_project, monkeypatch):
    monkeypatch.setattr(ingest, "PARALLEL_MIN_IMAGES", 0)
    # `workers` is how, not what: DVC must not see new data (and retrain) when it changes.
    one = load_params(make_project({**SMALL, "ingest.workers": 1}, name="w1"))
    two = load_params(make_project({**SMALL, "ingest.workers": 2}, name="w2b"))
    ingest.run(one.ingest, one.paths)
    ingest.run(two.ingest, two.paths)
    assert one.paths["items"].read_bytes() == two.paths["items"].read_bytes()


def test_an_unguarded_script_gets_an_error_not_a_hang(tmp_path):
    """Worker processes import the main module; a script without a __main__ guard would start
    ingest again in each of them. That must fail with a clear message, not respawn forever."""
    import subprocess
    import sys

    from conftest import ROOT

    script = tmp_path / "unguarded.py"
    script.write_text(
        "from tasks import ingest\n"
        "from tasks.params import load_params\n"
        "ingest.PARALLEL_MIN_IMAGES = 0\n"
        f"p = load_params({str(ROOT / 'params.yaml')!r}, {{'ingest.workers': 2}})\n"
        f"p = p.model_copy(update={{'paths': p.paths.model_copy(update={{'root': {str(tmp_path)!r}}})}})\n"
        "ingest.run(p.ingest, p.paths)\n"
    )
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    # Our message (Python's own error from the child also names __main__, so match ours).
    assert "ingest: decode workers could not start. Called from a script? Put the call under" in proc.stderr


# -------------------------------------------------------------------------------------- manifest


def test_manifest_with_official_query_gallery_protocol(make_project):
    import csv

    path = make_project({**SMALL, "ingest.source": {"kind": "manifest", "path": "data/list.csv"}})
    data = path.parent / "data"
    rows = [["path", "label", "split", "is_query", "is_gallery"]]
    for c in range(4):  # train classes
        for i in range(3):
            rows.append([f"tr/{c}/{i}.png", f"t{c}", "train", "false", "false"])
    for c in range(3):  # test classes: image 0 a query, the others gallery
        for i in range(3):
            rows.append([f"te/{c}/{i}.png", f"q{c}", "test", str(i == 0), str(i > 0)])
    for n, row in enumerate(rows[1:]):
        (data / row[0]).parent.mkdir(parents=True, exist_ok=True)
        (data / row[0]).write_bytes(png(n))
    rows.append(["../params.yaml", "t0", "train", "false", "false"])  # escapes the manifest's directory
    rows.append(["tr/0/9.png", "t0", "train", "false", "false"])  # no such file
    (data / "te" / "2" / "copy.png").write_bytes((data / "te/2/0.png").read_bytes())  # the query's bytes
    rows.append(["te/2/copy.png", "q2", "test", "false", "true"])  # ... as a gallery item: the role is lost
    (data / "te" / "1" / "copy.png").write_bytes((data / "te/1/0.png").read_bytes())
    rows.append(["te/1/copy.png", "q9", "test", "false", "true"])  # another label too: both said
    with open(data / "list.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)

    summary, items, _, quarantine = run_ingest(path)
    assert summary["images"] == {C.TRAIN: 12, C.TEST: 9}
    flags = {s: (q, g) for s, q, g in zip(*(items[c].to_pylist() for c in (C.SOURCE, C.IS_QUERY, C.IS_GALLERY)))}
    assert flags["te/1/0.png"] == (True, False) and flags["te/1/2.png"] == (False, True)
    assert flags["tr/3/1.png"] == (False, False)
    assert summary["skipped_by_reason"] == {"outside root": 1, "missing": 1, "duplicate": 2}
    assert sorted(quarantine[C.PATH].to_pylist()) == ["list.csv:23:../params.yaml", "te/1/copy.png", "te/2/copy.png", "tr/0/9.png"]
    reasons = dict(zip(quarantine[C.PATH].to_pylist(), quarantine[C.REASON].to_pylist()))
    assert reasons["te/2/copy.png"] == "duplicate of te/2/0.png (a gallery item here, not there: evaluation has one gallery item fewer)"
    assert reasons["te/1/copy.png"] == ("duplicate of te/1/0.png (labelled 'q1' there, 'q9' here; a gallery item here, "
                                        "not there: evaluation has one gallery item fewer)")


def test_manifest_without_split_uses_test_fraction(make_project):
    path = make_project({**SMALL, "ingest.source": {"kind": "manifest", "path": "m.csv"}})
    lines = ["path,label"]
    for c in range(5):
        for i in range(2):
            name = f"img_{c}_{i}.png"
            (path.parent / name).write_bytes(png(c * 10 + i))
            lines.append(f"{name},class {c}")
    (path.parent / "m.csv").write_text("\n".join(lines) + "\n")
    summary, items, _, _ = run_ingest(path)
    assert summary["classes"] == {C.TRAIN: 3, C.TEST: 2}  # round(5 * 0.4) test classes
    assert_flags(items)


def test_a_file_listed_twice_under_two_labels_says_so(make_project):
    path = make_project({**SMALL, "ingest.source": {"kind": "manifest", "path": "m.csv"}})
    lines = ["path,label"]
    for c in range(5):
        for i in range(2):
            (path.parent / f"img_{c}_{i}.png").write_bytes(png(c * 10 + i))
            lines.append(f"img_{c}_{i}.png,class {c}")
    lines.append("img_0_0.png,class 4")  # a labelling error: the same file in another class
    (path.parent / "m.csv").write_text("\n".join(lines) + "\n")
    _, items, _, quarantine = run_ingest(path)
    kept = items[C.LABEL].to_pylist()[items[C.SOURCE].to_pylist().index("img_0_0.png")]  # the first in row order
    other = ({"class 0", "class 4"} - {kept}).pop()
    assert quarantine.to_pylist() == [{C.PATH: "img_0_0.png", C.REASON: f"listed twice (labelled {kept!r} there, {other!r} here)"}]


# ------------------------------------------------------------------------- bad input, nothing lost


def _encoded(arr: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    (Image.fromarray(arr, mode=mode) if mode else Image.fromarray(arr)).save(buf, format=fmt)
    return buf.getvalue()


def _bomb_png(side: int) -> bytes:
    """A tiny PNG whose header claims side × side pixels (valid CRC): a decompression bomb."""
    import struct
    import zlib

    data = bytearray(_encoded(np.zeros((1, 1), np.uint8), mode="L"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", side, side)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


def test_every_kind_of_bad_input_is_handled_or_quarantined(make_project, capsys):
    """Each file below is either ingested (converted) or in the quarantine with its reason; the
    summary line counts the skipped ones by category."""
    import os
    import warnings

    path = folder_project(make_project, {"root": "imgs"}, **{"ingest.channels": 3, "ingest.image_size": 6})
    root = path.parent / "imgs"
    tree = write_tree(root, {f"c{i}": 3 for i in range(4)})
    rng = np.random.default_rng(5)
    jpeg = _encoded(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "JPEG")
    png16 = io.BytesIO()
    Image.fromarray(np.array([[0, 65535], [30000, 1000]], np.uint16)).save(png16, format="PNG")
    palette = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).convert("P", colors=4).save(palette, "PNG")
    cmyk = io.BytesIO()
    Image.new("CMYK", (6, 6), (0, 255, 255, 0)).save(cmyk, "JPEG")  # pure red in CMYK
    rgba = np.zeros((6, 6, 4), np.uint8)  # fully transparent black: white once composited
    handled = {
        "c0/cmyk.jpg": cmyk.getvalue(),
        "c0/sixteen_bit.png": png16.getvalue(),
        "c1/palette.png": palette.getvalue(),
        "c1/rgba.png": _encoded(rgba),
        "single/only.png": png(424_242),  # a class with one image: kept (see README)
    }
    skipped = {
        "c2/corrupt.png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 64,
        "c2/truncated.jpg": jpeg[: len(jpeg) // 2],
        "c2/truncated.png": _encoded(rng.integers(0, 256, (32, 32), dtype=np.uint8))[:600],
        "c3/zero.png": b"",
        "c3/vector.svg": b"<svg xmlns='http://www.w3.org/2000/svg'/>",  # a format we do not read
        "c3/pdf.png": b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n",  # right suffix, unsupported content
        "c3/bomb.png": _bomb_png(20_000),
        "c3/second_copy.png": tree["c3"][0],  # the copy after img000.png in row order
    }
    for rel, data in {**handled, **skipped}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    # File and folder names that are not UTF-8 (Latin-1 bytes): os.walk hands them over as
    # surrogate escapes, which Arrow cannot store as they are.
    raw_root = os.fsencode(root)
    os.mkdir(raw_root + b"/caf\xe9")
    for i in range(2):
        with open(raw_root + b"/caf\xe9/n\xe9e%d.png" % i, "wb") as f:
            f.write(png(777_000 + i))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        summary, items, _, quarantine = run_ingest(path)
    reasons = dict(zip(quarantine[C.PATH].to_pylist(), quarantine[C.REASON].to_pylist()))
    assert set(reasons) == {f"imgs/{rel}" for rel in skipped}
    assert reasons["imgs/c3/second_copy.png"] == "duplicate of imgs/c3/img000.png"
    assert reasons["imgs/c3/bomb.png"].startswith("too large")
    assert reasons["imgs/c3/vector.svg"].startswith("not an image file")
    sources_ = items[C.SOURCE].to_pylist()
    assert {f"imgs/{rel}" for rel in handled} <= set(sources_)
    assert "imgs/caf\\xe9/n\\xe9e0.png" in sources_ and "caf\\xe9" in items[C.LABEL].to_pylist()
    px = dict(zip(sources_, C.pixels_numpy(items[C.PIXELS]).reshape(-1, 6, 6, 3)))
    assert np.all(px["imgs/c1/rgba.png"] == 255)
    assert np.all(np.abs(px["imgs/c0/cmyk.jpg"].astype(int) - (255, 0, 0)) <= 8)
    assert px["imgs/c0/sixteen_bit.png"].max() == 255  # scaled from 16 bits, not clipped
    assert summary["skipped_by_reason"] == {"corrupt": 4, "empty": 1, "not an image": 1, "too large": 1, "duplicate": 1}
    assert summary["ingested"] + summary["skipped"] == 12 + 2 + len(handled) + len(skipped)
    assert summary["single_image_classes"] == 1
    assert "ingest: 19 ingested, 8 skipped: 4 corrupt, " in capsys.readouterr().out


# ------------------------------------------------------------------------------- bounded memory


def test_row_groups_do_not_change_the_table(make_project, monkeypatch, digits_run):
    monkeypatch.setattr(ingest, "ROW_GROUP_BYTES", 20_000)  # less than a decode chunk of 512 rows
    path = make_project({**SMALL, "ingest.test_fraction": 0.4}, name="rg")
    _, items, meta, _ = run_ingest(path)
    assert pq.ParquetFile(load_params(path).paths["items"]).metadata.num_row_groups == 4  # 1,797 rows
    assert items.equals(digits_run[1]) and meta == digits_run[2]


def test_warns_when_the_source_is_outside_paths_raw(make_project, capsys):
    path = folder_project(make_project, {"root": "imgs"})
    write_tree(path.parent / "imgs", {f"c{i}": 2 for i in range(5)})
    run_ingest(path)
    assert "ingest: warning: imgs is outside paths.raw (data/raw)" in capsys.readouterr().err
    run_ingest(path.parent / "params.yaml", {"paths.raw": "."})
    assert "outside paths.raw" not in capsys.readouterr().err


def test_image_folder_on_workers_matches_in_process(make_project, monkeypatch):
    """Decoding on worker processes (each file read, hashed and decoded there) gives the same
    bytes as in-process, bad files, empty files and duplicates included."""
    monkeypatch.setattr(ingest, "PARALLEL_MIN_IMAGES", 0)
    outputs = []
    for workers in (1, 2):
        path = folder_project(make_project, {"root": "imgs"}, name=f"w{workers}", **{"ingest.workers": workers})
        tree = write_tree(path.parent / "imgs", {f"c{i}": 40 for i in range(6)})  # 240 images: many chunks
        (path.parent / "imgs" / "c0" / "bad.png").write_bytes(b"junk")
        (path.parent / "imgs" / "c5" / "dup.png").write_bytes(tree["c2"][7])
        (path.parent / "imgs" / "c3" / "empty.png").write_bytes(b"")
        monkeypatch.setattr(ingest, "CHUNK", 16)
        summary, _, _, quarantine = run_ingest(path)
        params = load_params(path)
        outputs.append((params.paths["items"].read_bytes(), quarantine.to_pylist(), summary))
    assert outputs[0] == outputs[1]
    assert outputs[0][2]["skipped_by_reason"] == {"corrupt": 1, "duplicate": 1, "empty": 1}


def test_of_duplicate_files_the_first_in_row_order_is_kept(make_project):
    """Rows are ordered by (split, label, source) before any file is read; the copy of a
    duplicate that comes first in that order is written, whatever folder it sits in."""
    path = folder_project(make_project, {"root": "imgs"}, **{"ingest.test_fraction": 0.5})
    root = path.parent / "imgs"
    tree = write_tree(root, {f"c{i}": 3 for i in range(6)})
    copies = [f"imgs/c{i}/copy.png" for i in range(6)]
    for i in range(6):
        (root / f"c{i}" / "copy.png").write_bytes(png(31_337))
    summary, items, _, quarantine = run_ingest(path)
    split_of = dict(zip(items[C.LABEL].to_pylist(), items[C.SPLIT].to_pylist()))
    assert set(split_of.values()) == {C.TRAIN, C.TEST}
    first = min(copies, key=lambda s: (split_of[s.split("/")[1]], s.split("/")[1], s))
    assert first.startswith("imgs/c0/") is (split_of["c0"] == C.TEST)  # not simply the first folder
    assert first in items[C.SOURCE].to_pylist()
    reasons = dict(zip(quarantine[C.PATH].to_pylist(), quarantine[C.REASON].to_pylist()))
    label = first.split("/")[1]
    assert reasons == {c: f"duplicate of {first} (labelled {label!r} there, {c.split('/')[1]!r} here)" for c in copies if c != first}
    assert summary["ingested"] == 6 * len(tree["c0"]) + 1


# ------------------------------------------------------------------------------ train_rotations


@pytest.mark.parametrize("chunk", [512, 3])
def test_train_rotations_add_rotated_classes_to_train_only(make_project, monkeypatch, chunk):
    """Each train image gets one copy per angle (np.rot90 of its pixels, counter-clockwise) under
    ``<label>@rot<deg>``, ``<id>@rot<deg>``; test rows are exactly those of a run without. With
    small chunks, some hold only test rows."""
    monkeypatch.setattr(ingest, "CHUNK", chunk)
    extra = {"ingest.test_fraction": 0.4, "ingest.image_size": 6, "ingest.channels": 3}
    tree_sizes = {f"c{i}": 2 + i % 3 for i in range(6)}
    plain = folder_project(make_project, {"root": "imgs"}, name="plain", **extra)
    write_tree(plain.parent / "imgs", tree_sizes)
    _, base, _, _ = run_ingest(plain)
    path = folder_project(make_project, {"root": "imgs"}, name="rot", **extra, **{"ingest.train_rotations": [90, 180, 270]})
    tree = write_tree(path.parent / "imgs", tree_sizes)
    (path.parent / "imgs" / "c1" / "dup.png").write_bytes(tree["c0"][0])  # a duplicate gets no copies
    summary, items, meta, quarantine = run_ingest(path)

    def rows(table: pa.Table, split: str) -> list[dict]:
        return [r for r in table.to_pylist() if r[C.SPLIT] == split]

    assert rows(items, C.TEST) == rows(base, C.TEST)
    originals = {r[C.ITEM_ID]: r for r in rows(base, C.TRAIN)}
    train = {r[C.ITEM_ID]: r for r in rows(items, C.TRAIN)}
    assert len(train) == 4 * len(originals) and quarantine[C.PATH].to_pylist() == ["imgs/c1/dup.png"]
    for item_id, orig in originals.items():
        image = np.frombuffer(orig[C.PIXELS], np.uint8).reshape(6, 6, 3)
        assert image.std() > 0 and train[item_id] == orig
        for deg in (90, 180, 270):
            copy = train[f"{item_id}@rot{deg}"]
            assert copy[C.LABEL] == f"{orig[C.LABEL]}@rot{deg}" and copy[C.SOURCE] == f"{orig[C.SOURCE]}@rot{deg}"
            assert not copy[C.IS_QUERY] and not copy[C.IS_GALLERY]
            want = np.rot90(image, deg // 90)  # counter-clockwise, as PIL's rotate(deg)
            assert np.array_equal(np.frombuffer(copy[C.PIXELS], np.uint8).reshape(6, 6, 3), want)
    n_classes = len(classes_of(base, C.TRAIN))
    assert summary["classes"] == {C.TRAIN: 4 * n_classes, C.TEST: len(classes_of(base, C.TEST))}
    assert summary["rotated_copies"] == 3 * len(originals)
    assert summary["images"][C.TRAIN] == 4 * len(originals)
    assert meta["params"]["train_rotations"] == [90, 180, 270]


def test_train_rotations_match_pil_rotate(make_project):
    path = folder_project(make_project, {"root": "imgs"}, **{"ingest.image_size": 6, "ingest.train_rotations": [90]})
    tree = write_tree(path.parent / "imgs", {f"c{i}": 2 for i in range(6)})
    _, items, _, _ = run_ingest(path)
    label = next(l for l in sorted(classes_of(items, C.TRAIN)) if "@rot" not in l)
    row = items[C.SOURCE].to_pylist().index(f"imgs/{label}/img001.png@rot90")  # a 6×6 image
    with Image.open(io.BytesIO(tree[label][1])) as img:
        want = np.asarray(img.convert("L").rotate(90)).ravel()
    assert np.array_equal(C.pixels_numpy(items[C.PIXELS])[row], want)


def test_train_rotations_refuse_labels_that_look_rotated(make_project):
    path = folder_project(make_project, {"root": "imgs"}, **{"ingest.train_rotations": [180]})
    write_tree(path.parent / "imgs", {"a": 2, "b": 2, "c": 2, "d@rot180": 2})
    with pytest.raises(DatasetError, match=r"label 'd@rot180' looks like a rotated copy's"):
        run_ingest(path)


def test_a_split_emptied_by_duplicates_says_which_files_went_and_why(make_project):
    """The same images as train and test under other class names (a common mistake): every train
    file is a duplicate of a test one (test rows come first, so no test image is ever trained on).
    The error says how many files went, why, with examples; no output is written."""
    path = folder_project(make_project, {"train_root": "a", "test_root": "b"})
    tree = write_tree(path.parent / "a", {f"c{i}": 3 for i in range(4)})
    for label, images in tree.items():
        (path.parent / "b" / f"test-{label}").mkdir(parents=True)
        for i, data in enumerate(images):
            (path.parent / "b" / f"test-{label}" / f"img{i:03d}.png").write_bytes(data)
    with pytest.raises(DatasetError, match=r"train split has no image: nothing to train on.*12 files were skipped \(12 duplicate\), "
                       r"e\.g\. a/c0/img000\.png: duplicate of b/test-c0/img000\.png \(labelled 'test-c0' there, 'c0' here\); "):
        run_ingest(path)
    _assert_no_outputs(path)


def test_train_and_test_roots_sharing_class_folders_are_refused(make_project):
    """train_root and test_root with the same class folders: the test classes would have been seen
    in training. The error names them (no output), unless ingest.shared_classes: allow."""
    path = folder_project(make_project, {"train_root": "a", "test_root": "b"})
    write_tree(path.parent / "a", {f"c{i}": 3 for i in range(4)})
    write_tree(path.parent / "b", {"c0": 2, "c1": 2, "x": 2}, seed=1)
    with pytest.raises(DatasetError, match=r"puts 2 classes in both train and test \(e\.g\. 'c0', 'c1'\)"):
        run_ingest(path)
    _assert_no_outputs(path)
    allowed = folder_project(make_project, {"train_root": "a", "test_root": "b"}, name="allowed",
                             **{"ingest.shared_classes": "allow"})
    for side in ("a", "b"):
        shutil.copytree(path.parent / side, allowed.parent / side)
    summary = run_ingest(allowed)[0]
    assert summary["classes_in_both_splits"] == 2 and summary["classes"] == {C.TRAIN: 4, C.TEST: 3}
