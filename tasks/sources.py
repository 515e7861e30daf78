"""Image sources: where raw images come from, and how one image is decoded.

A source yields :class:`Record` s — the encoded bytes of one image (or, for a file, where to read
them: see :func:`load`), its label, and its split when the source has an official one — and
:class:`Rejected` for what it cannot use, with the reason. Every source goes through the same
decoder (:func:`decode`), so the bundled digits and a user's JPEG tree are treated alike.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import ExifTags, Image, ImageOps

IMAGE_SUFFIXES = frozenset({
    ".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".avif",
    ".pbm", ".pgm", ".ppm", ".pnm",  # Netpbm: what many scientific and older benchmark sets use
})
# Decompression-bomb guard: PIL warns at ~89 Mpx and raises at twice that; we refuse at the warning.
MAX_PIXELS = 89_478_485


@dataclass(frozen=True, slots=True)  # slots: ingest holds a million of these (without bytes)
class Record:
    """One raw image: ``source`` is where it came from (for reports), ``data`` its encoded bytes,
    or None for a file not read yet (``origin``; see :func:`load`): listing a million files is
    cheap, reading them is work ingest spreads across cores (each file read once, to decode).

    ``query`` / ``gallery`` are set by sources with their own retrieval protocol (In-shop, a
    manifest's columns); ``None`` means the default: every test item is both (leave-one-out).
    ``origin`` (a file, or the zip holding ``member``) lets ingest drop ``data`` and have a decode
    worker read the bytes (again, for zip members); sources that make images in memory leave it None.
    """

    source: str
    label: str
    split: str | None
    data: bytes | None
    query: bool | None = None
    gallery: bool | None = None
    origin: str | None = None
    member: str | None = None
    pixel_id: str | None = None  # images made in memory: the id of their pixels (:func:`pixel_id`)

    @property
    def item_id(self) -> str:
        """Stable id: a content hash, so the same image gets the same id in every dataset drop —
        of a file's bytes, or of the pixels of an image made in memory (whose PNG bytes would
        change with Pillow's zlib, and every id with them)."""
        if self.pixel_id is not None:
            return self.pixel_id
        if self.data is None:
            raise ValueError(f"{self.source}: not read yet (sources.load)")
        return content_id(self.data)


def content_id(data: bytes) -> str:
    """16 hex digits of blake2b over the encoded bytes (the ITEMS item_id)."""
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def pixel_id(pixels: np.ndarray) -> str:
    """The ITEMS item_id of an image made in memory: blake2b of its uint8 pixels and shape."""
    return content_id(np.ascontiguousarray(pixels, np.uint8).tobytes() + repr(pixels.shape).encode())


@dataclass(frozen=True)
class Rejected:
    """A file that is not ingested, and why (written to the quarantine report).

    ``kind`` is the short category the stage's summary counts ("5 corrupt, 2 duplicate"); the
    reason says the rest. Without one, the category is the reason up to its first colon.
    """

    source: str
    reason: str
    kind: str = ""

    @property
    def category(self) -> str:
        return self.kind or self.reason.split(":")[0]


def display(name: str) -> str:
    """A file name fit for a report (valid UTF-8): bytes that are not UTF-8, which ``os.walk``
    hands over as lone surrogates (surrogateescape), are shown as ``\\xNN`` escapes."""
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that did not come from surrogateescape
        return name.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def digits() -> Iterator[Record]:
    """scikit-learn's bundled digits (1,797 8×8 images, 10 classes), as 8-bit PNGs.

    Values 0..16 are scaled to 0..255; encoding to PNG keeps a single decode path for all sources.
    """
    from sklearn.datasets import load_digits

    data = load_digits()
    pixels = np.clip(np.rint(data.images * (255 / 16)), 0, 255).astype(np.uint8)
    for i, (img, target) in enumerate(zip(pixels, data.target)):
        buf = io.BytesIO()
        Image.fromarray(img, mode="L").save(buf, format="PNG")
        yield Record(source=f"digits/{i:04d}", label=str(int(target)), split=None, data=buf.getvalue(), pixel_id=pixel_id(img))


def _read_file(path: str) -> bytes:
    """A file's bytes with three system calls: a third of the per-file cost of ``open().read()``,
    which matters when decoding a small JPEG costs only ~60 µs (ingest reads every file here)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        parts = [os.read(fd, size + 1)]  # +1: a short read is EOF, so one call when the size held
        if len(parts[0]) != size:  # grew or shrank since fstat: read on to EOF
            while part := os.read(fd, 1 << 20):
                parts.append(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)
    finally:
        os.close(fd)


def image_folder(root: Path, split: str | None) -> Iterator[Record | Rejected]:
    """``root/<label>/.../<file>`` with label = the file's folder relative to ``root``.

    ``root`` may be a directory or a ``.zip`` of one; a zip whose entries all sit under a single
    top folder (as the official Omniglot zips do) is read as that folder. Files that are not images
    or sit directly in ``root`` (no label) are yielded as :class:`Rejected`, and so is each folder
    not read: hidden (``.ipynb_checkpoints``, ``.thumbnails``: never a class), unreadable, or a
    symlink back into a folder already read. Symlinked folders are followed (as torchvision's
    ImageFolder does): a class kept elsewhere and linked in is a class.
    """
    if root.is_file() and zipfile.is_zipfile(root):
        yield from _zip_folder(root, split)
        return
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} is neither a directory nor a zip file")
    # Plain strings, not Path objects, and per-folder work done once per folder: at a million
    # files this loop is the part of the first pass that cannot be spread across cores.
    top = str(root)
    errors: list[OSError] = []  # os.walk skips a folder it cannot list; onerror says which
    seen: set[str] = set()  # real paths of the folders read: a link back to one is not followed
    for dirpath, dirnames, filenames in os.walk(top, onerror=errors.append, followlinks=True):
        yield from _unlisted(errors, root, top)
        seen.add(os.path.realpath(dirpath))
        dirnames.sort()  # deterministic order
        for name in list(dirnames):
            sub = os.path.join(dirpath, name)
            if name.startswith("."):
                reason, category = "hidden folder: not read", "hidden"
            elif os.path.islink(sub) and (real := os.path.realpath(sub)) in seen:  # e.g. a link to its parent
                reason, category = f"symlink to a folder already read: {display(real)}", "symlink loop"
            else:
                continue
            dirnames.remove(name)
            yield Rejected(display(f"{root.name}/{os.path.relpath(sub, top)}/"), reason, category)
        folder = os.path.relpath(dirpath, top).replace(os.sep, "/")
        label = "" if folder == "." else folder
        # Names that are not UTF-8 arrive as surrogate escapes: fine for open(), not for Arrow.
        shown, prefix = display(label), display(f"{root.name}/{label}/" if label else f"{root.name}/")
        base = dirpath + os.sep
        for name in sorted(filenames):
            source = prefix + (name if name.isascii() else display(name))
            yield _unusable(source, name, label) or Record(source, shown, split, None, origin=base + name)
    yield from _unlisted(errors, root, top)  # the last folders' errors come after their walk


def _unlisted(errors: list[OSError], root: Path, top: str) -> Iterator[Rejected]:
    """The folders os.walk could not list since last asked (and forget them)."""
    for err in errors:
        yield Rejected(display(f"{root.name}/{os.path.relpath(err.filename, top)}/"),
                       f"unreadable folder: {display(err.strerror or str(err))}", "unreadable")
    errors.clear()


def _zip_folder(root: Path, split: str | None) -> Iterator[Record | Rejected]:
    with zipfile.ZipFile(root) as zf:
        infos = sorted((i for i in zf.infolist() if not i.is_dir()), key=lambda i: i.filename)
        # Zips made on macOS carry __MACOSX/ resource forks: not images, and not a top folder.
        for info in infos:
            if info.filename.startswith("__MACOSX/"):
                yield Rejected(f"{root.name}/{info.filename}", "macOS resource fork (__MACOSX/)", "not an image")
        infos = [i for i in infos if not i.filename.startswith("__MACOSX/")]
        tops = {PurePosixPath(i.filename).parts[0] for i in infos}
        strip = 1 if len(tops) == 1 and all(len(PurePosixPath(i.filename).parts) > 1 for i in infos) else 0
        for info in infos:
            parts = PurePosixPath(info.filename).parts[strip:]
            if any(p.startswith(".") for p in parts[:-1]):  # as a folder's hidden subfolders
                yield Rejected(display(f"{root.name}/{info.filename}"), "in a hidden folder: not read", "hidden")
                continue
            yield _member(display(f"{root.name}/{info.filename}"), PurePosixPath(*parts).as_posix(), split, info, str(root))


def suffix(name: str) -> str:
    """``os.path.splitext(name)[1]`` (leading dots are not a suffix), five times faster: the
    first pass calls it once per file."""
    dot = name.rfind(".")
    return name[dot:] if dot > len(name) - len(name.lstrip(".")) else ""


def _unusable(source: str, name: str, label: str) -> Rejected | None:
    """Why a file of an image folder is not an image of a class, or None."""
    ext = suffix(name)
    if ext.lower() not in IMAGE_SUFFIXES:
        return Rejected(source, f"not an image file (suffix {display(ext) or 'none'!r})", "not an image")
    if not label:
        return Rejected(source, "no label: the file is not inside a class folder", "no label")
    return None


def _member(source: str, rel: str, split: str | None, info: zipfile.ZipInfo, origin: str) -> Record | Rejected:
    """A zip member, not read (a decode worker reads it, once: :func:`read_member`), or why it is
    no image of a class. What the zip's directory tells — no image suffix, no class folder, an
    empty or encrypted member — is known here; a damaged one shows when it is read."""
    folder, _, name = rel.rpartition("/")
    rejected = _unusable(source, name, folder)
    if rejected:
        return rejected
    if info.file_size == 0:
        return Rejected(source, "empty file", "empty")
    if info.flag_bits & 0x1:
        return Rejected(source, "unreadable: encrypted zip member", "unreadable")
    return Record(source, display(folder), split, None, origin=origin, member=info.filename)


def read_member(zf: zipfile.ZipFile, member: str, source: str) -> bytes | Rejected:
    """A zip member's bytes, or why there are none (damaged, encrypted, empty)."""
    try:
        data = zf.read(member)
    # A damaged zip member raises BadZipFile/zlib.error, an encrypted one RuntimeError.
    except (OSError, zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError) as err:
        return Rejected(source, f"unreadable: {display(str(err))}", "unreadable")
    return data if data else Rejected(source, "empty file", "empty")


def file_record(
    path: Path, source: str, label: str, split: str | None, query: bool | None = None, gallery: bool | None = None
) -> Record:
    """One listed file (a manifest row, a layout's list entry), not read yet (see :func:`load`)."""
    return Record(source, display(label), split, None, query, gallery, origin=str(path))


def read_file(path: str, source: str) -> bytes | Rejected:
    """The bytes of a listed file, or why there are none: missing, unreadable or empty."""
    try:
        data = _read_file(path)
    except FileNotFoundError:
        return Rejected(source, "missing file", "missing")
    except OSError as err:
        return Rejected(source, f"unreadable: {display(str(err))}", "unreadable")
    return data if data else Rejected(source, "empty file", "empty")


def load(rec: Record) -> Record | Rejected:
    """``rec`` with its bytes read (itself if it has them), or why it cannot be read. (Ingest's
    decode workers read their own, keeping each zip open: tasks.decoding.)"""
    if rec.data is not None or rec.origin is None:
        return rec
    if rec.member is not None:
        with zipfile.ZipFile(rec.origin) as zf:
            data = read_member(zf, rec.member, rec.source)
    else:
        data = read_file(rec.origin, rec.source)
    return data if isinstance(data, Rejected) else dataclasses.replace(rec, data=data)


def _rotated(img: Image.Image) -> bool:
    """Whether the image carries an orientation exif_transpose would apply (EXIF or XMP)."""
    return img.getexif().get(ExifTags.Base.Orientation, 1) != 1 or any(k in img.info for k in ("xmp", "XML:com.adobe.xmp"))


_ADDRESS = re.compile(r" ?<[^<>]* at 0x[0-9a-fA-F]+>")


def _deep_grey(img: Image.Image) -> Image.Image:
    """16/32-bit integer or 32-bit float grey -> 8-bit ``L`` (``LA`` when a grey value means
    transparent), scaled: ``convert("L")`` clips at 255 instead, which leaves a 16-bit image
    nearly white and a 0..1 float image black.

    Integers are 0..65535 (16-bit; PIL opens 16-bit PNGs as 32-bit ``I``), scaled by 1/257.
    Floats are 0..1 (the convention of torchvision and scikit-image), scaled by 255, or 0..255 as
    they are. Any other range is a ValueError: a guessed scale would change what the image shows."""
    raw = np.asarray(img)
    if img.mode == "F":
        if not np.isfinite(raw).all():
            raise ValueError("float image with NaN or infinite values")
        lo, hi = float(raw.min()), float(raw.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"float image with values {lo:g}..{hi:g}: expected 0..1 or 0..255")
        scaled = raw * 255.0 if hi <= 1 else raw
    else:
        lo, hi = int(raw.min()), int(raw.max())
        if lo < 0 or hi > 65535:
            raise ValueError(f"32-bit image with values {lo}..{hi}: expected 0..65535 (16-bit)")
        scaled = raw / 257.0
    grey = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    clear = img.info.get("transparency")  # a grey value that means "transparent"
    if not isinstance(clear, (int, float)):
        return grey
    return Image.merge("LA", (grey, Image.fromarray(np.where(raw == clear, 0, 255).astype(np.uint8), mode="L")))


def decode(data: bytes, size: int, channels: int) -> np.ndarray:
    """Encoded image -> uint8 array (size, size, channels), EXIF-rotated, resized with antialiasing.

    CMYK, palette and 1-bit images are converted by PIL; 16-bit, 32-bit and float grey is scaled
    (not clipped) to 8 bits (:func:`_deep_grey`); transparency (RGBA, LA, palette or grey with a
    transparent colour) is composited on white.

    Raises ValueError with a short reason for anything that is not a decodable image.
    """
    try:
        with warnings.catch_warnings():
            # PIL's warning (its file and line) beside our quarantine reason, "too large", for an
            # image refused anyway. Only around this call: the caller's own filters stay as they are.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(data))
        with opened as img:
            if img.width * img.height > MAX_PIXELS:
                raise ValueError(f"too large ({img.width}x{img.height} px): decompression-bomb limit")
            # JPEG only: let libjpeg scale by 1/2, 1/4 or 1/8 in the DCT while decoding, never
            # below (size, size) — a 4000 px photo for a 64 px table decodes 8× smaller, many
            # times faster; the resize below then finishes from an image at least as large.
            img.draft(None, (size, size))
            img.load()
            if _rotated(img):  # exif_transpose costs as much as the rest when there is nothing to do
                img = ImageOps.exif_transpose(img)
            if img.mode.startswith("I;16") or img.mode in ("I", "F"):
                img = _deep_grey(img)
            if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
                # Transparent pixels hold arbitrary colour (often black): dropping alpha would show
                # it. Composite on white, the background product and character images assume.
                rgba = img.convert("RGBA")
                img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
            mode = "L" if channels == 1 else "RGB"
            if img.mode != mode:  # convert() copies even when there is nothing to convert
                img = img.convert(mode)
            if img.size != (size, size):
                img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
            arr = np.frombuffer(img.tobytes(), np.uint8)  # a third faster than np.asarray(img)
    except Image.DecompressionBombError as err:  # PIL's own guard, at twice our limit
        raise ValueError(f"too large: decompression-bomb limit: {err}") from None
    except (OSError, SyntaxError) as err:
        # PIL names the stream it read ("<_io.BytesIO object at 0x7f..>"): a different address
        # every run would make the quarantine report differ, and DVC see a change, each time.
        raise ValueError(f"corrupt or unsupported image: {_ADDRESS.sub('', str(err))}") from None
    return arr.reshape(size, size, channels)
