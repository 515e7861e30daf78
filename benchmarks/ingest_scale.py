"""Ingest at scale: N small synthetic JPEGs in an ImageFolder tree, against the cores' decode rate.

Generates the tree (distinct files: each JPEG carries its index in a comment segment, so content
hashes differ while the pixels come from a few hundred base images), measures in this run the
single-core rate of the reference decode (torchvision's ImageFolder loader + Resize, bytes in
memory) and of ingest's own decode, runs the ingest stage with one worker per core, and prints
one JSON line per figure: images/s, the ratios to (single-core rate × cores) of both decoders, the
first pass's share, and peak RSS of this process and of its descendants (the decode workers).

    python benchmarks/ingest_scale.py [N] [--classes 1000] [--image-size 32] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks import ingest, scan, sources  # noqa: E402
from tasks.params import load_params, yaml_load  # noqa: E402

SIDE = 64  # source images: 64×64 RGB JPEGs of ~2–3 KB, "small JPEGs"
BASES = 256


def _bases(seed: int = 0) -> list[bytes]:
    """Smooth gradients + noise: JPEGs that look like photos to the codec, not like flat colour."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] / SIDE
    out = []
    for _ in range(BASES):
        a, b, c = rng.uniform(0, 255, 3)
        img = np.stack([a * xx + (255 - a) * yy, b * yy, c * (1 - xx)], -1) + rng.normal(0, 20, (SIDE, SIDE, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def generate(root: Path, n: int, classes: int) -> None:
    """``root/c<k>/<i>.jpg``; a COM segment (0xFFFE) right after SOI makes every file distinct."""
    bases = _bases()
    for k in range(classes):
        (root / f"c{k:05d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        base = bases[i % BASES]
        comment = f"tripletflow benchmark {i}".encode()
        data = base[:2] + b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment + base[2:]
        (root / f"c{i % classes:05d}" / f"{i:08d}.jpg").write_bytes(data)


def reference_decode(blob: bytes, size: int) -> np.ndarray:
    """What a user's loader does today: torchvision's ImageFolder loader (PIL open + convert RGB)
    and ``transforms.Resize((size, size))`` (PIL bilinear), to a uint8 array — from bytes in
    memory, so the reference does not even pay for reading files (ingest does)."""
    from torchvision.transforms import functional as TF

    with Image.open(io.BytesIO(blob)) as img:
        return np.asarray(TF.resize(img.convert("RGB"), [size, size]), dtype=np.uint8)


def single_core_rate(root: Path, size: int, own: bool = False, sample: int = 3000) -> float:
    """Images/s of the reference decode (``own``: of sources.decode, ingest's decode — EXIF,
    modes, DCT scaling) on one core, bytes in memory."""
    files = sorted(root.rglob("*.jpg"))[:sample]
    blobs = [f.read_bytes() for f in files]
    fn = (lambda b: sources.decode(b, size, 3)) if own else (lambda b: reference_decode(b, size))
    fn(blobs[0])  # imports, PIL plugin registry
    start = time.perf_counter()
    for blob in blobs:
        fn(blob)
    return len(blobs) / (time.perf_counter() - start)


def all_cores_rate(root: Path, size: int, cores: int) -> float:
    """The reference decode in ``cores`` processes at once, summed: what the cores give *now*.
    On a machine shared with other work this is below single-core rate × cores."""
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(cores) as pool:
        return sum(pool.map(single_core_rate, [root] * cores, [size] * cores))


class TreeRss(threading.Thread):
    """Peak of the summed RSS of this process and all its descendants (the fork server and the
    decode workers are grandchildren, which getrusage(RUSAGE_CHILDREN) only sees once reaped)."""

    def __init__(self, every_s: float = 0.1):
        super().__init__(daemon=True)
        self.every_s, self.peak_mb, self.peak_detail, self._halt = every_s, 0.0, {}, threading.Event()

    @staticmethod
    def sample() -> dict[int, float]:
        parent, rss = {}, {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    status = Path(f"/proc/{entry}/status").read_text()
                except OSError:
                    continue
                fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
                parent[int(entry)] = int(fields["PPid"])
                rss[int(entry)] = int(fields.get("VmRSS", "0 kB").split()[0]) / 1024
        tree, todo = set(), [os.getpid()]
        while todo:
            pid = todo.pop()
            tree.add(pid)
            todo += [c for c, pp in parent.items() if pp == pid and c not in tree]
        return {pid: rss.get(pid, 0.0) for pid in tree}

    def run(self) -> None:
        while not self._halt.wait(self.every_s):
            detail = self.sample()
            if sum(detail.values()) > self.peak_mb:
                self.peak_mb, self.peak_detail = sum(detail.values()), detail

    def stop(self) -> None:
        self._halt.set()
        self.join()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("n", type=int, nargs="?", default=20_000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the tree and outputs here")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ingest-scale-"))
    images = work / "images"
    start = time.perf_counter()
    if not images.exists():
        generate(images, args.n, args.classes)
    generate_s = time.perf_counter() - start
    # Decode throughput, not disk: a reused --workdir may have left the page cache, and a
    # cold-cache run read its 100,000 files at half the rate. Read every file once first.
    for f in images.rglob("*.jpg"):
        f.read_bytes()
    cores = os.cpu_count() or 1
    load_before = os.getloadavg()[0]
    one_core = single_core_rate(images, args.image_size)
    own_core = single_core_rate(images, args.image_size, own=True)
    cores_now = all_cores_rate(images, args.image_size, cores)

    raw = yaml_load((REPO / "params.yaml").read_text())
    raw["ingest"].update(source={"kind": "image_folder", "root": str(images)}, image_size=args.image_size,
                         channels=3, workers=0)
    (work / "params.yaml").write_text(yaml.safe_dump(raw))
    params = load_params(work / "params.yaml")
    # The timed run has no RSS sampler: walking /proc ten times a second in this process took
    # ~10 % of the ingest parent's time (and its GIL). Peak memory is a second, sampled run.
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    summary = ingest.run(params.ingest, params.paths)
    ingest_s = time.perf_counter() - start
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    main_cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    one_core_after = single_core_rate(images, args.image_size)  # the machine may have changed meanwhile
    one_core_before, one_core = one_core, (one_core + one_core_after) / 2
    tree = TreeRss()
    tree.start()
    ingest.run(params.ingest, params.paths)
    tree.stop()
    start = time.perf_counter()
    scan.first_pass(params.ingest, Path(params.paths.root))  # the first pass alone, warm cache
    scan_s = time.perf_counter() - start
    rate = summary["ingested"] / ingest_s
    self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    common = {"n": args.n, "image_size": args.image_size, "cores": cores}
    print(json.dumps({"figure": "ingest_images_per_s", "value": round(rate), "wall_s": round(ingest_s, 1), **common}))
    print(json.dumps({"figure": "single_core_decode_images_per_s", "value": round(one_core),
                      "before_after_ingest": [round(one_core_before), round(one_core_after)],
                      "decoder": "torchvision ImageFolder loader + Resize", **common}))
    print(json.dumps({"figure": "single_core_own_decode_images_per_s", "value": round(own_core),
                      "decoder": "tasks.sources.decode", **common}))
    print(json.dumps({"figure": "all_cores_decode_images_per_s", "value": round(cores_now), **common}))
    print(json.dumps({"figure": "ingest_vs_cores_decode_ratio", "value": round(rate / (one_core * cores), 3),
                      "vs_all_cores_measured_now": round(rate / cores_now, 3),
                      # What the pipeline keeps of its own decoder's rate: reading, hashing, IPC, writing.
                      "vs_own_decode_times_cores": round(rate / (own_core * cores), 3),
                      "first_pass_share": round(scan_s / ingest_s, 3),
                      "main_process_cpu_share": round(main_cpu_s / (ingest_s * cores), 3),
                      "load_avg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)], **common}))
    print(json.dumps({"figure": "ingest_peak_rss_mb", "self_and_descendants": round(tree.peak_mb),
                      "processes_at_peak": sorted(round(v) for v in tree.peak_detail.values()),
                      "getrusage_self": round(self_mb), "getrusage_children": round(child_mb),
                      "items_mb": round(params.paths["items"].stat().st_size / 2**20), **common}))
    print(json.dumps({"figure": "ingest_scale_generate_s", "value": round(generate_s, 1), "skipped": summary["skipped"],
                      "workdir": str(work), **common}))
    if args.workdir is None:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
