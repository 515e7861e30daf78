"""A retrieval grid's thumbnails, framed, in one RGB image (drawing and captions: tasks.figures).

One matplotlib Axes per thumbnail cost ~20 ms and ~0.4 MB each: 64 queries × 33 thumbnails took
48 s and 0.9 GB. One image made here in numpy is milliseconds, and its size is capped
(``budget`` pixels), so any grid gives a picture of bounded size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FRAME = 3  # px of the coloured frame round each thumbnail
GAP = 6  # px between cells, across and down
TEXT_W = 80  # px a column is at least: ~12 characters of caption at 10 px (longer ones are cut to it,
# tasks.figures; wider columns would take the largest grid past BUDGET)
SMALL, LARGE = 64, 128  # px: images of SMALL/2 or less enlarged (whole times, to at most SMALL); over LARGE reduced
MIN_SIDE = 24  # px: the budget never shrinks a thumbnail below this
BUDGET = 32_000_000  # pixels of the whole picture (RGB: ~100 MB), reached by shrinking thumbnails


@dataclass(frozen=True)
class Mosaic:
    image: np.ndarray  # (height, width, 3) uint8, white background
    centre_x: np.ndarray  # (n,) px: centre of each column
    frame_top: np.ndarray  # (q,) px: top of each row's frames (captions go just above)
    text_width: int  # px a caption may take without touching its neighbours'


def thumb_size(h: int, w: int, cells: int, caption_px: int, budget: int = BUDGET) -> tuple[int, int]:
    """(th, tw) px of each thumbnail, for ``cells`` cells of (h, w) images: small images enlarged a
    whole number of times (pixels stay square), large ones reduced, then shrunk to the budget."""
    side = max(h, w)
    scale = SMALL // side if side <= SMALL // 2 else 1.0 if side <= LARGE else LARGE / side
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    # The caption strip and text width do not shrink: scale the thumbnails down until it fits.
    while cells * np.prod(_cell(th, tw, caption_px)) > budget and max(th, tw) > MIN_SIDE:
        f = max(MIN_SIDE / max(th, tw), 0.9)
        th, tw = max(1, int(th * f)), max(1, int(tw * f))
    return th, tw


def _cell(th: int, tw: int, caption_px: int) -> tuple[int, int]:
    """(height, width) px of one cell: caption strip, framed thumbnail, gap."""
    return caption_px + th + 2 * FRAME + GAP, max(tw + 2 * FRAME, TEXT_W) + GAP


def resize(px: np.ndarray, th: int, tw: int) -> np.ndarray:
    """(..., H, W, C) -> (..., th, tw, C), nearest pixel (crisp when enlarged by whole times)."""
    rows = (np.arange(th) * px.shape[-3]) // th
    cols = (np.arange(tw) * px.shape[-2]) // tw
    return px[..., rows, :, :][..., cols, :]


def compose(blocks: Sequence[np.ndarray], frames: np.ndarray, caption_px: int, budget: int = BUDGET) -> Mosaic:
    """blocks: uint8 column blocks (q, n_i, H_i, W_i, C_i), C_i 1 (grey) or 3, that side by side
    make the n columns, each of its own size and channels (the query command's queries at the
    model's size beside results at the items'); frames (q, n, 3) uint8 RGB frame colours -> one
    image of q rows × n columns of framed thumbnails, ``caption_px`` free above each row. Every
    block is resized to one thumbnail size (from the largest image) before they are joined: a
    full-size copy of a 100 × 51 grid of 224 px RGB images would be ~770 MB."""
    q, n = frames.shape[:2]
    h, w = max(b.shape[2] for b in blocks), max(b.shape[3] for b in blocks)
    th, tw = thumb_size(h, w, q * n, caption_px, budget)
    cell_h, cell_w = _cell(th, tw, caption_px)
    small = np.concatenate([_rgb(resize(b, th, tw)) for b in blocks], axis=1)  # (q, n, th, tw, 3)
    # (q, cell_h, n, cell_w, 3) reshapes for free into the (q·cell_h, n·cell_w, 3) picture.
    canvas = np.full((q, cell_h, n, cell_w, 3), 255, np.uint8)
    y0, x0 = caption_px, (cell_w - GAP - tw - 2 * FRAME) // 2 + GAP // 2
    canvas[:, y0 : y0 + th + 2 * FRAME, :, x0 : x0 + tw + 2 * FRAME] = frames[:, None, :, None, :]
    canvas[:, y0 + FRAME : y0 + FRAME + th, :, x0 + FRAME : x0 + FRAME + tw] = small.transpose(0, 2, 1, 3, 4)
    return Mosaic(
        image=canvas.reshape(q * cell_h, n * cell_w, 3),
        centre_x=np.arange(n) * cell_w + x0 + FRAME + tw / 2,
        frame_top=np.arange(q) * cell_h + y0,
        text_width=cell_w - GAP,
    )


def _rgb(px: np.ndarray) -> np.ndarray:
    """(..., C) uint8 with C 1 (grey) or 3 -> (..., 3)."""
    return np.repeat(px, 3, axis=-1) if px.shape[-1] == 1 else px[..., :3]
