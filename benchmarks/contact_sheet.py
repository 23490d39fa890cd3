"""A contact sheet of an image folder (one subfolder per class), to look at what a benchmark builder
wrote: ``--classes`` classes drawn at random (``--seed``), one row each, up to ``--per-class`` of
its images, the class folder's name on the left.

    python benchmarks/contact_sheet.py /tmp/suite/icons --out /tmp/icons_sheet.png
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Iterable, Optional


def contact_sheet(root: str | Path, out: str | Path, classes: int = 8, per_class: int = 6, seed: int = 0,
                  cell: int = 64, label_width: int = 140) -> Path:
    """Write the sheet to ``out`` (PNG) on a grey ground, so that white and black image backgrounds
    both show; returns ``out``."""
    from PIL import Image, ImageDraw

    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    chosen = sorted(random.Random(seed).sample(folders, min(classes, len(folders))))
    sheet = Image.new("RGB", (label_width + per_class * (cell + 2), len(chosen) * (cell + 2)), (160, 160, 160))
    draw = ImageDraw.Draw(sheet)
    for row, folder in enumerate(chosen):
        y = row * (cell + 2)
        draw.text((2, y + cell // 2 - 6), folder.name[: label_width // 6], fill=(0, 0, 0))
        for col, path in enumerate(sorted(folder.glob("*.png"))[:per_class]):
            with Image.open(path) as im:
                tile = im.convert("RGB").resize((cell, cell), Image.NEAREST)
            sheet.paste(tile, (label_width + col * (cell + 2), y))
    sheet.save(out)
    return Path(out)


def main(argv: Optional[Iterable[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", help="an image folder (one subfolder per class)")
    ap.add_argument("--out", required=True, help="the PNG to write")
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--per-class", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cell", type=int, default=64, help="pixels per image on the sheet")
    args = ap.parse_args(list(argv) if argv is not None else None)
    print(contact_sheet(args.root, args.out, args.classes, args.per_class, args.seed, args.cell))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
