"""Standard metric-learning benchmarks, read from their published layouts with official protocols.

Each reader takes the dataset's root directory (as unpacked from the official archive) and yields
:class:`~tasks.sources.Record` / :class:`~tasks.sources.Rejected` with the benchmark's own split:

=============== ============================================ ===========================================
kind            files under root                             protocol
=============== ============================================ ===========================================
omniglot        images_background.zip, images_evaluation.zip background = train, evaluation = test
                (or the unpacked folders)                    (label = alphabet/character)
cub200          images.txt, image_class_labels.txt, images/  classes 1–100 train, 101–200 test
cars196         cars_annos.mat, car_ims/ (or the devkit's       classes 1–98 train, 99–196 test
                cars_{train,test}/ + their annotation .mat)
sop             [Stanford_Online_Products/]Ebay_train.txt,   the two lists; label = class_id
                Ebay_test.txt
inshop          [Eval/]list_eval_partition.txt, [Img/]img/   train / query / gallery: query and gallery
                                                             are separate sets (label = item_id)
gldv2           train.csv, index.csv, test.csv,              train = train; index = gallery; test =
                retrieval_solution*.csv, {split}/a/b/c/*.jpg queries, labelled from the solution
fashion_mnist   {train,t10k}-{images-idx3,labels-idx1}-ubyte no official open-set split: classes split
                (.gz or not)                                 by ``ingest.test_fraction``
=============== ============================================ ===========================================

Test items are query and gallery (leave-one-out) unless the protocol separates them (In-shop,
GLDv2). Listed files that are missing or empty are Rejected, not errors; a list file that is
missing or malformed is a :class:`DatasetError` naming it.
"""

from __future__ import annotations

import csv
import gzip
import io
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from tasks.errors import DatasetError
from tasks.sources import Record, Rejected, file_record, image_folder, pixel_id

Item = Record | Rejected
NO_LANDMARK = "__no_landmark__"  # GLDv2 queries whose landmark is in no gallery image


def omniglot(root: Path) -> Iterator[Item]:
    for name, split in (("images_background", "train"), ("images_evaluation", "test")):
        zipped, folder = root / f"{name}.zip", root / name
        if not zipped.exists() and not folder.is_dir():
            raise DatasetError(f"omniglot: neither {zipped} (the official zip) nor the folder {folder} exists")
        yield from image_folder(zipped if zipped.exists() else folder, split)


def _lines(path: Path, skip: int = 0) -> Iterator[tuple[int, list[str]]]:
    """(line number, whitespace-separated fields) of a list file, blank lines skipped."""
    if not path.is_file():
        raise DatasetError(f"{path}: missing (is the dataset's root right?)")
    with open(path, "rb") as f:  # bytes, decoded a line at a time: an error can name its line
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DatasetError(f"{path}:{n}: not UTF-8 text ({err.reason})") from None
            if n > skip and line.strip():
                yield n, line.split()


def _fields(path: Path, n: int, fields: list[str], want: int) -> list[str]:
    if len(fields) < want:
        raise DatasetError(f"{path}:{n}: expected {want} fields, got {fields}")
    return fields


def _split_by_class_id(cls: int, last_train: int) -> str:
    return "train" if cls <= last_train else "test"


def _unpacked(root: Path, top: str, marker: str) -> Path:
    """``root``, or ``root / top`` when ``marker`` is there and not in root: the folder an official
    archive unpacks into (a ``downloads: extract: true`` source, or a user's unzip)."""
    return root / top if not (root / marker).exists() and (root / top / marker).exists() else root


def cub200(root: Path) -> Iterator[Item]:
    root = _unpacked(root, "CUB_200_2011", "images.txt")
    labels, path = {}, root / "image_class_labels.txt"
    for n, f in _lines(path):
        image_id, cls = _fields(path, n, f, 2)[:2]
        if not cls.isdigit():
            raise DatasetError(f"{path}:{n}: class id {cls!r} is not a whole number")
        labels[image_id] = int(cls)
    for n, f in _lines(root / "images.txt"):
        image_id, rel = _fields(root / "images.txt", n, f, 2)[:2]
        if image_id not in labels:
            yield Rejected(f"images/{rel}", "no label in image_class_labels.txt", "no label")
            continue
        cls = labels[image_id]
        yield file_record(root / "images" / rel, f"images/{rel}", f"{cls:03d}", _split_by_class_id(cls, 100))


def cars196(root: Path) -> Iterator[Item]:
    """cars_annos.mat (the full-dataset archive: relative_im_path, class for all 16,185 images), or
    the devkit layout the mirrors ship (torchvision's: cars_train/ + devkit/cars_train_annos.mat,
    cars_test/ + cars_test_annos_withlabels.mat; fname, class), pooled: the metric-learning split
    is by class, not the classification train/test. Read with scipy.io."""
    if not (root / "cars_annos.mat").exists() and (root / "stanford_cars").is_dir():
        root = root / "stanford_cars"  # torchvision's folder
    mat_path, devkit = root / "cars_annos.mat", root / "devkit"
    if mat_path.is_file():
        rows = _mat_rows(mat_path, "relative_im_path", "")
    elif (devkit / "cars_train_annos.mat").is_file():
        test = [p for p in (root / "cars_test_annos_withlabels.mat", devkit / "cars_test_annos_withlabels.mat") if p.is_file()]
        if not test:
            raise DatasetError(f"{root}: the devkit layout needs cars_test_annos_withlabels.mat (the test labels, "
                               "published apart from the devkit) in it or in devkit/")
        rows = _mat_rows(devkit / "cars_train_annos.mat", "fname", "cars_train/") + _mat_rows(test[0], "fname", "cars_test/")
    else:
        raise DatasetError(f"{mat_path}: missing (is the dataset's root right?), and no devkit layout "
                           "(devkit/cars_train_annos.mat) either")
    for rel, cls in rows:
        yield file_record(root / rel, rel, f"{cls:03d}", _split_by_class_id(cls, 98))


def _mat_rows(path: Path, name_field: str, prefix: str) -> list[tuple[str, int]]:
    """(prefix + image path, class) of a Cars196 annotations .mat file."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    try:
        annos = loadmat(path, squeeze_me=True)["annotations"]
        return [(prefix + str(a[name_field]), int(a["class"])) for a in np.atleast_1d(annos)]
    except (KeyError, ValueError, TypeError, OSError, MatReadError) as err:
        raise DatasetError(f"{path}: no readable annotations ({name_field}, class): {err}") from None


def sop(root: Path) -> Iterator[Item]:
    root = _unpacked(root, "Stanford_Online_Products", "Ebay_train.txt")
    for name, split in (("Ebay_train.txt", "train"), ("Ebay_test.txt", "test")):
        for n, f in _lines(root / name, skip=1):  # header: image_id class_id super_class_id path
            _, class_id, _, rel = _fields(root / name, n, f, 4)[:4]
            yield file_record(root / rel, rel, class_id, split)


def inshop(root: Path) -> Iterator[Item]:
    path = root / "list_eval_partition.txt"
    if not path.exists() and (root / "Eval" / path.name).exists():
        path = root / "Eval" / path.name  # the official download keeps it in Eval/
    # The list's paths (img/WOMEN/...) are relative to Img/ in the official download (Img/img.zip
    # unpacks to Img/img/), or to the root when img/ sits there.
    images = root / "Img" if not (root / "img").is_dir() and (root / "Img" / "img").is_dir() else root
    for n, f in _lines(path, skip=2):  # a count, then: image_name item_id evaluation_status
        rel, item, status = _fields(path, n, f, 3)[:3]
        if status == "train":
            yield file_record(images / rel, rel, item, "train")
        elif status in ("query", "gallery"):
            yield file_record(images / rel, rel, item, "test", status == "query", status == "gallery")
        else:
            yield Rejected(rel, f"evaluation_status {status!r} is not train, query or gallery", "bad row")


def _csv(path: Path, columns: tuple[str, ...]) -> Iterator[dict[str, str]]:
    """The rows of a CSV list file that must have ``columns``."""
    if not path.is_file():
        raise DatasetError(f"{path}: missing (is the dataset's root right?)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.DictReader(f)
        try:
            missing = [c for c in columns if c not in (rows.fieldnames or [])]
            if missing:
                raise DatasetError(f"{path}: no column {missing} (has {rows.fieldnames})")
            yield from rows
        except (UnicodeDecodeError, csv.Error) as err:
            raise DatasetError(f"{path}: line {rows.line_num + 1}: not a readable CSV file: {err}") from None


def _gld_file(root: Path, split: str, image_id: str) -> tuple[Path, str]:
    rel = f"{split}/{image_id[0]}/{image_id[1]}/{image_id[2]}/{image_id}.jpg"
    return root / rel, rel


def gldv2(root: Path) -> Iterator[Item]:
    """Google Landmarks v2, retrieval task. Gallery labels come from index_image_to_landmark.csv
    when present; otherwise index images that are relevant to the same query are one class (union
    of the solution's lists) and the others each their own. A query with no relevant image ("None")
    stays a query, labelled :data:`NO_LANDMARK`, which no gallery item has."""
    solutions = sorted(root.glob("retrieval_solution*.csv"))
    if not solutions:
        raise DatasetError(f"{root}: no retrieval_solution*.csv")
    relevant = {}
    for row in _csv(solutions[-1], ("id", "images")):
        ids = (row.get("images") or "").split()
        relevant[row["id"]] = [] if ids in ([], ["None"]) else ids
    parent: dict[str, str] = {}  # union-find over index ids

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for ids in relevant.values():
        for other in ids[1:]:
            a, b = find(ids[0]), find(other)
            parent[max(a, b)] = min(a, b)
    mapping = root / "index_image_to_landmark.csv"
    landmark = {r["id"]: r["landmark_id"] for r in _csv(mapping, ("id", "landmark_id"))} if mapping.exists() else None

    def gallery_label(image_id: str) -> str:
        if landmark is not None:
            # The index's landmark ids are not train.csv's (GLDv2 README, "Download index set":
            # "the integer landmark id's mentioned here are different from the ones in the train
            # set"): a namespace of their own, or index landmark 7 would merge with train's 7.
            return f"index-landmark/{landmark[image_id]}" if image_id in landmark else f"index/{image_id}"
        return f"group/{find(image_id)}" if image_id in parent else f"index/{image_id}"

    for row in _csv(root / "train.csv", ("id", "landmark_id")):
        path, rel = _gld_file(root, "train", row["id"])
        yield file_record(path, rel, row["landmark_id"], "train")
    for row in _csv(root / "index.csv", ("id",)):
        path, rel = _gld_file(root, "index", row["id"])
        yield file_record(path, rel, gallery_label(row["id"]), "test", False, True)
    for row in _csv(root / "test.csv", ("id",)):
        path, rel = _gld_file(root, "test", row["id"])
        if row["id"] not in relevant:
            yield Rejected(rel, f"not in {solutions[-1].name}: no ground truth", "no label")
            continue
        ids = relevant[row["id"]]
        yield file_record(path, rel, gallery_label(ids[0]) if ids else NO_LANDMARK, "test", True, False)


FASHION_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def _idx(root: Path, stem: str, magic: int) -> tuple[np.ndarray, str]:
    for name in (stem, f"{stem}.gz"):
        path = root / name
        if path.is_file():
            try:
                raw = (gzip.decompress if name.endswith(".gz") else bytes)(path.read_bytes())
            except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError; EOFError: cut short
                raise DatasetError(f"{path}: not a readable gzip file (an interrupted download?): {err}") from None
            break
    else:
        raise DatasetError(f"{root}: neither {stem} nor {stem}.gz")
    dims = magic & 0xFF
    if len(raw) < 4 + 4 * dims:
        raise DatasetError(f"{path}: not an IDX file of {dims} dims (only {len(raw)} bytes: the header is cut)")
    head = np.frombuffer(raw[: 4 + 4 * dims], ">u4")
    shape = tuple(int(d) for d in head[1:])
    if int(head[0]) != magic or len(raw) != 4 + 4 * dims + int(np.prod(shape)):
        raise DatasetError(f"{path}: not an IDX file of {dims} dims (magic {int(head[0]):#x}, {len(raw)} bytes)")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * dims).reshape(shape), name


def fashion_mnist(root: Path) -> Iterator[Item]:
    """70,000 28×28 grey images (train + t10k pooled), 10 classes; PNG-encoded in memory so they
    take the decoder every other source takes."""
    for part in ("train", "t10k"):
        images, name = _idx(root, f"{part}-images-idx3-ubyte", 0x803)
        labels, _ = _idx(root, f"{part}-labels-idx1-ubyte", 0x801)
        if len(images) != len(labels):
            raise DatasetError(f"{root}: {len(images)} {part} images but {len(labels)} labels")
        for i, (img, label) in enumerate(zip(images, labels)):
            if label >= len(FASHION_CLASSES):
                yield Rejected(f"{name}[{i}]", f"label {label} is not 0..9", "no label")
                continue
            buf = io.BytesIO()
            Image.fromarray(img, mode="L").save(buf, format="PNG", compress_level=1)
            yield Record(f"{name}[{i}]", FASHION_CLASSES[label], None, buf.getvalue(), pixel_id=pixel_id(img))


READERS = {
    "omniglot": omniglot, "cub200": cub200, "cars196": cars196, "sop": sop, "inshop": inshop,
    "gldv2": gldv2, "fashion_mnist": fashion_mnist,
}
