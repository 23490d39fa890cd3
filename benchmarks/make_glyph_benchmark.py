"""A many-class retrieval benchmark with the shape of Stanford Online Products, built offline from real
typefaces: a class is a common Chinese character, an instance one face that draws it.

Run by hand (as root it installs the fonts with apt-get first; several minutes on 2 cores):

    python benchmarks/make_glyph_benchmark.py --out /tmp/cjk_glyphs

and train on it through deepmetric's ordinary ``image_folder`` format, e.g.
``deepmetric train benchmarks/fidelity/cjk_glyphs.yaml data.root=/tmp/cjk_glyphs``.

What it does:

1. **Faces.** The font files of Debian's CJK font packages (:data:`PACKAGES`; ``--no-install`` uses
   what is installed, ``--fonts DIR`` any folder instead). A ``.ttc`` collection holds several faces
   (Noto Sans CJK Regular: JP, KR, SC, TC, HK and their Mono twins); each is opened with
   ``ImageFont.truetype(path, size, index=i)``. Symlinked files count once.
2. **Classes.** The 3,500 most common characters (the size of the State Council's list of common
   characters): character frequencies summed over the words of the word-frequency dictionary that
   ships in the PyPI package ``jieba`` (read where it is installed, not copied), restricted to CJK
   Unified Ideographs in GB 2312 (jieba's dictionary also holds traditional spellings).
3. **Rendering.** Each character in each face that maps it, white on black, ``--size`` pixels square,
   centred on the em box (as :func:`deepmetric.data.glyphs.render_glyphs`). A face's render is dropped
   when it is blank, fails in FreeType, or is one bitmap shared by three or more characters of that
   face (a placeholder glyph).
4. **Visual duplicates.** Per character, the faces that draw it are visited round-robin over their
   families (families, and faces within a family, in an order drawn for that character with
   ``--seed``) and a render is kept only if it differs from every render kept so far by at least
   ``--instance-threshold`` (mean absolute difference, 0-1 scale): identical faces (TakaoGothic is
   IPAGothic, Mono CJK faces draw the same ideographs) and near-identical weights of one family keep
   one render. Characters that look alike in every face both cover (mean difference under
   ``--lookalike-threshold``) are kept once. ``--max-faces`` (12, SOP's largest class) caps the
   renders per character, the first ones in that order, so each character is drawn by up to 12
   distinct families; characters with fewer than ``--min-faces`` are dropped.
5. **Output.** ``OUT/U+XXXX/<face>.png`` (folders sort in code-point order, so
   ``data.train_classes: 0.5`` trains on the first half) and ``OUT/manifest.json``: faces (file,
   index, name, family, characters covered of the 3,500, renders kept), characters with their
   frequency rank, and what was dropped and why. The family of a face (its Debian package; Noto split
   into Sans and Serif) is what ``bench_seeds.py`` uses as the "camera" of the re-ID protocol.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np

#: Debian packages with faces that draw Chinese characters (``apt-cache search`` in the report)
PACKAGES = (
    "fonts-noto-cjk", "fonts-noto-cjk-extra",
    "fonts-arphic-ukai", "fonts-arphic-uming", "fonts-arphic-bkai00mp", "fonts-arphic-bsmi00lp",
    "fonts-arphic-gbsn00lp", "fonts-arphic-gkai00mp",
    "fonts-wqy-zenhei", "fonts-wqy-microhei", "fonts-droid-fallback",
    "fonts-cwtex-fs", "fonts-cwtex-heib", "fonts-cwtex-kai", "fonts-cwtex-ming", "fonts-cwtex-yen",
    "fonts-lxgw-wenkai", "fonts-smiley-sans", "fonts-babelstone-han", "fonts-hanazono",
    "fonts-cns11643-kai", "fonts-cns11643-sung",
    "fonts-ipafont-gothic", "fonts-ipafont-mincho", "fonts-ipaexfont-gothic", "fonts-ipaexfont-mincho",
    "fonts-ipamj-mincho", "fonts-takao-gothic", "fonts-takao-mincho", "fonts-vlgothic",
    "fonts-horai-umefont", "fonts-umeplus", "fonts-migmix", "fonts-sawarabi-gothic",
    "fonts-sawarabi-mincho", "fonts-seto", "fonts-kiloji", "fonts-konatu", "fonts-kouzan-mouhitsu",
    "fonts-motoya-l-cedar", "fonts-motoya-l-maruberi", "fonts-dejima-mincho", "fonts-oradano-mincho-gsrr",
    "fonts-baekmuk", "fonts-unfonts-core",
)
FONT_EXTENSIONS = (".ttf", ".otf", ".ttc")
CJK_UNIFIED = (0x4E00, 0x9FFF)


# -- faces ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Face:
    """One face: a font file and its index in a collection (0 for a plain .ttf/.otf)."""

    path: str
    index: int
    name: str
    family: str

    @property
    def slug(self) -> str:
        """A file name for the face's renders: its name, plus the file and index (unique)."""
        stem = "".join(ch if ch.isalnum() else "-" for ch in self.name).strip("-")
        return f"{stem}__{Path(self.path).stem}-{self.index}"


def faces_in_file(path: str | os.PathLike) -> int:
    """How many faces a font file holds (a TrueType collection's header says; else 1)."""
    with open(path, "rb") as f:
        head = f.read(12)
    if head[:4] == b"ttcf" and len(head) == 12:
        return struct.unpack(">I", head[8:12])[0]
    return 1


def installed_packages(packages: Sequence[str]) -> List[str]:
    """The ``packages`` dpkg reports installed."""
    have = []
    for pkg in packages:
        r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
        if r.returncode == 0 and r.stdout.split()[-1:] == ["installed"]:  # not "not-installed"
            have.append(pkg)
    return have


def install_packages(packages: Sequence[str], what: str = "font") -> None:
    """``apt-get install`` the packages that are missing (root only; else say what to run);
    ``what`` names them in the messages."""
    missing = [p for p in packages if p not in installed_packages(packages)]
    if not missing:
        return
    if os.geteuid() != 0:
        print(f"not root: install the {what}s first with\n  sudo apt-get install -y {' '.join(missing)}",
              file=sys.stderr)
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=False, env=env)
    unknown = [p for p in missing if subprocess.run(["apt-cache", "show", p], capture_output=True).returncode != 0]
    if unknown:  # not in this release's archive: one unknown name would fail the whole apt-get
        print(f"apt knows no package {' '.join(unknown)}: skipped", file=sys.stderr)
        missing = [p for p in missing if p not in unknown]
    if not missing:
        return
    print(f"apt-get install {len(missing)} {what} packages ...", flush=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing], check=True, env=env)


def package_fonts(packages: Sequence[str], family: Callable[[str, str], str] = None) -> Dict[str, str]:
    """Font file (real path) -> family (``family(package, path)``, default :func:`family_of`), for
    the installed ``packages`` (``dpkg -L``)."""
    family = family or family_of
    out: Dict[str, str] = {}
    for pkg in installed_packages(packages):
        listing = subprocess.run(["dpkg", "-L", pkg], capture_output=True, text=True).stdout.split()
        for line in listing:
            if line.lower().endswith(FONT_EXTENSIONS) and os.path.isfile(line):
                out.setdefault(os.path.realpath(line), family(pkg, line))
    return out


def folder_fonts(folder: str | os.PathLike, family: Callable[[str, str], str] = None) -> Dict[str, str]:
    """Font files under ``folder`` (recursively) -> family (``family(folder name, path)``, default
    :func:`family_of`: the folder holding each file)."""
    family = family or family_of
    out: Dict[str, str] = {}
    for path in sorted(Path(folder).rglob("*")):
        if path.suffix.lower() in FONT_EXTENSIONS and path.is_file():
            out.setdefault(os.path.realpath(path), family(path.parent.name, str(path)))
    return out


def family_of(package: str, path: str) -> str:
    """A face's family: its package, Noto CJK split into its Sans and Serif designs (the extra
    weights of ``fonts-noto-cjk-extra`` join the same two)."""
    if package.startswith("fonts-noto-cjk") or "Noto" in Path(path).name:
        return "noto-serif-cjk" if "Serif" in Path(path).name else "noto-sans-cjk"
    return package.removeprefix("fonts-")


def enumerate_faces(files: Dict[str, str]) -> List[Face]:
    """Every face of every file (sorted by path, then collection index), named from its name table."""
    from fontTools.ttLib import TTFont

    faces = []
    for path in sorted(files):
        for i in range(faces_in_file(path)):
            try:
                names = TTFont(path, fontNumber=i, lazy=True)["name"]
                name = names.getDebugName(4) or f"{Path(path).stem} {i}"
            except Exception:  # a damaged name table still leaves a usable face
                name = f"{Path(path).stem} {i}"
            faces.append(Face(path, i, name, files[path]))
    return faces


def face_charmap(face: Face) -> set[int]:
    from fontTools.ttLib import TTFont

    try:
        return set((TTFont(face.path, fontNumber=face.index, lazy=True).getBestCmap() or {}).keys())
    except Exception:
        return set()


# -- classes -------------------------------------------------------------------------------------------

def jieba_dictionary() -> Path:
    """jieba's bundled word-frequency dictionary (``pip install jieba``; its data is not copied)."""
    try:
        import jieba
    except ImportError:
        raise SystemExit("the character frequencies come from the PyPI package jieba: pip install jieba") from None
    return Path(jieba.__file__).parent / "dict.txt"


def common_characters(n: int = 3500, dictionary: Optional[Path] = None) -> List[tuple[int, int]]:
    """The ``n`` most frequent characters as ``(code point, summed frequency)``: each word's
    frequency counts once for every occurrence of a character in it; CJK Unified Ideographs in
    GB 2312 only (jieba's dictionary also spells words in traditional characters). Ties: lower code
    point first."""
    counts: Counter = Counter()
    with open(dictionary or jieba_dictionary(), encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 2:
                continue
            for ch in parts[0]:
                if CJK_UNIFIED[0] <= ord(ch) <= CJK_UNIFIED[1] and _in_gb2312(ch):
                    counts[ord(ch)] += int(parts[1])
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def _in_gb2312(ch: str) -> bool:
    try:
        ch.encode("gb2312")
        return True
    except UnicodeEncodeError:
        return False


# -- rendering -----------------------------------------------------------------------------------------

def centred_on_em_box(font, size: int) -> Callable:
    """The placement of :func:`render_face`: ``draw(canvas_draw, ch)`` writes ``ch`` white, centred
    on the em box (anchor "mm": the middle of the advance and of ascender to descender); returns
    None (nothing to count). Other builders pass their own (``make_math_benchmark.py``)."""

    def draw(canvas_draw, ch: str) -> Optional[str]:
        canvas_draw.text((size / 2, size / 2), ch, fill=255, font=font, anchor="mm")
        return None

    return draw


def render_face(face: Face, chars: Sequence[int], size: int = 32, font_size: Optional[int] = None,
                placeholder_count: int = 3, placer: Callable = centred_on_em_box
                ) -> tuple[np.ndarray, np.ndarray, Dict[str, int]]:
    """``(images (C, size, size) uint8, covered (C,) bool, dropped counts)`` for one face.

    A character is covered when the face maps it and its render is not blank, did not fail in
    FreeType (some hinting programs do), and is not a bitmap the face draws for ``placeholder_count``
    or more characters. ``placer(font, size)`` gives the function that draws one character (what it
    returns, when not None, is counted with the drops).
    """
    from PIL import Image, ImageDraw, ImageFont

    font_size = int(font_size or round(size * 0.75))
    images = np.zeros((len(chars), size, size), dtype=np.uint8)
    covered = np.zeros(len(chars), dtype=bool)
    dropped = Counter()
    cmap = face_charmap(face)
    try:
        font = ImageFont.truetype(face.path, font_size, index=face.index)
    except OSError:
        dropped["unreadable face"] = int(sum(c in cmap for c in chars))
        return images, covered, dict(dropped)
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    place = placer(font, size)
    for i, c in enumerate(chars):
        if c not in cmap:
            continue
        draw.rectangle((0, 0, size, size), fill=0)
        try:
            note = place(draw, chr(c))
        except OSError:
            dropped["render failed"] += 1
            continue
        if note:
            dropped[note] += 1
        images[i] = np.asarray(canvas)
        if images[i].max() == 0:
            dropped["blank"] += 1
            continue
        covered[i] = True
    digests: Dict[str, List[int]] = {}
    for i in np.flatnonzero(covered):
        digests.setdefault(hashlib.sha1(images[i].tobytes()).hexdigest(), []).append(int(i))
    for members in digests.values():
        if len(members) >= placeholder_count:
            covered[members] = False
            dropped["placeholder"] += len(members)
    return images, covered, dict(dropped)


def _render_job(args):
    *rest, placer = args
    return render_face(*rest, placer=placer)


def render_all(faces: Sequence[Face], chars: Sequence[int], size: int, font_size: Optional[int],
               workers: int = 1, placer: Callable = centred_on_em_box
               ) -> tuple[np.ndarray, np.ndarray, List[Dict[str, int]]]:
    """``(images (F, C, size, size), covered (F, C), dropped per face)``."""
    jobs = [(f, chars, size, font_size, 3, placer) for f in faces]
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            results = pool.map(_render_job, jobs, chunksize=1)
    else:
        results = [_render_job(j) for j in jobs]
    images = np.stack([r[0] for r in results]) if results else np.zeros((0, len(chars), size, size), np.uint8)
    covered = np.stack([r[1] for r in results]) if results else np.zeros((0, len(chars)), bool)
    return images, covered, [r[2] for r in results]


# -- deduplication -------------------------------------------------------------------------------------

def face_order(faces: Sequence[Face], covered: np.ndarray, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Visit order: round-robin over families, so that a per-character cap keeps diverse designs.

    Without ``rng``: the family that covers most first, each family's faces broadest coverage first,
    ties by position. With ``rng`` (one per character in :func:`build_benchmark`): families and the
    faces within each family in random order, so that every character draws its own faces."""
    coverage = covered.sum(1)
    by_family: Dict[str, List[int]] = {}
    for j in sorted(range(len(faces)), key=lambda j: (-coverage[j], j)):
        by_family.setdefault(faces[j].family, []).append(j)
    families = sorted(by_family, key=lambda f: (-coverage[by_family[f][0]], f))
    if rng is not None:
        families = [families[i] for i in rng.permutation(len(families))]
        by_family = {f: [v[i] for i in rng.permutation(len(v))] for f, v in by_family.items()}
    order: List[int] = []
    for r in range(max((len(v) for v in by_family.values()), default=0)):
        order.extend(by_family[f][r] for f in families if r < len(by_family[f]))
    return np.asarray(order, dtype=np.int64)


def mean_abs_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise mean absolute difference on a 0-1 scale: ``(n, P)`` and ``(m, P)`` uint8 -> ``(n, m)``."""
    import torch

    x = torch.from_numpy(a.reshape(len(a), -1)).float().div_(255.0)
    y = torch.from_numpy(b.reshape(len(b), -1)).float().div_(255.0)
    return torch.cdist(x, y, p=1).div_(x.shape[1]).numpy()


def distinct_renders(images: np.ndarray, threshold: float) -> List[int]:
    """Greedy: indices (in the given order) of renders that differ from every earlier kept one by
    at least ``threshold`` (mean absolute difference)."""
    if len(images) == 0:
        return []
    d = mean_abs_difference(images, images)
    kept: List[int] = []
    for i in range(len(images)):
        if not kept or bool((d[i, kept] >= threshold).all()):
            kept.append(i)
    return kept


def lookalike_characters(images: np.ndarray, covered: np.ndarray, threshold: float,
                         screen: float = 0.05) -> Dict[int, int]:
    """Characters that look alike in every face both cover: ``{dropped index: kept index}``, the
    kept one earlier in the order given (more frequent). Pairs are screened on the faces that cover
    every character (when there are any), then checked on all the faces they share."""
    n_chars = covered.shape[1]
    full = np.flatnonzero(covered.all(1))[:8]
    if len(full) == 0:
        full = np.argsort(-covered.sum(1), kind="stable")[:1]
    rep = images[full].transpose(1, 0, 2, 3).reshape(n_chars, -1)
    return confirm_lookalikes(images, covered, mean_abs_difference(rep, rep) < screen, threshold)


def confirm_lookalikes(images: np.ndarray, covered: np.ndarray, candidates: np.ndarray, threshold: float,
                       statistic: Callable = np.mean) -> Dict[int, int]:
    """The screened pairs (``candidates``, a ``(C, C)`` bool matrix; upper triangle read) whose
    per-face mean absolute differences, over the faces that cover both, have a ``statistic`` under
    ``threshold``: ``{dropped index: kept index}``, the kept one earlier. A character already
    matched is not matched again."""
    alike: Dict[int, int] = {}
    for a, b in zip(*np.nonzero(np.triu(candidates, k=1))):
        a, b = int(a), int(b)
        if b in alike or a in alike:
            continue
        both = np.flatnonzero(covered[:, a] & covered[:, b])
        if len(both) == 0:
            continue
        per_face = np.abs(images[both, a].astype(np.float32) - images[both, b].astype(np.float32)).mean((1, 2))
        if statistic(per_face) / 255.0 < threshold:
            alike[b] = a
    return alike


# -- the benchmark -------------------------------------------------------------------------------------

@dataclass
class GlyphBenchmark:
    """What :func:`build_benchmark` keeps: per character, its renders and the faces they came from."""

    faces: List[Face]
    chars: List[int]                    # kept characters, frequency order
    ranks: List[int]                    # each kept character's frequency rank (0 = most frequent)
    renders: List[np.ndarray]           # per kept character: (n_i, size, size) uint8
    face_ids: List[List[int]]           # per kept character: index into ``faces`` of each render
    manifest: Dict


def build_benchmark(faces: Sequence[Face], chars: Sequence[int], *, size: int = 32,
                    font_size: Optional[int] = None, instance_threshold: float = 0.02,
                    lookalike_threshold: float = 0.005, min_faces: int = 4, max_faces: int = 0,
                    seed: int = 0, workers: int = 1, log=print, placer: Callable = centred_on_em_box,
                    lookalikes: Callable = None) -> GlyphBenchmark:
    """Render ``chars`` (frequency order) in ``faces`` and keep distinct renders (module docstring).
    ``placer`` (:func:`render_face`) and ``lookalikes`` (:func:`lookalike_characters`'s signature)
    are for other builders that share these steps."""
    t0 = time.perf_counter()
    images, covered, dropped = render_all(faces, chars, size, font_size, workers, placer)
    log(f"rendered {len(chars)} characters in {len(faces)} faces in {time.perf_counter() - t0:.0f} s")
    alike = (lookalikes or lookalike_characters)(images, covered, lookalike_threshold)
    kept_chars, ranks, renders, face_ids = [], [], [], []
    kept_per_face = np.zeros(len(faces), dtype=np.int64)
    too_few: List[int] = []
    for k, c in enumerate(chars):
        if k in alike:
            continue
        order = face_order(faces, covered[:, k:k + 1], np.random.default_rng([seed, c]))
        cand = [int(j) for j in order if covered[j, k]]
        keep = [cand[i] for i in distinct_renders(images[cand, k], instance_threshold)]
        if max_faces:
            keep = keep[:max_faces]
        if len(keep) < min_faces:
            too_few.append(c)
            continue
        kept_per_face[keep] += 1
        kept_chars.append(c)
        ranks.append(k)
        renders.append(images[keep, k].copy())
        face_ids.append(keep)
    n_renders = int(sum(len(r) for r in renders))
    manifest = {
        "size": size, "font_size": int(font_size or round(size * 0.75)),
        "instance_threshold": instance_threshold, "lookalike_threshold": lookalike_threshold,
        "min_faces": min_faces, "max_faces": max_faces, "seed": seed,
        "characters_asked": len(chars), "characters": len(kept_chars), "images": n_renders,
        "faces": [{**asdict(f), "slug": f.slug, "covered": int(covered[j].sum()),
                   "kept": int(kept_per_face[j]), "dropped": dropped[j]} for j, f in enumerate(faces)],
        "families": sorted({f.family for f in faces}),
        "dropped_characters": {
            "lookalike": [{"char": chr(chars[b]), "like": chr(chars[a])} for b, a in sorted(alike.items())],
            "too_few_faces": [chr(c) for c in too_few],
        },
        "class_folders": [f"U+{c:04X}" for c in kept_chars],
        "renders_per_character": dict(sorted(Counter(len(r) for r in renders).items())),
    }
    manifest["renders_per_character"] = {str(k): v for k, v in manifest["renders_per_character"].items()}
    return GlyphBenchmark(list(faces), kept_chars, ranks, renders, face_ids, manifest)


def fresh_output_folder(out: str | os.PathLike) -> Path:
    """``out``, created empty: a folder a benchmark builder wrote before (it has a ``manifest.json``)
    is replaced, any other non-empty folder is refused (``SystemExit``)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / "manifest.json").is_file():
            raise SystemExit(f"{out}: not empty and not written by this script (no manifest.json); choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_image_folder(bench: GlyphBenchmark, out: str | os.PathLike, frequencies: Optional[Dict[int, int]] = None) -> Path:
    """``out/U+XXXX/<face slug>.png`` per render and ``out/manifest.json``; an existing ``out`` made
    by this script (it has a manifest) is replaced, any other non-empty folder is refused."""
    from PIL import Image

    out = fresh_output_folder(out)
    for c, imgs, ids in zip(bench.chars, bench.renders, bench.face_ids):
        folder = out / f"U+{c:04X}"
        folder.mkdir()
        for img, j in zip(imgs, ids):
            Image.fromarray(img, mode="L").save(folder / f"{bench.faces[j].slug}.png", optimize=False)
    manifest = dict(bench.manifest)
    manifest["characters_detail"] = [
        {"folder": f"U+{c:04X}", "char": chr(c), "rank": r, "frequency": (frequencies or {}).get(c),
         "faces": [bench.faces[j].slug for j in ids]}
        for c, r, ids in zip(bench.chars, bench.ranks, bench.face_ids)]
    (out / "manifest.json").write_text(json.dumps(manifest, ensure_ascii=False, indent=1))
    return out


def coverage_table(manifest: Dict, asked: int) -> str:
    """One line per face: characters covered of the ``asked`` and renders kept."""
    rows = [f"{'face':<40}{'family':<22}{'covered':>9}{'kept':>7}"]
    for f in sorted(manifest["faces"], key=lambda f: (f["family"], f["name"])):
        rows.append(f"{f['name'][:39]:<40}{f['family'][:21]:<22}{f['covered']:>5}/{asked:<4}{f['kept']:>6}")
    return "\n".join(rows)


def main(argv: Optional[Iterable[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the image folder to write (e.g. /tmp/cjk_glyphs)")
    ap.add_argument("--characters", type=int, default=3500)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--font-size", type=int, default=None, help="pixels per em (default 3/4 of --size)")
    ap.add_argument("--instance-threshold", type=float, default=0.02)
    ap.add_argument("--lookalike-threshold", type=float, default=0.005)
    ap.add_argument("--min-faces", type=int, default=4)
    ap.add_argument("--max-faces", type=int, default=12,
                    help="renders kept per character at most (0: all); SOP has 2 to 12 images per product")
    ap.add_argument("--seed", type=int, default=0, help="draws each character's faces (families in random order)")
    ap.add_argument("--fonts", help="a folder of font files instead of the Debian packages")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get install missing packages")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args(list(argv) if argv is not None else None)
    if args.fonts:
        files = folder_fonts(args.fonts)
    else:
        if not args.no_install:
            install_packages(PACKAGES)
        files = package_fonts(PACKAGES)
    faces = enumerate_faces(files)
    if len(faces) < 2:
        raise SystemExit("fewer than two CJK faces found: install the packages (drop --no-install) or give --fonts")
    freq = common_characters(args.characters)
    chars = [c for c, _ in freq]
    print(f"{len(files)} font files, {len(faces)} faces, {len(chars)} characters", flush=True)
    bench = build_benchmark(faces, chars, size=args.size, font_size=args.font_size,
                            instance_threshold=args.instance_threshold, lookalike_threshold=args.lookalike_threshold,
                            min_faces=args.min_faces, max_faces=args.max_faces, seed=args.seed,
                            workers=args.workers)
    out = write_image_folder(bench, args.out, dict(freq))
    m = bench.manifest
    print(coverage_table(m, len(chars)))
    print(f"kept {m['characters']} characters, {m['images']} images (renders per character: "
          f"{m['renders_per_character']}); dropped {len(m['dropped_characters']['lookalike'])} look-alikes, "
          f"{len(m['dropped_characters']['too_few_faces'])} with fewer than {args.min_faces} faces; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
