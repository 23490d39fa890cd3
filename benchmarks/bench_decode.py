"""JPEG decode (+ resize) throughput on ONE CPU core: Pillow vs torchvision.io.decode_jpeg vs Pillow draft().

Run by hand, not a test:

    python benchmarks/bench_decode.py                  # 300 images per cell, prints a markdown table
    python benchmarks/bench_decode.py --n 100 --large 50

Images are synthetic (smooth colour fields, shapes, sensor-like noise; JPEG quality 90), generated
into a temporary folder: ``--small`` images of 500x375 (ImageNet's typical size) and ``--large``
images of 1600x1200 (phone-photo sized, where DCT-domain downscaling can pay). Columns:

* ``decode``: file -> RGB pixels (PIL ``Image``, or a uint8 ``(3, H, W)`` tensor).
* ``RRC224``: decode + RandomResizedCrop(224, scale=(0.08, 1)) + horizontal flip, uint8 out.
* ``resize256``: decode + resize of the short side to 256 (the evaluation path).

The ``deepmetric decoder=...`` rows run our own reader and ``imagenet`` preset (RandomResizedCrop +
flip / Resize 256 + CenterCrop 224, then float32 + normalisation), i.e. exactly what a training or
evaluation worker does per image with ``data.decoder`` set to ``pil`` or ``torchvision``.

Each cell is the best of 3 passes over the images (page cache warm).

``pil+draft`` asks libjpeg for a 1/2, 1/4 or 1/8 scale decode (``Image.draft``) whenever the
requested output still has at least the needed pixels, then finishes with a normal resize; it can
only help when the crop (or image) is at least twice the output size.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import tempfile
import time
from multiprocessing import Pool
from typing import Callable, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------- synthetic JPEGs
def _one_jpeg(args: Tuple[str, int, int, int]) -> int:
    path, width, height, seed = args
    rng = np.random.default_rng(seed)
    base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(int(rng.integers(5, 25))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(10, width // 2)), y0 + int(rng.integers(10, height // 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=fill)
    arr = np.asarray(base, dtype=np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(path, quality=90)
    return os.path.getsize(path)


def make_jpegs(folder: str, n: int, width: int = 500, height: int = 375, workers: int = 0, seed: int = 0) -> List[str]:
    """Write ``n`` synthetic ``width x height`` JPEGs into ``folder``; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    jobs = [(os.path.join(folder, f"{width}x{height}_{i:05d}.jpg"), width, height, seed * 1_000_003 + i) for i in range(n)]
    workers = workers or (os.cpu_count() or 1)
    if workers > 1:
        with Pool(workers) as pool:
            pool.map(_one_jpeg, jobs, chunksize=16)
    else:
        for job in jobs:
            _one_jpeg(job)
    return [j[0] for j in jobs]


# ----------------------------------------------------------------------------- decoders
def rrc_params(width: int, height: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> Tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box ``(left, top, w, h)`` for an image of the given size."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return random.randint(0, width - w), random.randint(0, height - h), w, h
    side = min(width, height)
    return (width - side) // 2, (height - side) // 2, side, side


def pil_decode(path: str, draft_size: Tuple[int, int] | None = None) -> Image.Image:
    img = Image.open(path)
    if draft_size is not None:
        img.draft("RGB", draft_size)
    return img.convert("RGB")


def pil_rrc(path: str, size: int = 224, use_draft: bool = False) -> np.ndarray:
    img = Image.open(path)
    full_w, full_h = img.size
    left, top, w, h = rrc_params(full_w, full_h)
    if use_draft:  # the largest DCT downscale that leaves the crop at least `size` pixels a side
        img.draft("RGB", (math.ceil(full_w * size / w), math.ceil(full_h * size / h)))
    sx, sy = img.size[0] / full_w, img.size[1] / full_h
    box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    out = img.convert("RGB").resize((size, size), Image.BILINEAR, box=box)
    if random.random() < 0.5:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return np.asarray(out)


def pil_resize_short(path: str, short: int = 256, use_draft: bool = False) -> Image.Image:
    img = Image.open(path)
    w, h = img.size
    k = short / min(w, h)
    size = (max(1, round(w * k)), max(1, round(h * k)))
    if use_draft:
        img.draft("RGB", size)
    return img.convert("RGB").resize(size, Image.BILINEAR)


def tv_decode(path: str) -> torch.Tensor:
    from torchvision.io import decode_jpeg, read_file

    return decode_jpeg(read_file(path))


def tv_rrc(path: str, size: int = 224) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    img = tv_decode(path)
    left, top, w, h = rrc_params(img.shape[2], img.shape[1])
    out = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
    return TF.horizontal_flip(out) if random.random() < 0.5 else out


def tv_resize_short(path: str, short: int = 256) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    return TF.resize(tv_decode(path), short, antialias=True)


def deepmetric_fns(decoder: str) -> Tuple[Callable, Callable, Callable]:
    """Our own dataset + ``imagenet`` preset (what the trainer and evaluator run), uint8 -> float."""
    from deepmetric.data.io import load_image, read_image_tensor
    from deepmetric.data.transforms import build_transform

    read = read_image_tensor if decoder == "torchvision" else load_image
    train = build_transform("imagenet", train=True, decoder=decoder)
    test = build_transform("imagenet", train=False, decoder=decoder)
    return read, lambda p: train(read(p)), lambda p: test(read(p))


METHODS = {
    "pil": (pil_decode, lambda p: pil_rrc(p), lambda p: pil_resize_short(p)),
    "pil+draft": (None, lambda p: pil_rrc(p, use_draft=True), lambda p: pil_resize_short(p, use_draft=True)),
    "torchvision.io": (tv_decode, tv_rrc, tv_resize_short),
}
#: rows measuring deepmetric's own pipeline (``data.decoder``): the third column there is the test
#: transform (Resize 256 + CenterCrop 224), and both end in normalised float32
OURS = {"deepmetric decoder=pil": "pil", "deepmetric decoder=torchvision": "torchvision"}


def images_per_s(fn: Callable[[str], object], paths: Sequence[str], rounds: int = 3) -> float:
    """Best of ``rounds`` passes (other processes on a shared host only ever slow a pass down)."""
    for p in paths[:10]:  # warm-up: imports, page cache, allocator
        fn(p)
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        for p in paths:
            fn(p)
        best = max(best, len(paths) / (time.perf_counter() - start))
    return best


def run(sets: Sequence[Tuple[str, List[str]]]) -> str:
    torch.set_num_threads(1)
    random.seed(0)
    lines = [
        "| images | method | decode img/s | decode+RRC224+flip img/s | decode+resize256 img/s |",
        "|---|---|---|---|---|",
    ]
    for name, paths in sets:
        rows = list(METHODS.items()) + [(label, deepmetric_fns(dec)) for label, dec in OURS.items()]
        for method, fns in rows:
            cells = ["-" if fn is None else f"{images_per_s(fn, paths):.0f}" for fn in fns]
            lines.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300, help="500x375 images timed per cell")
    ap.add_argument("--large", type=int, default=100, help="1600x1200 images timed per cell (0 = skip)")
    ap.add_argument("--dir", default=None, help="folder for the JPEGs (default: a temporary one)")
    args = ap.parse_args()
    import PIL
    import torchvision

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or tmp
        small = make_jpegs(folder, args.n, 500, 375)
        sets = [(f"500x375 ({np.mean([os.path.getsize(p) for p in small]) / 1e3:.0f} KB)", small)]
        if args.large:
            large = make_jpegs(folder, args.large, 1600, 1200, seed=1)
            sets.append((f"1600x1200 ({np.mean([os.path.getsize(p) for p in large]) / 1e3:.0f} KB)", large))
        print(f"one core; Pillow {PIL.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}")
        print(run(sets))


if __name__ == "__main__":
    main()
