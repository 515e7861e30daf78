"""Tests for tasks.sources: image-folder trees and zips, the shared decoder, content ids, digits."""

from __future__ import annotations

import io
import re
import shutil
import struct
import subprocess
import sys
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from tasks import sources
from tasks.sources import Record, Rejected


def encode(arr: np.ndarray, fmt: str = "PNG", mode: str | None = None, **save) -> bytes:
    img = Image.fromarray(arr, mode=mode) if mode else Image.fromarray(arr)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def noise(seed: int, shape=(6, 6, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def palette_png(seed: int) -> bytes:
    img = Image.fromarray(noise(seed, (5, 5, 3))).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def build_tree(root: Path) -> dict[str, str]:
    """A small mixed tree; returns {relative path: expected label or 'REJECT:<reason start>'}."""
    files = {
        "alpha/char01/a.png": (encode(noise(1)), "alpha/char01"),  # RGB PNG
        "alpha/char01/b.JPG": (encode(noise(2, (6, 6)), "JPEG"), "alpha/char01"),  # grayscale JPEG
        "alpha/char02/c.png": (encode(noise(3, (6, 6, 4))), "alpha/char02"),  # RGBA
        "alpha/char02/d.png": (palette_png(4), "alpha/char02"),  # palette
        "beta/e.jpeg": (encode(noise(5), "JPEG"), "beta"),  # RGB JPEG, one level
        "beta/f.png": (encode(noise(6, (4, 7)), mode="L"), "beta"),  # grayscale PNG, non-square
        "beta/notes.txt": (b"hello", "REJECT:not an image file"),
        "beta/README": (b"no suffix", "REJECT:not an image file"),
        "beta/empty.png": (b"", "REJECT:empty file"),
        "loose.png": (encode(noise(7)), "REJECT:no label"),
    }
    for rel, (data, _) in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return {rel: expected for rel, (_, expected) in files.items()}


def loaded(items) -> list[Record | Rejected]:
    """Items with their files read, as ingest's first pass reads them (a directory's files are
    listed unread)."""
    return [sources.load(i) if isinstance(i, Record) else i for i in items]


def outcome(items: list[Record | Rejected], prefix: str) -> dict[str, str]:
    """{relative path: label or 'REJECT:<reason>'} with ``prefix`` stripped from each source."""
    out = {}
    for item in items:
        assert item.source.startswith(prefix), item.source
        rel = item.source[len(prefix) :]
        out[rel] = item.label if isinstance(item, Record) else f"REJECT:{item.reason}"
    return out


def check_outcome(got: dict[str, str], expected: dict[str, str]) -> None:
    assert set(got) == set(expected)
    for rel, want in expected.items():
        assert got[rel].startswith(want), (rel, got[rel], want)


def zip_dir(src: Path, dst: Path, top: str | None) -> Path:
    """Zip the files under ``src``; entries go under ``top/`` (or at the zip's root)."""
    with zipfile.ZipFile(dst, "w") as zf:
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src).as_posix()
            name = f"{top}/{rel}" if top else rel
            if path.is_dir():
                zf.writestr(name + "/", b"")  # explicit directory entries, as `zip -r` writes them
            else:
                zf.writestr(name, path.read_bytes())
    return dst


# ------------------------------------------------------------------------------------ image_folder


def test_image_folder_directory(tmp_path):
    root = tmp_path / "imgs"
    expected = build_tree(root)
    listed = list(sources.image_folder(root, split="train"))
    unread = [r for r in listed if isinstance(r, Record)]
    assert all(r.data is None and r.origin == str(root / r.source[len("imgs/"):]) for r in unread)
    items = loaded(listed)
    check_outcome(outcome(items, "imgs/"), expected)
    records = [r for r in items if isinstance(r, Record)]
    assert len(records) == 6
    assert all(r.split == "train" for r in records)
    assert {r.label for r in records} == {"alpha/char01", "alpha/char02", "beta"}
    by_rel = {r.source[len("imgs/") :]: r for r in records}
    assert by_rel["alpha/char01/a.png"].data == (root / "alpha/char01/a.png").read_bytes()


def test_image_folder_order_is_deterministic(tmp_path):
    root = tmp_path / "imgs"
    build_tree(root)
    first = [i.source for i in sources.image_folder(root, None)]
    assert first == [i.source for i in sources.image_folder(root, None)]
    # records come sorted within each folder and folders in sorted order
    recs = [i.source for i in sources.image_folder(root, None) if isinstance(i, Record)]
    assert recs == sorted(recs)


def test_image_folder_split_none(tmp_path):
    root = tmp_path / "imgs"
    build_tree(root)
    assert all(r.split is None for r in sources.image_folder(root, None) if isinstance(r, Record))


@pytest.mark.parametrize("explicit_dirs", [True, False])
def test_image_folder_zip_with_top_folder_matches_directory(tmp_path, explicit_dirs):
    root = tmp_path / "imgs"
    expected = build_tree(root)
    archive = tmp_path / "imgs.zip"
    if explicit_dirs:
        zip_dir(root, archive, top="imgs")
    else:
        shutil.make_archive(str(tmp_path / "imgs"), "zip", root_dir=tmp_path, base_dir="imgs")
        with zipfile.ZipFile(archive) as zf:
            assert all(n.startswith("imgs/") for n in zf.namelist())

    listed = list(sources.image_folder(archive, split="test"))
    assert all(r.data is None and r.member for r in listed if isinstance(r, Record))  # listed, not read
    zipped = loaded(listed)
    # sources name the zip and the full entry; labels must not contain the top folder
    check_outcome(outcome(zipped, "imgs.zip/imgs/"), expected)
    from_dir = {(r.label, r.item_id) for r in loaded(sources.image_folder(root, "test")) if isinstance(r, Record)}
    from_zip = {(r.label, r.item_id) for r in zipped if isinstance(r, Record)}
    assert from_zip == from_dir and len(from_zip) == 6
    assert all(r.split == "test" for r in zipped if isinstance(r, Record))


def test_image_folder_zip_without_top_folder(tmp_path):
    root = tmp_path / "imgs"
    expected = build_tree(root)
    archive = zip_dir(root, tmp_path / "flat.zip", top=None)  # several top-level entries: no strip
    check_outcome(outcome(list(sources.image_folder(archive, None)), "flat.zip/"), expected)


def test_image_folder_follows_symlinked_class_folders_and_stops_at_loops(tmp_path):
    """A class folder linked in from elsewhere is a class (as in torchvision's ImageFolder); a link
    back to a folder already read is reported, not walked for ever."""
    root, elsewhere = tmp_path / "imgs", tmp_path / "elsewhere" / "kept"
    for folder, seed in ((root / "a", 1), (elsewhere, 2)):
        folder.mkdir(parents=True)
        for i in range(2):
            (folder / f"{i}.png").write_bytes(encode(noise(seed * 10 + i)))
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)
    (root / "a" / "up").symlink_to(root, target_is_directory=True)
    items = list(sources.image_folder(root, None))
    assert sorted((r.label, r.source) for r in items if isinstance(r, Record)) == [
        ("a", "imgs/a/0.png"), ("a", "imgs/a/1.png"), ("linked", "imgs/linked/0.png"), ("linked", "imgs/linked/1.png")]
    assert [(r.source, r.category) for r in items if isinstance(r, Rejected)] == [("imgs/a/up/", "symlink loop")]


def test_image_folder_reports_hidden_and_unreadable_folders(tmp_path, monkeypatch):
    """``.ipynb_checkpoints`` and the like are not classes; a folder that cannot be listed is
    reported (os.walk alone skips both silently: their images would vanish from every count)."""
    import os

    root = tmp_path / "imgs"
    for folder in ("a", "a/.ipynb_checkpoints", ".thumbnails", "locked"):
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "x.png").write_bytes(encode(noise(len(folder))))
    scandir = os.scandir

    def refusing(path="."):  # root may read any folder: refuse one the way a mode of 000 would
        if str(path).endswith("locked"):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    items = list(sources.image_folder(root, None))
    assert [r.source for r in items if isinstance(r, Record)] == ["imgs/a/x.png"]
    assert sorted((r.source, r.reason) for r in items if isinstance(r, Rejected)) == [
        ("imgs/.thumbnails/", "hidden folder: not read"), ("imgs/a/.ipynb_checkpoints/", "hidden folder: not read"),
        ("imgs/locked/", "unreadable folder: Permission denied")]
    monkeypatch.undo()
    archive = zip_dir(root, tmp_path / "imgs.zip", top="imgs")
    zipped = list(sources.image_folder(archive, None))
    assert sorted(r.label for r in zipped if isinstance(r, Record)) == ["a", "locked"]
    assert sorted((r.source, r.category) for r in zipped if isinstance(r, Rejected)) == [
        ("imgs.zip/imgs/.thumbnails/x.png", "hidden"), ("imgs.zip/imgs/a/.ipynb_checkpoints/x.png", "hidden")]


def test_image_folder_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a directory nor a zip"):
        list(sources.image_folder(tmp_path / "absent", None))
    not_zip = tmp_path / "data.zip"
    not_zip.write_bytes(b"not a zip")
    with pytest.raises(FileNotFoundError):
        list(sources.image_folder(not_zip, None))


def _corrupt_zip(path: Path, how: str) -> None:
    """top/a/bad.png + top/a/good.png, bad.png spoilt: a flipped data byte (CRC error) or flagged
    as encrypted in the central directory (zipfile then refuses to read it without a password)."""
    good, bad = encode(noise(1)), encode(noise(2))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("top/a/good.png", good)
        zf.writestr("top/a/bad.png", bad)
    raw = bytearray(path.read_bytes())
    if how == "crc":
        at = raw.find(bad[40:56])  # inside the stored bytes of bad.png
        assert at > 0
        raw[at] ^= 0xFF
    else:
        central = raw.find(b"PK\x01\x02")
        while raw[central + 46 : central + 46 + 13] != b"top/a/bad.png":
            central = raw.find(b"PK\x01\x02", central + 4)
        raw[central + 8] |= 0x01  # general-purpose flag bit 0: encrypted
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("how", ["crc", "encrypted"])
def test_image_folder_zip_bad_member_is_rejected(tmp_path, how):
    archive = tmp_path / "imgs.zip"
    _corrupt_zip(archive, how)
    items = loaded(sources.image_folder(archive, None))  # encrypted: known from the listing; bad CRC: on reading
    assert [type(i) for i in items] == [Rejected, Record]  # sorted: bad.png, good.png
    assert items[0].source == "imgs.zip/top/a/bad.png"
    assert items[1].label == "a"


# ------------------------------------------------------------------------------------------ Record


def test_item_id_is_content_hash():
    data = encode(noise(1))
    a = Record(source="x/a.png", label="a", split=None, data=data)
    b = Record(source="y/other.png", label="b", split="train", data=bytes(data))
    c = Record(source="x/a.png", label="a", split=None, data=encode(noise(2)))
    assert a.item_id == b.item_id  # same bytes, whatever the name, label or split
    assert a.item_id != c.item_id
    assert len(a.item_id) == 16 and int(a.item_id, 16) >= 0


def test_item_id_stable_value():
    # a fixed value: ids must not change between releases (they key every artifact)
    assert Record("s", "l", None, b"tripletflow").item_id == "7d087a5c6da01a4b"  # blake2b, 8 bytes


# ------------------------------------------------------------------------------------------ decode


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [4, 8, 13])
def test_decode_shape_and_dtype(channels, size):
    out = sources.decode(encode(noise(0, (6, 10, 3))), size, channels)
    assert out.shape == (size, size, channels)
    assert out.dtype == np.uint8


def test_decode_same_size_is_exact():
    arr = noise(0, (5, 5, 3))
    assert np.array_equal(sources.decode(encode(arr), 5, 3), arr)
    gray = noise(1, (5, 5))
    assert np.array_equal(sources.decode(encode(gray, mode="L"), 5, 1)[..., 0], gray)


def test_decode_gray_to_rgb_and_rgb_to_gray():
    gray = noise(1, (5, 5))
    rgb = sources.decode(encode(gray, mode="L"), 5, 3)
    assert np.array_equal(rgb[..., 0], gray) and np.array_equal(rgb[..., 1], gray)
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    assert np.all(sources.decode(encode(red), 4, 1) == 76)  # ITU-R 601 luma: 0.299 * 255


def test_decode_resize_constant_and_structure():
    assert np.all(sources.decode(encode(np.full((3, 7), 200, np.uint8), mode="L"), 9, 1) == 200)
    top_white = np.zeros((16, 16), np.uint8)
    top_white[:8] = 255
    out = sources.decode(encode(top_white, mode="L"), 4, 1)[..., 0]
    assert np.all(out[:2] > 200) and np.all(out[2:] < 55)


def test_decode_rgba_and_palette():
    rgba = noise(3, (5, 5, 4))
    alpha = rgba[..., 3:].astype(float) / 255
    on_white = rgba[..., :3] * alpha + 255 * (1 - alpha)  # composited on white, not alpha dropped
    assert np.abs(sources.decode(encode(rgba), 5, 3).astype(float) - on_white).max() <= 1
    clear = rgba.copy()
    clear[..., 3] = 0  # fully transparent: white whatever colour the pixels hold
    assert np.all(sources.decode(encode(clear), 5, 1) == 255)
    data = palette_png(4)
    with Image.open(io.BytesIO(data)) as img:
        want = np.asarray(img.convert("RGB"))
    assert np.array_equal(sources.decode(data, 5, 3), want)


def test_image_suffixes_are_what_pillow_opens():
    from PIL import Image as PILImage

    PILImage.init()
    assert sources.IMAGE_SUFFIXES <= set(PILImage.EXTENSION)  # none we list but cannot open
    assert {".jfif", ".pgm", ".ppm", ".avif"} <= sources.IMAGE_SUFFIXES


@pytest.mark.parametrize("fmt", ["JPEG", "BMP", "GIF", "WEBP", "TIFF", "PPM",
                                 pytest.param("AVIF", marks=pytest.mark.skipif(not features.check("avif"), reason="Pillow without AVIF"))])
def test_decode_other_formats(fmt):
    arr = np.full((6, 6, 3), (40, 120, 200), np.uint8)
    out = sources.decode(encode(arr, fmt), 6, 3)
    assert out.shape == (6, 6, 3)
    assert np.abs(out.astype(int) - (40, 120, 200)).max() <= 12


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"definitely not an image",
        encode(noise(0))[:30],  # header only
        encode(noise(0, (32, 32, 3)), "JPEG")[:200],  # truncated JPEG
        encode(noise(0, (32, 32, 3)), "JPEG")[:-10],
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 50,
    ],
    ids=["empty", "text", "png-header", "jpeg-200b", "jpeg-minus-10b", "png-magic-zeros"],
)
def test_decode_corrupt_raises_value_error(data):
    with pytest.raises(ValueError, match="corrupt or unsupported image") as info:
        sources.decode(data, 8, 1)
    assert " at 0x" not in str(info.value)  # no object address: the same reason every run


def test_decode_16bit_grayscale_png_is_scaled():
    arr = np.array([[0, 30000], [60000, 65535]], np.uint16)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    out = sources.decode(buf.getvalue(), 2, 1)[..., 0].astype(int)
    assert np.abs(out - np.rint(arr / 257)).max() <= 1, out


def test_decode_16bit_grayscale_with_a_transparent_value_composites_on_white():
    arr = np.array([[0, 30000], [60000, 0]], np.uint16)  # 0 marked transparent (PNG tRNS)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", transparency=0)
    assert Image.open(io.BytesIO(buf.getvalue())).info["transparency"] == 0
    out = sources.decode(buf.getvalue(), 2, 1)[..., 0].astype(int)
    assert out[0, 0] == out[1, 1] == 255  # white, not black
    assert abs(out[0, 1] - round(30000 / 257)) <= 1 and abs(out[1, 0] - round(60000 / 257)) <= 1


@pytest.mark.parametrize("arr, want", [
    (np.array([[0, 0.5], [1, 0.25]], np.float32), [[0, 128], [255, 64]]),  # 0..1: scaled
    (np.array([[0, 100.0], [255, 7]], np.float32), [[0, 100], [255, 7]]),  # 0..255: as is
    (np.array([[0, 30000], [65535, 257]], np.int32), [[0, 117], [255, 1]]),  # 32-bit holding 16 bits
])
def test_decode_float_and_32bit_tiffs_are_scaled_not_clipped(arr, want):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="TIFF")
    assert Image.open(io.BytesIO(buf.getvalue())).mode in ("F", "I")
    assert sources.decode(buf.getvalue(), 2, 1)[..., 0].tolist() == want


@pytest.mark.parametrize("arr, reason", [
    (np.array([[0, 300.0], [1, 2]], np.float32), "float image with values 0..300: expected 0..1 or 0..255"),
    (np.array([[-1, 0.5], [1, 2]], np.float32), "float image with values -1..2"),
    (np.array([[0, np.nan], [1, 2]], np.float32), "NaN or infinite"),
    (np.array([[0, 70000], [1, 2]], np.int32), "32-bit image with values 0..70000: expected 0..65535"),
])
def test_decode_refuses_deep_images_whose_scale_it_would_guess(arr, reason):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="TIFF")
    with pytest.raises(ValueError, match=re.escape(reason)):
        sources.decode(buf.getvalue(), 2, 1)


def _png_with_size(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims width × height (valid CRC): a decompression bomb's header."""
    data = bytearray(encode(np.zeros((1, 1), np.uint8), mode="L"))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", crc)
    return bytes(data)


@pytest.mark.parametrize("side", [10_000, 20_000])  # above our limit; 20k also above PIL's bomb error
def test_decode_refuses_decompression_bombs(side):
    with pytest.raises(ValueError, match="too large|decompression"):
        sources.decode(_png_with_size(side, side), 8, 1)


def test_a_refused_decompression_bomb_prints_no_pil_warning(tmp_path):
    """The quarantine says "too large"; PIL's DecompressionBombWarning (its path and line in the
    venv) printed beside it, in the stage's and the flow's output, was noise."""
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_with_size(10_000, 9_000))  # 90 Mpx: above the warning, below PIL's error
    code = ("import sys; from pathlib import Path; from tasks import sources\n"
            "try: sources.decode(Path(sys.argv[1]).read_bytes(), 8, 1)\n"
            "except ValueError as err: print(err)")
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code, str(bomb)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], check=True)
    assert proc.stdout.startswith("too large (10000x9000 px)") and "DecompressionBombWarning" not in proc.stderr
    # ... and the caller's own filters are left alone: an error filter set before still fires.
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(ValueError, match=r"^too large \("):  # ours, not the filter's error
            sources.decode(bomb.read_bytes(), 8, 1)
        with pytest.raises(Image.DecompressionBombWarning):
            Image.open(bomb)


def _exif_jpeg(arr: np.ndarray, orientation: int | None) -> bytes:
    img = Image.fromarray(arr)
    buf = io.BytesIO()
    kwargs = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    img.save(buf, format="JPEG", quality=95, **kwargs)
    return buf.getvalue()


def test_decode_honours_exif_orientation():
    # 32 wide × 16 high, left half white, right half black
    arr = np.zeros((16, 32), np.uint8)
    arr[:, :16] = 255
    plain = sources.decode(_exif_jpeg(arr, None), 8, 1)[..., 0]
    assert plain[:, :3].min() > 200 and plain[:, -3:].max() < 55  # left/right as stored

    # Orientation 6: display = stored rotated 90° clockwise, so the left (white) half goes on top.
    rotated = sources.decode(_exif_jpeg(arr, 6), 8, 1)[..., 0]
    assert rotated[:3, :].min() > 200 and rotated[-3:, :].max() < 55

    # Orientation 8: rotated 90° counter-clockwise, so the white half goes to the bottom.
    ccw = sources.decode(_exif_jpeg(arr, 8), 8, 1)[..., 0]
    assert ccw[-3:, :].min() > 200 and ccw[:3, :].max() < 55


@pytest.fixture
def resize_sizes(monkeypatch) -> list[tuple[int, int]]:
    """The size of every image PIL resizes during the test, in order."""
    seen = []
    real = Image.Image.resize

    def spy(self, size, *args, **kwargs):
        seen.append(self.size)
        return real(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    return seen


def test_large_jpeg_is_scaled_while_decoding_and_matches_a_full_decode(resize_sizes):
    """A 256×192 JPEG for a 24 px table is decoded at 1/8 scale by libjpeg (32×24, never below
    24×24), then resized; the pixels stay close to decoding in full and resizing."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:192, 0:256] / 256
    arr = np.stack([255 * xx, 255 * yy, 128 + 0 * xx], -1) + rng.normal(0, 8, (192, 256, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    with Image.open(io.BytesIO(buf.getvalue())) as img:
        full = np.asarray(img.convert("RGB").resize((24, 24), Image.Resampling.BILINEAR, reducing_gap=None)).astype(int)
    resize_sizes.clear()
    got = sources.decode(buf.getvalue(), 24, 3).astype(int)
    assert resize_sizes == [(32, 24)]
    assert np.abs(got - full).mean() < 2.0


def test_exif_transpose_happens_before_resize(resize_sizes):
    """A 4-wide × 2-high image with orientation 6 is 2 × 4 when it reaches the resize."""
    sources.decode(_exif_jpeg(np.zeros((2, 4), np.uint8), 6), 8, 1)
    sources.decode(_exif_jpeg(np.zeros((2, 4), np.uint8), None), 8, 1)
    assert resize_sizes == [(2, 4), (4, 2)]  # PIL sizes are (width, height)


# ------------------------------------------------------------------------------------------ digits


def test_digits():
    from sklearn.datasets import load_digits

    records = list(sources.digits())
    assert len(records) == 1797
    assert sorted({r.label for r in records}) == [str(d) for d in range(10)]
    assert all(r.split is None for r in records)
    assert len({r.source for r in records}) == 1797
    assert len({r.item_id for r in records}) == 1797  # no duplicate images in digits
    data = load_digits()
    for i in (0, 1, 1796):
        assert records[i].label == str(data.target[i])
        px = sources.decode(records[i].data, 8, 1)[..., 0]
        assert np.array_equal(px, np.rint(data.images[i] * 255 / 16).astype(np.uint8))
        # the id is of the pixels, not of the PNG bytes (which Pillow's zlib may compress otherwise)
        assert records[i].item_id == sources.pixel_id(px) != sources.content_id(records[i].data)
    assert records[0].item_id == "14f9d5005b4be4a6"  # fixed: ids key every artifact


def test_macos_resource_forks_in_a_zip_are_rejected_and_do_not_break_top_folder_stripping(tmp_path):
    png = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(png, format="PNG")
    path = tmp_path / "set.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("top/a/x.png", png.getvalue())
        zf.writestr("top/b/y.png", png.getvalue())
        zf.writestr("__MACOSX/top/a/._x.png", b"\x00\x05\x16\x07")
    out = list(sources.image_folder(path, split=None))
    records = [r for r in out if isinstance(r, sources.Record)]
    rejected = [r for r in out if isinstance(r, sources.Rejected)]
    assert sorted(r.label for r in records) == ["a", "b"]
    assert [r.reason for r in rejected] == ["macOS resource fork (__MACOSX/)"]


def test_suffix_is_splitext():
    import os

    names = ["a.png", ".png", "..png", ".a.png", "a.", "a", "...", "", "a.b.JPG", "._x.jpg", "x..", ".."]
    assert [sources.suffix(n) for n in names] == [os.path.splitext(n)[1] for n in names]


def test_read_file_returns_whole_files_or_why_not(tmp_path):
    big = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()  # > one os.read
    (tmp_path / "big").write_bytes(big)
    (tmp_path / "empty").write_bytes(b"")
    assert sources._read_file(str(tmp_path / "big")) == big
    assert sources.read_file(str(tmp_path / "big"), "big") == big
    assert sources.read_file(str(tmp_path / "empty"), "e") == Rejected("e", "empty file", "empty")
    assert sources.read_file(str(tmp_path / "gone"), "g") == Rejected("g", "missing file", "missing")
    assert sources.read_file(str(tmp_path), "d").reason.startswith("unreadable")  # a directory
