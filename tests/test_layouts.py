"""Tests for tasks.layouts: each benchmark's reader on a tiny replica of its real layout, built here."""

from __future__ import annotations

import gzip
import io
import struct
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks import contracts as C
from tasks import ingest, layouts
from tasks.errors import DatasetError
from tasks.params import load_params
from tasks import sources
from tasks.sources import Record, Rejected, load

SMALL = {"ingest.image_size": 8, "ingest.channels": 3, "ingest.workers": 1, "ingest.test_fraction": 0.3}
OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "omniglot"


def jpg(seed: int, size=(6, 5)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def put(root: Path, rel: str, data: bytes) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)


def records(items) -> list[Record]:
    return [r for r in items if isinstance(r, Record)]


def project(make_project, kind: str, root: str = "ds", **extra) -> Path:
    """params.yaml of a project reading layout ``kind`` from ``<project>/<root>``."""
    return make_project({**SMALL, "ingest.source": {"kind": kind, "root": root}, **extra})


def run(path: Path):
    params = load_params(path)
    summary = ingest.run(params.ingest, params.paths)
    items, _ = C.read_table(params.paths["items"], C.ITEMS)
    quarantine, _ = C.read_table(params.paths["quarantine"], C.QUARANTINE)
    return summary, items.drop_columns([C.PIXELS]).to_pylist(), quarantine.to_pylist()


# ---------------------------------------------------------------------------------------- omniglot


def _omniglot_zip(path: Path, top: str, alphabets: dict[str, int], seed: int) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for a, (alphabet, chars) in enumerate(alphabets.items()):
            for c in range(1, chars + 1):
                for d in range(2):
                    zf.writestr(f"{top}/{alphabet}/character{c:02d}/{d}.png", jpg(seed + a * 100 + c * 10 + d))


def test_omniglot_replica_zips_and_download(make_project, tmp_path):
    remote = tmp_path / "remote"
    remote.mkdir()
    _omniglot_zip(remote / "images_background.zip", "images_background", {"Greek": 2, "Latin": 1}, 0)
    _omniglot_zip(remote / "images_evaluation.zip", "images_evaluation", {"Atemayar": 2}, 5000)
    downloads = [
        {"url": (remote / n).as_uri(), "sha256": C.file_digest(remote / n), "file": n}
        for n in ("images_background.zip", "images_evaluation.zip")
    ]
    summary, items, quarantine = run(project(make_project, "omniglot", **{"ingest.source.downloads": downloads}))
    assert summary["classes"] == {"train": 3, "test": 2} and quarantine == []
    assert {(r["split"], r["label"]) for r in items} >= {("train", "Greek/character01"), ("test", "Atemayar/character02")}
    assert all(r["is_query"] == r["is_gallery"] == (r["split"] == "test") for r in items)


def test_omniglot_unpacked_folders(tmp_path):
    for name, seed in (("images_background", 0), ("images_evaluation", 9)):
        put(tmp_path, f"{name}/Greek/character01/a.png", jpg(seed))
    got = [(r.split, r.label) for r in records(layouts.omniglot(tmp_path))]
    assert got == [("train", "Greek/character01"), ("test", "Greek/character01")]


@pytest.mark.skipif(not (OMNIGLOT / "images_evaluation.zip").exists(), reason=f"no Omniglot at {OMNIGLOT}")
def test_omniglot_real_zips_read_with_the_official_split():
    items = list(layouts.omniglot(OMNIGLOT))
    recs = records(items)
    assert len(items) == len(recs) == 19_280 + 13_180
    classes = Counter((r.split, r.label) for r in recs)
    assert Counter(s for s, _ in classes) == {"train": 964, "test": 659}
    assert set(classes.values()) == {20}  # 20 drawers per character


# ---------------------------------------------------------------------------------- CUB-200-2011


def test_cub200_official_class_split(tmp_path):
    root = tmp_path / "CUB_200_2011"  # the archive's top folder; the reader accepts its parent
    lines, labels = [], []
    for n, cls in enumerate([1, 1, 100, 100, 101, 101, 200, 200], start=1):
        rel = f"{cls:03d}.Bird_{cls}/Bird_{n}.jpg"
        put(root / "images", rel, jpg(n))
        lines.append(f"{n} {rel}")
        labels.append(f"{n} {cls}")
    lines.append("9 200.Bird_200/gone.jpg")  # listed, not on disk
    labels.append("9 200")
    lines.append("10 200.Bird_200/unlabelled.jpg")
    (root / "images.txt").write_text("\n".join(lines) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    items = [load(r) if isinstance(r, Record) else r for r in layouts.cub200(tmp_path)]  # as ingest reads them
    got = Counter((r.split, r.label) for r in records(items))
    assert got == {("train", "001"): 2, ("train", "100"): 2, ("test", "101"): 2, ("test", "200"): 2}
    assert [(r.source, r.kind) for r in items if isinstance(r, Rejected)] == [
        ("images/200.Bird_200/gone.jpg", "missing"), ("images/200.Bird_200/unlabelled.jpg", "no label"),
    ]


def test_cub200_malformed_list_is_dataset_error(tmp_path):
    (tmp_path / "image_class_labels.txt").write_text("1\n")
    (tmp_path / "images.txt").write_text("1 a.jpg\n")
    with pytest.raises(DatasetError, match=r"image_class_labels.txt:1: expected 2 fields"):
        list(layouts.cub200(tmp_path))
    with pytest.raises(DatasetError, match="missing"):
        list(layouts.cub200(tmp_path / "nowhere"))
    (tmp_path / "image_class_labels.txt").write_text("1 1\n2 abc\n")
    with pytest.raises(DatasetError, match=r"image_class_labels.txt:2: class id 'abc' is not a whole number"):
        list(layouts.cub200(tmp_path))
    (tmp_path / "image_class_labels.txt").write_bytes(b"1 1\n2 \xff\n")
    with pytest.raises(DatasetError, match=r"image_class_labels.txt:2: not UTF-8 text"):
        list(layouts.cub200(tmp_path))


# ---------------------------------------------------------------------------------------- Cars196


def test_cars196_mat_annotations(tmp_path):
    from scipy.io import savemat

    rows = []
    for n, cls in enumerate([1, 1, 98, 98, 99, 99, 196, 196], start=1):
        rel = f"car_ims/{n:06d}.jpg"
        put(tmp_path, rel, jpg(n))
        rows.append((rel, cls, n % 2, 1, 2, 3, 4))  # the 'test' flag is the classification split: ignored
    dtype = [(k, object) for k in ("relative_im_path", "class", "test", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2")]
    savemat(tmp_path / "cars_annos.mat", {"annotations": np.array(rows, dtype=dtype), "class_names": ["a"] * 196})
    got = Counter((r.split, r.label) for r in records(layouts.cars196(tmp_path)))
    assert got == {("train", "001"): 2, ("train", "098"): 2, ("test", "099"): 2, ("test", "196"): 2}


def test_cars196_without_annotations(tmp_path):
    from scipy.io import savemat

    savemat(tmp_path / "cars_annos.mat", {"something": [1, 2]})
    with pytest.raises(DatasetError, match="annotations"):
        list(layouts.cars196(tmp_path))
    (tmp_path / "cars_annos.mat").write_bytes(b"not a MATLAB file at all" * 10)
    with pytest.raises(DatasetError, match="cars_annos.mat: no readable annotations"):
        list(layouts.cars196(tmp_path))
    (tmp_path / "cars_annos.mat").unlink()
    with pytest.raises(DatasetError, match=r"cars_annos.mat: missing .*no devkit layout"):
        list(layouts.cars196(tmp_path))


@pytest.mark.parametrize("top", ["", "stanford_cars"])
def test_cars196_devkit_layout_pooled_and_split_by_class(tmp_path, top):
    """The layout torchvision's StanfordCars reads (the mirrors ship it): train and test
    annotations pooled, then the metric-learning split by class."""
    from scipy.io import savemat

    root = tmp_path / top
    dtype = [(k, object) for k in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    for part, mat, classes in (("cars_train", "devkit/cars_train_annos.mat", [1, 99, 196]),
                               ("cars_test", "cars_test_annos_withlabels.mat", [1, 98, 99])):
        rows = []
        for n, cls in enumerate(classes, start=1):
            put(root, f"{part}/{n:05d}.jpg", jpg(cls * 10 + n + len(part)))
            rows.append((1, 2, 3, 4, cls, f"{n:05d}.jpg"))
        (root / mat).parent.mkdir(parents=True, exist_ok=True)
        savemat(root / mat, {"annotations": np.array(rows, dtype=dtype)})
    got = Counter((r.split, r.label, r.source.split("/")[0]) for r in records(layouts.cars196(tmp_path)))
    assert got == {("train", "001", "cars_train"): 1, ("train", "001", "cars_test"): 1, ("train", "098", "cars_test"): 1,
                   ("test", "099", "cars_train"): 1, ("test", "099", "cars_test"): 1, ("test", "196", "cars_train"): 1}
    (root / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(DatasetError, match="needs cars_test_annos_withlabels.mat"):
        list(layouts.cars196(tmp_path))


# ------------------------------------------------------------------------- Stanford Online Products


@pytest.mark.parametrize("top", ["", "Stanford_Online_Products"])
def test_sop_train_and_test_lists(tmp_path, top):
    """root is the dataset's folder, or the folder the official zip was unpacked into (it holds
    Stanford_Online_Products/)."""
    data = tmp_path / top
    for name, classes in (("Ebay_train.txt", (1, 2)), ("Ebay_test.txt", (11319, 11320))):
        lines = ["image_id class_id super_class_id path"]
        for cls in classes:
            for i in range(2):
                rel = f"bicycle_final/{cls}_{i}.JPG"
                put(data, rel, jpg(cls * 10 + i))
                lines.append(f"{len(lines)} {cls} 1 {rel}")
        (data / name).write_text("\n".join(lines) + "\n")
    got = Counter((r.split, r.label) for r in records(layouts.sop(tmp_path)))
    assert got == {("train", "1"): 2, ("train", "2"): 2, ("test", "11319"): 2, ("test", "11320"): 2}


# ---------------------------------------------------------------------------------- In-shop Clothes


@pytest.mark.parametrize("official", [False, True])
def test_inshop_separate_query_and_gallery(make_project, official):
    """Flat (list and img/ in root), or as the official download unpacks: Eval/ holds the list,
    Img/img/ the images, the list's paths relative to Img/."""
    path = project(make_project, "inshop")
    root = path.parent / "ds"
    rows = []
    for item in range(1, 7):
        status = ["train"] * 5 if item <= 3 else ["query", "gallery", "gallery"]
        for i, st in enumerate(status):
            rel = f"img/WOMEN/Dresses/id_{item:08d}/{i:02d}_front.jpg"
            put(root / "Img" if official else root, rel, jpg(item * 100 + i))
            rows.append(f"{rel} id_{item:08d} {st}")
    rows.append("img/x.jpg id_9 validation")
    (root / "Eval").mkdir()
    (root / ("Eval" if official else "") / "list_eval_partition.txt").write_text(
        f"{len(rows)}\nimage_name item_id evaluation_status\n" + "\n".join(rows))
    summary, items, quarantine = run(path)
    test = [r for r in items if r["split"] == "test"]
    assert Counter((r["is_query"], r["is_gallery"]) for r in test) == {(True, False): 3, (False, True): 6}
    assert all(not r["is_query"] and not r["is_gallery"] for r in items if r["split"] == "train")
    assert summary["classes"] == {"train": 3, "test": 3}
    assert [q["reason"] for q in quarantine] == ["evaluation_status 'validation' is not train, query or gallery"]


# --------------------------------------------------------------------------- Google Landmarks v2


def _gld(root: Path, with_mapping: bool) -> None:
    def img(split: str, image_id: str, seed: int) -> None:
        put(root, f"{split}/{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg", jpg(seed))

    train = [(f"a{i:03d}", lm) for i, lm in enumerate([7, 7, 8, 8, 9, 9])]
    index = {"b001": "50", "b002": "50", "b003": "51", "b004": "51", "b005": "52"}  # b005: a distractor
    for n, (image_id, _) in enumerate(train):
        img("train", image_id, n)
    for n, image_id in enumerate(index):
        img("index", image_id, 100 + n)
    for n, image_id in enumerate(["c001", "c002", "c003", "c004"]):
        img("test", image_id, 200 + n)
    (root / "train.csv").write_text("id,url,landmark_id\n" + "".join(f"{i},http://x,{lm}\n" for i, lm in train))
    (root / "index.csv").write_text("id\n" + "".join(f"{i}\n" for i in index))
    (root / "test.csv").write_text("id\nc001\nc002\nc003\nc004\n")
    (root / "retrieval_solution_v2.1.csv").write_text(
        "id,images,Usage\nc001,b001 b002,Public\nc002,b003 b004,Private\nc003,None,Ignored\n"
    )  # c004 has no row: no ground truth
    if with_mapping:
        (root / "index_image_to_landmark.csv").write_text("id,landmark_id\n" + "".join(f"{i},{lm}\n" for i, lm in index.items()))


@pytest.mark.parametrize("with_mapping", [True, False])
def test_gldv2_retrieval_protocol(tmp_path, with_mapping):
    _gld(tmp_path, with_mapping)
    items = list(layouts.gldv2(tmp_path))
    recs = {r.source.rsplit("/", 1)[1][:4]: r for r in records(items)}
    assert [r.kind for r in items if isinstance(r, Rejected)] == ["no label"]  # c004
    assert {k for k, r in recs.items() if r.split == "train"} == {f"a{i:03d}" for i in range(6)}
    assert all((r.query, r.gallery) == (False, True) for k, r in recs.items() if k.startswith("b"))
    assert all((r.query, r.gallery) == (True, False) for k, r in recs.items() if k.startswith("c"))
    # a query shares its label with exactly its relevant gallery images
    assert recs["c001"].label == recs["b001"].label == recs["b002"].label != recs["b003"].label
    assert recs["c002"].label == recs["b003"].label == recs["b004"].label
    gallery_labels = {r.label for k, r in recs.items() if k.startswith("b")}
    assert recs["c003"].label == layouts.NO_LANDMARK and layouts.NO_LANDMARK not in gallery_labels
    assert recs["b005"].label not in {recs["c001"].label, recs["c002"].label}
    if with_mapping:
        assert recs["c001"].label == "index-landmark/50"


def test_gldv2_index_landmark_ids_are_not_train_landmark_ids(make_project):
    """The index's landmark ids are another numbering than train.csv's (GLDv2 README): index
    landmark 7 is not train landmark 7, so no class is in both splits."""
    path = project(make_project, "gldv2")
    _gld(path.parent / "ds", with_mapping=True)
    mapping = path.parent / "ds" / "index_image_to_landmark.csv"
    mapping.write_text(mapping.read_text().replace(",50\n", ",7\n"))  # train.csv has landmark 7 too
    summary, items, _ = run(path)
    assert summary["classes_in_both_splits"] == 0
    assert {r["split"] for r in items if r["label"] == "7"} == {"train"}
    assert {r["split"] for r in items if r["label"] == "index-landmark/7"} == {"test"}


def test_gldv2_needs_its_solution(tmp_path):
    with pytest.raises(DatasetError, match="retrieval_solution"):
        list(layouts.gldv2(tmp_path))
    _gld(tmp_path, with_mapping=False)
    (tmp_path / "train.csv").write_text("ID,url,landmark_id\na000,http://x,7\n")  # a column misnamed
    with pytest.raises(DatasetError, match=r"train.csv: no column \['id'\]"):
        list(layouts.gldv2(tmp_path))


# ----------------------------------------------------------------------------------- Fashion-MNIST


def _idx_bytes(arr: np.ndarray) -> bytes:
    magic = 0x800 | arr.ndim
    return struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def write_fashion(root: Path, per_class: int = 2, gz: bool = True) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for part, n in (("train", per_class), ("t10k", 1)):
        labels = np.repeat(np.arange(10), n)
        images = rng.integers(0, 256, (len(labels), 28, 28), dtype=np.uint8)
        for stem, arr in ((f"{part}-images-idx3-ubyte", images), (f"{part}-labels-idx1-ubyte", labels)):
            data = _idx_bytes(arr)
            (root / (stem + (".gz" if gz else ""))).write_bytes(gzip.compress(data) if gz else data)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx(tmp_path, gz):
    write_fashion(tmp_path, gz=gz)
    recs = records(layouts.fashion_mnist(tmp_path))
    assert len(recs) == 30 and Counter(r.label for r in recs) == {c: 3 for c in layouts.FASHION_CLASSES}
    assert all(r.split is None for r in recs)
    with Image.open(io.BytesIO(recs[0].data)) as img:
        assert img.size == (28, 28) and img.mode == "L"
        assert recs[0].item_id == sources.pixel_id(np.asarray(img))  # of the pixels, not the PNG bytes


def test_fashion_mnist_class_disjoint_split(make_project):
    path = make_project({**SMALL, "ingest.source": {"kind": "fashion_mnist", "root": "fm"}})
    write_fashion(path.parent / "fm")
    params = load_params(path)
    summary = ingest.run(params.ingest, params.paths)
    assert summary["classes"] == {"train": 7, "test": 3} and summary["ingested"] == 30


def test_fashion_mnist_bad_idx(tmp_path):
    write_fashion(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01")
    with pytest.raises(DatasetError, match="not an IDX file"):
        list(layouts.fashion_mnist(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00")  # cut inside the header
    with pytest.raises(DatasetError, match="header is cut"):
        list(layouts.fashion_mnist(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match="neither"):
        list(layouts.fashion_mnist(tmp_path))
    write_fashion(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes((tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes()[:-9])
    with pytest.raises(DatasetError, match=r"t10k-labels-idx1-ubyte.gz: not a readable gzip file \(an interrupted download\?\)"):
        list(layouts.fashion_mnist(tmp_path))


FASHION = Path("/usr/share/datasets/fashion-mnist")  # Debian package dataset-fashion-mnist


@pytest.mark.skipif(not (FASHION / "t10k-labels-idx1-ubyte.gz").exists(), reason=f"no Fashion-MNIST at {FASHION}")
def test_fashion_mnist_real_files():
    recs = records(layouts.fashion_mnist(FASHION))
    assert len(recs) == 70_000
    assert Counter(r.label for r in recs) == {c: 7_000 for c in layouts.FASHION_CLASSES}


def test_omniglot_missing_names_the_zip_it_expects(tmp_path):
    with pytest.raises(DatasetError, match=r"neither .*images_background\.zip \(the official zip\) nor the folder"):
        list(layouts.omniglot(tmp_path))
