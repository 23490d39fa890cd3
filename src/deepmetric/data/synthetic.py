"""Miniature datasets written in each official on-disk layout, with tiny real JPEGs.

For tests and recipe smoke tests: every generator is deterministic (``seed``), fast (a few hundred
images at most by default) and returns the folder to pass as ``root`` to the matching format
builder. Images are class-dependent (a hue and a stripe pattern per class, plus per-image noise
and brightness), so a small model can learn them and retrieval metrics move above chance.

| generator | format | layout written |
|---|---|---|
| :func:`make_image_folder` | ``image_folder``, ``identity_folder`` | ``<class>/<image>.jpg`` |
| :func:`make_csv` | ``csv`` | ``list.csv`` + ``images/`` |
| :func:`make_sop` | ``sop`` (both list formats) | ``Ebay_{train,test,info}.txt``, ``{train,test}_list.txt``, ``<super>_final/`` |
| :func:`make_cub` | ``cub`` | ``images.txt``, ``image_class_labels.txt``, ``classes.txt``, ``train_test_split.txt``, ``images/`` |
| :func:`make_cars` | ``cars`` | ``cars_annos.mat``, ``car_ims/`` |
| :func:`make_inshop` | ``inshop`` | ``Eval/list_eval_partition.txt``, ``img/`` |
| :func:`make_lfw` | ``lfw`` | ``lfw/<name>/<name>_0001.jpg`` + ``pairs.txt`` beside ``lfw/`` |
| :func:`make_market` | ``market1501``, ``dukemtmc`` | ``bounding_box_train/``, ``bounding_box_test/``, ``query/`` |
"""
from __future__ import annotations

import colorsys
import csv
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

SizeArg = int | tuple[int, int]

_SOP_SUPER = (
    "bicycle", "cabinet", "chair", "coffee_maker", "fan", "kettle",
    "lamp", "mug", "sofa", "stapler", "table", "toaster",
)


def class_image(cls: int, rng: np.random.Generator, size: SizeArg = 16) -> np.ndarray:
    """An ``(H, W, 3) uint8`` image of class ``cls``: its hue and stripe pattern, plus noise.

    Hue steps by the golden ratio (neighbouring classes look different); stripe orientation and
    frequency also depend on the class; brightness and noise vary per image.
    """
    h, w = (size, size) if isinstance(size, int) else size
    r, g, b = colorsys.hsv_to_rgb((cls * 0.618034) % 1.0, 0.75, 0.9)
    colour = np.array([r, g, b], dtype=np.float32) * 255.0
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = (cls % 4) * np.pi / 4
    freq = 2 * np.pi * (1 + (cls // 4) % 3) / max(h, w) * 2
    stripes = 0.5 + 0.5 * np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 0.5))
    shade = 0.55 + 0.45 * stripes[..., None]
    img = colour * shade * rng.uniform(0.85, 1.15) + rng.normal(0.0, 8.0, size=(h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _save(path: Path, cls: int, rng: np.random.Generator, size: SizeArg) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(class_image(cls, rng, size)).save(path, format="JPEG", quality=90)


def _write_lines(path: Path, lines: Sequence[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


# ---------------------------------------------------------------------------------------------


def make_image_folder(
    dst: str | os.PathLike, n_classes: int = 6, per_class: int = 4, size: SizeArg = 16, seed: int = 0
) -> Path:
    """One folder per class (``class_00/img_000.jpg``); returns ``dst``. Also an identity folder."""
    root = Path(dst)
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        for k in range(per_class):
            _save(root / f"class_{c:02d}" / f"img_{k:03d}.jpg", c, rng, size)
    return root


def make_csv(
    dst: str | os.PathLike,
    n_classes: int = 6,
    per_class: int = 4,
    split: Optional[str] = "test",
    camera: bool = False,
    string_labels: bool = False,
    file: str = "list.csv",
    size: SizeArg = 16,
    seed: int = 0,
) -> Path:
    """``list.csv`` (header ``path,label[,split][,camera]``) with images under ``images/``.

    ``split``: ``None`` (no split column), ``"test"`` (first half of the classes ``train``, the rest
    ``test``), or ``"query_gallery"`` (the rest's first image per class ``query``, others
    ``gallery``). ``string_labels`` writes class names (``cls_a``...) instead of integers;
    ``camera`` adds a camera column (image index mod 3). Returns ``dst``.
    """
    root = Path(dst)
    rng = np.random.default_rng(seed)
    header = ["path", "label"] + (["split"] if split else []) + (["camera"] if camera else [])
    rows = []
    for c in range(n_classes):
        label = f"cls_{chr(ord('a') + c % 26)}{c // 26 or ''}" if string_labels else str(c)
        for k in range(per_class):
            rel = f"images/c{c:02d}_{k:03d}.jpg"
            _save(root / rel, c, rng, size)
            row = [rel, label]
            if split == "test":
                row.append("train" if c < n_classes // 2 else "test")
            elif split == "query_gallery":
                row.append("train" if c < n_classes // 2 else ("query" if k == 0 else "gallery"))
            elif split is not None:
                raise ValueError(f"make_csv: split must be None, 'test' or 'query_gallery', got {split!r}")
            if camera:
                row.append(str(k % 3))
            rows.append(row)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / file, "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    return root


def make_sop(
    dst: str | os.PathLike,
    n_classes: int = 8,
    per_class: int = 3,
    n_super_classes: int = 2,
    size: SizeArg = 16,
    seed: int = 0,
) -> Path:
    """Stanford Online Products: both list formats over the same images; returns ``dst``.

    Classes ``1..n_classes/2`` are train, the rest test (as SOP: class ids continue across the two
    lists). Writes ``Ebay_train.txt``/``Ebay_test.txt``/``Ebay_info.txt`` (header
    ``image_id class_id super_class_id path``) and PaddleClas ``train_list.txt``/``test_list.txt``
    (``path label unique_id``, label = class id, unique id = image id).
    """
    root = Path(dst)
    rng = np.random.default_rng(seed)
    head = "image_id class_id super_class_id path"
    n_super = max(1, min(n_super_classes, len(_SOP_SUPER)))
    ebay = {"train": [head], "test": [head]}
    paddle = {"train": [], "test": []}
    image_id = 0
    for class_id in range(1, n_classes + 1):
        which = "train" if class_id <= n_classes // 2 else "test"
        sup = (class_id - 1) % n_super
        for k in range(per_class):
            image_id += 1
            rel = f"{_SOP_SUPER[sup]}_final/{111085122870 + class_id}_{k}.JPG"
            _save(root / rel, class_id, rng, size)
            ebay[which].append(f"{image_id} {class_id} {sup + 1} {rel}")
            paddle[which].append(f"{rel} {class_id} {image_id}")
    _write_lines(root / "Ebay_train.txt", ebay["train"])
    _write_lines(root / "Ebay_test.txt", ebay["test"])
    _write_lines(root / "Ebay_info.txt", ebay["train"] + ebay["test"][1:])
    _write_lines(root / "train_list.txt", paddle["train"])
    _write_lines(root / "test_list.txt", paddle["test"])
    return root


def make_cub(
    dst: str | os.PathLike, n_classes: int = 6, per_class: int = 3, size: SizeArg = 16, seed: int = 0
) -> Path:
    """CUB-200-2011 layout (class ids 1..n, images under ``images/NNN.Name/``); returns ``dst``."""
    root = Path(dst)
    rng = np.random.default_rng(seed)
    images, labels, classes, split = [], [], [], []
    image_id = 0
    for c in range(1, n_classes + 1):
        folder = f"{c:03d}.Bird_{c}"
        classes.append(f"{c} {folder}")
        for k in range(per_class):
            image_id += 1
            rel = f"{folder}/Bird_{c}_{k + 1:04d}_{image_id}.jpg"
            _save(root / "images" / rel, c, rng, size)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c}")
            split.append(f"{image_id} {int(k % 2 == 0)}")
    _write_lines(root / "images.txt", images)
    _write_lines(root / "image_class_labels.txt", labels)
    _write_lines(root / "classes.txt", classes)
    _write_lines(root / "train_test_split.txt", split)
    return root


def make_cars(
    dst: str | os.PathLike, n_classes: int = 6, per_class: int = 3, size: SizeArg = 16, seed: int = 0
) -> Path:
    """Cars196 layout: ``cars_annos.mat`` (struct array ``annotations`` with fields
    ``relative_im_path, bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, test`` and cell ``class_names``)
    and ``car_ims/000001.jpg``...; returns ``dst``."""
    import scipy.io

    root = Path(dst)
    rng = np.random.default_rng(seed)
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    n = n_classes * per_class
    ann = np.zeros((1, n), dtype=[(f, object) for f in fields])
    h, w = (size, size) if isinstance(size, int) else size
    i = 0
    for c in range(1, n_classes + 1):
        for k in range(per_class):
            rel = f"car_ims/{i + 1:06d}.jpg"
            _save(root / rel, c, rng, size)
            values = [np.array([rel]), 1, 1, w, h, c, k % 2]
            for f, v in zip(fields, values):
                ann[0, i][f] = v if isinstance(v, np.ndarray) else np.array([[v]], dtype=np.uint16 if f != "test" else np.uint8)
            i += 1
    names = np.empty((1, n_classes), dtype=object)
    for c in range(n_classes):
        names[0, c] = np.array([f"Car Model {c + 1} 2012"])
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": ann, "class_names": names})
    return root


def make_inshop(
    dst: str | os.PathLike, n_items: int = 8, per_item: int = 4, size: SizeArg = 16, seed: int = 0
) -> Path:
    """In-Shop Clothes layout: ``Eval/list_eval_partition.txt`` (count line, header line
    ``image_name item_id evaluation_status``, rows) and ``img/<GENDER>/<category>/id_XXXXXXXX/``.

    The first half of the items is ``train``; for the others the first image of each item is a
    ``query`` and the rest ``gallery`` (``per_item`` >= 2). Returns ``dst``.
    """
    if per_item < 2:
        raise ValueError("make_inshop: per_item must be >= 2 (each test item needs a query and a gallery image)")
    root = Path(dst)
    rng = np.random.default_rng(seed)
    cats = ("WOMEN/Dresses", "MEN/Denim", "WOMEN/Blouses_Shirts", "MEN/Tees_Tanks")
    views = ("front", "side", "back", "full", "additional")
    rows = []
    for item in range(1, n_items + 1):
        item_id = f"id_{item:08d}"
        for k in range(per_item):
            rel = f"img/{cats[item % len(cats)]}/{item_id}/{k // len(views) + 1:02d}_{k % len(views) + 1}_{views[k % len(views)]}.jpg"
            _save(root / rel, item, rng, size)
            status = "train" if item <= n_items // 2 else ("query" if k == 0 else "gallery")
            rows.append(f"{rel}  {item_id}  {status}")
    _write_lines(root / "Eval" / "list_eval_partition.txt", [str(len(rows)), "image_name item_id evaluation_status"] + rows)
    return root


def make_lfw(
    dst: str | os.PathLike,
    n_people: int = 8,
    per_person: int = 3,
    n_sets: int = 2,
    pairs_per_set: int = 3,
    size: SizeArg = 16,
    seed: int = 0,
) -> Path:
    """LFW layout: ``dst/lfw/<Name>/<Name>_0001.jpg`` and ``dst/pairs.txt`` (header
    ``"{n_sets} {pairs_per_set}"``; each set has ``pairs_per_set`` matched lines ``name i j`` then as
    many mismatched lines ``name1 i name2 j``, tab-separated as in the original). Returns
    ``dst/lfw`` (the loader finds ``pairs.txt`` beside it)."""
    if n_people < 2 or per_person < 2:
        raise ValueError("make_lfw: need n_people >= 2 and per_person >= 2 for matched and mismatched pairs")
    base = Path(dst)
    root = base / "lfw"
    rng = np.random.default_rng(seed)
    names = [f"Person_{chr(ord('A') + p % 26)}{p:02d}" for p in range(n_people)]
    for p, name in enumerate(names):
        for k in range(1, per_person + 1):
            _save(root / name / f"{name}_{k:04d}.jpg", p, rng, size)
    lines = [f"{n_sets}\t{pairs_per_set}"]
    for _ in range(n_sets):
        for _ in range(pairs_per_set):
            p = int(rng.integers(n_people))
            i, j = sorted(rng.choice(per_person, size=2, replace=False) + 1)
            lines.append(f"{names[p]}\t{i}\t{j}")
        for _ in range(pairs_per_set):
            p1, p2 = rng.choice(n_people, size=2, replace=False)
            lines.append(f"{names[p1]}\t{rng.integers(1, per_person + 1)}\t{names[p2]}\t{rng.integers(1, per_person + 1)}")
    _write_lines(base / "pairs.txt", lines)
    return root


def make_market(
    dst: str | os.PathLike,
    n_ids: int = 8,
    per_id: int = 4,
    n_cams: int = 6,
    n_distractors: int = 2,
    n_junk: int = 2,
    style: str = "market",
    size: SizeArg = (16, 8),
    seed: int = 0,
) -> Path:
    """Market-1501 / DukeMTMC-reID layout: ``bounding_box_train/``, ``bounding_box_test/``, ``query/``.

    The first half of the ids (``0001``...) train; each of the rest has one query image on camera 1
    and ``per_id`` gallery images on cameras 2..; ``bounding_box_test`` also holds ``n_distractors``
    distractors (pid ``0000``) and ``n_junk`` junk images (pid ``-1``). ``style`` picks the file
    naming: ``"market"`` (``0002_c1s1_000451_03.jpg``) or ``"duke"`` (``0005_c2_f0046985.jpg``).
    Returns ``dst``.
    """
    if style not in ("market", "duke"):
        raise ValueError(f"make_market: style must be 'market' or 'duke', got {style!r}")
    if n_cams < 2:
        raise ValueError("make_market: n_cams must be >= 2 (queries need a cross-camera gallery match)")
    root = Path(dst)
    rng = np.random.default_rng(seed)
    counter = iter(range(1, 10**9))

    def name(pid: int, cam: int) -> str:
        frame = next(counter)
        pid_s = "-1" if pid < 0 else f"{pid:04d}"
        if style == "market":
            return f"{pid_s}_c{cam}s1_{frame * 25:06d}_01.jpg"
        return f"{pid_s}_c{cam}_f{frame * 25:07d}.jpg"

    n_train = n_ids // 2
    for pid in range(1, n_ids + 1):
        for k in range(per_id):
            if pid <= n_train:
                _save(root / "bounding_box_train" / name(pid, k % n_cams + 1), pid, rng, size)
            else:
                _save(root / "bounding_box_test" / name(pid, k % (n_cams - 1) + 2), pid, rng, size)
        if pid > n_train:
            _save(root / "query" / name(pid, 1), pid, rng, size)
    for k in range(n_distractors):
        _save(root / "bounding_box_test" / name(0, k % n_cams + 1), n_ids + 1 + k, rng, size)
    for k in range(n_junk):
        _save(root / "bounding_box_test" / name(-1, k % n_cams + 1), n_ids + 100 + k, rng, size)
    return root
