"""A many-class colour retrieval benchmark built offline from real icon themes: a class is a
freedesktop icon name (``document-open``, ``folder``, ``firefox`` ...), an instance one icon set's
drawing of it.

Run by hand (as root it installs the themes with apt-get first; about six minutes on one core):

    python benchmarks/make_icon_benchmark.py --out /tmp/suite/icons

and train on it through deepmetric's ordinary ``image_folder`` format (``data.root=/tmp/suite/icons``,
RGB, ``model.in_chans=3``). It follows ``make_glyph_benchmark.py`` (whose helpers it imports):

1. **Themes.** The icon themes of Debian's icon-theme packages (:data:`PACKAGES`; ``--no-install``
   uses what is installed, ``--themes DIR ...`` theme folders instead): every folder with an
   ``index.theme``. A theme's *family* is its package (the "camera" of a re-ID protocol), except that
   the GNOME-Colors packages (recolours of one set) are one family and deepin's themes (four distinct
   designs in one package) are one family each. Left out: themes drawn for dark backgrounds (a name
   with "dark": their light glyphs vanish on white) and ``hicolor`` (the fallback every application
   installs into). ``--themes`` folders are each their own family.
2. **Sources.** Per theme and name, the files in the directories ``index.theme`` lists (less
   animations and symbolic directories, links followed), and of them the best for ``--size``: the
   largest PNG of at least ``--size`` pixels, else the SVG of the smallest directory size of at
   least ``--size`` (else the largest), rendered at ``--size`` with ``rsvg-convert`` (librsvg, which
   GTK draws themes with), else the largest smaller PNG, upscaled (counted in the manifest) if it
   has at least ``--min-source-pixels`` (half ``--size``). ``-symbolic`` names (monochrome glyphs),
   ``-rtl``/``-ltr`` direction variants and ``indicator-keyboard-*`` (layout codes set as text) are
   not classes.
3. **Aliases.** Themes reach one drawing by many names (links, or copies of one file). A name's
   *spread* is the number of families that have it. (a) Two names are *aliases* when, in at least
   as many families as draw them apart, a theme draws them with the same file (same resolved path
   at some size, or same bytes): then only the one with the larger spread is a class (``alias_of``
   in the manifest): a class is a concept, not a spelling. (b) Within a theme a drawing counts once:
   it is an instance only of the class with the largest spread among the names that reach it (a
   theme that draws ``text-x-python`` with its ``text-x-generic`` file gives ``text-x-python`` no
   instance).
4. **Renders and duplicates.** Each drawing composited onto white, aspect kept, centred,
   ``--size`` square, 8-bit RGB. Per class, themes are visited round-robin over families (families,
   and themes within one, in an order drawn for the class with ``--seed``, as the glyph builder);
   a render is kept when it is not blank on white and differs from every render kept so far by at
   least ``--instance-threshold``, at most ``--max-per-family`` per family (1: a family's themes are
   recolours or dark/light variants of one drawing) and ``--max-instances`` in all. The difference
   is the glyph builder's mean absolute difference (0-1 scale, RGB) taken over the pixels that
   either render draws on (not white) instead of all of them (:func:`ink_difference`): an icon is
   mostly white ground, and over the whole square one drawing re-exported by two themes (GNOME and
   MATE, elementary and its Xfce fork) differs by as little as two genuinely different line icons.
   Then, within a family, two classes whose renders differ by less than ``--lookalike-threshold``
   (0.01: a copy of one file re-encoded, not two icons on one template, which differ by 0.03 or
   more) are one drawing under two names: it stays an instance of the class with the larger spread
   only.
   Classes with fewer than ``--min-instances`` renders are dropped.
5. **Output.** ``OUT/<icon-name>/<theme>.png`` and ``OUT/manifest.json``: parameters, the packages
   asked for and installed, every theme found (package, family, used or why not, names, instances
   kept, sources by kind), every class (spread, its instances with theme, source file and how it was
   drawn, the names dropped as its aliases) and what was dropped and why.
"""
from __future__ import annotations

import argparse
import configparser
import hashlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_glyph_benchmark import (face_order, fresh_output_folder, install_packages,  # noqa: E402
                                  installed_packages, mean_abs_difference)

#: Debian packages of icon themes (``apt-cache search icon-theme`` on Debian 12, less hicolor and
#: breeze's Qt resource bundle); gnome-colors-common comes with the GNOME-Colors variants.
PACKAGES = (
    "adwaita-icon-theme", "breeze-icon-theme", "deepin-icon-theme", "elementary-icon-theme",
    "elementary-xfce-icon-theme", "faba-icon-theme", "moka-icon-theme", "faenza-icon-theme",
    "gnome-icon-theme", "gnome-colors-common", "gnome-brave-icon-theme", "gnome-dust-icon-theme",
    "gnome-human-icon-theme", "gnome-illustrious-icon-theme", "gnome-noble-icon-theme",
    "gnome-wine-icon-theme", "gnome-wise-icon-theme", "gnome-icon-theme-gartoon",
    "gnome-icon-theme-nuovo", "gnome-icon-theme-suede", "gnome-icon-theme-yasis", "lxde-icon-theme",
    "mate-icon-theme", "numix-icon-theme", "numix-icon-theme-circle", "obsidian-icon-theme",
    "oxygen-icon-theme", "paper-icon-theme", "papirus-icon-theme", "sugar-icon-theme",
    "suru-icon-theme", "tango-icon-theme",
)
#: packages whose themes are one family (recolours of one icon set)
FAMILY_OF_PACKAGE = {p: "gnome-colors" for p in PACKAGES if p.startswith("gnome-") and p.endswith("-icon-theme")
                     and p.split("-")[1] in ("brave", "dust", "human", "illustrious", "noble", "wine", "wise")}
FAMILY_OF_PACKAGE["gnome-colors-common"] = "gnome-colors"
#: packages whose themes are distinct designs: each theme is its own family
THEME_FAMILIES = ("deepin-icon-theme",)
ICON_EXTENSIONS = (".png", ".svg", ".svgz")


# -- themes --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Theme:
    """One icon theme: its folder (holding ``index.theme``), package and family."""

    name: str
    path: str
    package: str
    family: str


def exclusion(theme_name: str) -> Optional[str]:
    """Why a theme is left out (None: it is used)."""
    if theme_name.lower() in ("hicolor", "default", "locolor"):
        return "fallback theme (applications install their own icons into it)"
    if "dark" in theme_name.lower():
        return "drawn for dark backgrounds (its light glyphs vanish on white)"
    return None


def package_themes(packages: Sequence[str]) -> List[Theme]:
    """The themes (folders with an ``index.theme``) of the installed ``packages`` (``dpkg -L``)."""
    themes = {}
    for pkg in installed_packages(packages):
        listing = subprocess.run(["dpkg", "-L", pkg], capture_output=True, text=True).stdout.split("\n")
        for line in listing:
            p = Path(line)
            if p.name == "index.theme" and p.parent.parent == Path("/usr/share/icons") and p.is_file():
                family = p.parent.name if pkg in THEME_FAMILIES else FAMILY_OF_PACKAGE.get(pkg, pkg)
                themes.setdefault(p.parent.name, Theme(p.parent.name, str(p.parent), pkg, family))
    return [themes[k] for k in sorted(themes)]


def folder_themes(folders: Sequence[str | os.PathLike]) -> List[Theme]:
    """Themes from folders: each a theme (it has ``index.theme``) or a folder of themes; each theme
    its own family, no package."""
    themes = {}
    for folder in folders:
        folder = Path(folder)
        found = [folder] if (folder / "index.theme").is_file() else sorted(
            p.parent for p in folder.glob("*/index.theme"))
        for t in found:
            themes.setdefault(t.name, Theme(t.name, str(t), "", t.name))
    return [themes[k] for k in sorted(themes)]


def read_index_theme(theme_dir: str | os.PathLike) -> Dict[str, Dict[str, str]]:
    """``{directory: its keys}`` for the directories ``index.theme`` lists (Directories and
    ScaledDirectories), keys as written."""
    cp = configparser.ConfigParser(interpolation=None, strict=False)
    cp.optionxform = str
    try:
        cp.read(Path(theme_dir) / "index.theme", encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError):
        return {}
    if not cp.has_section("Icon Theme"):
        return {}
    head = cp["Icon Theme"]
    listed = [d.strip() for key in ("Directories", "ScaledDirectories")
              for d in head.get(key, "").split(",") if d.strip()]
    return {d: dict(cp[d]) if cp.has_section(d) else {} for d in dict.fromkeys(listed)}


def _int(value, default: int) -> int:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return default


# -- sources -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """One icon file a theme draws a name with."""

    path: str          # as found (may be a link)
    real: str          # the file it resolves to
    kind: str          # "png" or "svg"
    size: int          # the directory's nominal size (index.theme Size; Scalable: max(Size, MaxSize))
    pixels: int        # Size * Scale (a PNG's pixels)


def skip_reason(name: str) -> Optional[str]:
    """Why an icon name is not a class candidate (None: it is one)."""
    if name.endswith("-symbolic") or "-symbolic-" in name:
        return "symbolic"
    if name.endswith(("-rtl", "-ltr")):
        return "direction variant"
    if name.startswith("."):
        return "hidden file"
    if name.startswith("indicator-keyboard-"):
        return "keyboard layout badge (text)"
    return None


def theme_sources(theme_dir: str | os.PathLike) -> Dict[str, List[Source]]:
    """Every icon file of a theme by name: the directories ``index.theme`` lists, less animations
    and symbolic directories; ``.png``, ``.svg`` and ``.svgz`` files (links followed, broken ones
    left out)."""
    theme_dir = Path(theme_dir)
    out: Dict[str, List[Source]] = {}
    for d, keys in read_index_theme(theme_dir).items():
        if keys.get("Context", "").lower() == "animations" or "symbolic" in d.lower():
            continue
        folder = theme_dir / d
        if not folder.is_dir():
            continue
        size = _int(keys.get("Size"), 0)
        scale = _int(keys.get("Scale"), 1)
        if keys.get("Type", "Threshold") == "Scalable":
            size = max(size, _int(keys.get("MaxSize"), size))
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            stem, ext = os.path.splitext(entry.name)
            ext = ext.lower()
            if ext not in ICON_EXTENSIONS:
                continue
            real = os.path.realpath(entry.path)
            if not os.path.isfile(real):
                continue
            kind = "png" if ext == ".png" else "svg"
            out.setdefault(stem, []).append(Source(entry.path, real, kind, size, size * scale))
    return out


def best_source(sources: Sequence[Source], size: int) -> tuple[Source, str]:
    """The file to draw a name from at ``size`` pixels, and how: the largest PNG of at least
    ``size`` pixels ("png"); else the SVG whose directory's size is the smallest at least ``size``,
    else the largest ("svg"); else the largest PNG, upscaled ("png upscaled")."""
    pngs = sorted((s for s in sources if s.kind == "png"), key=lambda s: (-s.pixels, s.path))
    if pngs and pngs[0].pixels >= size:
        return pngs[0], "png"
    svgs = sorted((s for s in sources if s.kind == "svg"),
                  key=lambda s: (s.size < size, s.size if s.size >= size else -s.size, s.path))
    if svgs:
        return svgs[0], "svg"
    return pngs[0], "png upscaled"


def file_digest(path: str, cache: Optional[Dict[str, str]] = None) -> str:
    """sha1 of a file's bytes (``cache`` by path)."""
    if cache is not None and path in cache:
        return cache[path]
    with open(path, "rb") as f:
        digest = hashlib.sha1(f.read()).hexdigest()
    if cache is not None:
        cache[path] = digest
    return digest


@dataclass
class ThemeScan:
    """One theme's names: the chosen source of each, and the drawings (groups of names one file
    draws, :func:`scan_theme`)."""

    theme: Theme
    chosen: Dict[str, tuple[Source, str]]       # name -> (source, how)
    groups: List[List[str]]                     # names drawn with one file (singletons included)
    skipped: Dict[str, int] = field(default_factory=dict)


def scan_theme(theme: Theme, size: int, digests: Optional[Dict[str, str]] = None,
               min_pixels: int = 0) -> ThemeScan:
    """A theme's names and their best sources (a name whose best is a PNG under ``min_pixels`` is
    skipped); names that share a resolved file at any size, or whose chosen files have the same
    bytes, are one group (one drawing)."""
    sources = theme_sources(theme.path)
    chosen: Dict[str, tuple[Source, str]] = {}
    skipped: Counter = Counter()
    for name, found in sources.items():
        why = skip_reason(name)
        if why:
            skipped[why] += 1
            continue
        best = best_source(found, size)
        if best[0].kind == "png" and best[0].pixels < min_pixels:
            skipped[f"PNG under {min_pixels} px"] += 1
            continue
        chosen[name] = best
    parent = {n: n for n in chosen}

    def root(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    owner_of_key: Dict[str, str] = {}
    for name in sorted(chosen):
        keys = {s.real for s in sources[name]} | {"sha1:" + file_digest(chosen[name][0].real, digests)}
        for key in keys:
            other = owner_of_key.setdefault(key, name)
            if other != name:
                parent[root(name)] = root(other)
    groups: Dict[str, List[str]] = defaultdict(list)
    for name in sorted(chosen):
        groups[root(name)].append(name)
    return ThemeScan(theme, chosen, list(groups.values()), dict(skipped))


# -- aliases -------------------------------------------------------------------------------------------

def name_spread(scans: Sequence[ThemeScan]) -> Counter:
    """For each name, how many families have it."""
    names_by_family: Dict[str, set] = defaultdict(set)
    for s in scans:
        names_by_family[s.theme.family].update(s.chosen)
    spread: Counter = Counter()
    for names in names_by_family.values():
        spread.update(names)
    return spread


def rank_key(spread: Counter):
    """Sort key: larger spread first, then the name."""
    return lambda name: (-spread[name], name)


def alias_classes(scans: Sequence[ThemeScan], candidates: Iterable[str], spread: Counter) -> Dict[str, tuple]:
    """``{name: (kept name, families drawing both with one file, families drawing both)}`` for the
    candidate names that are aliases of a candidate with a larger spread (module docstring, 3a)."""
    cand = set(candidates)
    names_by_family: Dict[str, set] = defaultdict(set)
    together: Dict[tuple, set] = defaultdict(set)      # pair -> families that draw it with one file
    for s in scans:
        names_by_family[s.theme.family].update(s.chosen)
        for g in s.groups:
            g = sorted(n for n in g if n in cand)
            for i, a in enumerate(g):
                for b in g[i + 1:]:
                    together[(a, b)].add(s.theme.family)
    partners: Dict[str, List[str]] = defaultdict(list)
    for a, b in together:
        partners[a].append(b)
        partners[b].append(a)
    key = rank_key(spread)
    kept: set = set()
    dropped: Dict[str, tuple] = {}
    for name in sorted(cand, key=key):
        for other in sorted(partners.get(name, ()), key=key):
            if other not in kept:
                continue
            same = len(together[tuple(sorted((name, other)))])
            both = sum(name in ns and other in ns for ns in names_by_family.values())
            if same >= both - same:
                dropped[name] = (other, same, both)
                break
        else:
            kept.add(name)
    return dropped


def theme_instances(scans: Sequence[ThemeScan], classes: Iterable[str], spread: Counter) -> Dict[str, List[int]]:
    """``{class: indices of the scans whose drawing it owns}`` (module docstring, 3b)."""
    cls = set(classes)
    key = rank_key(spread)
    owned: Dict[str, List[int]] = defaultdict(list)
    for j, s in enumerate(scans):
        for g in s.groups:
            members = [n for n in g if n in cls]
            if members:
                owned[min(members, key=key)].append(j)
    return owned


# -- rendering -----------------------------------------------------------------------------------------

def svg_renderer() -> Optional[str]:
    """The ``rsvg-convert`` program (Debian's ``librsvg2-bin``), or None."""
    return shutil.which("rsvg-convert")


def load_rgba(source: Source, size: int):
    """A source as a Pillow RGBA image: an SVG rendered by ``rsvg-convert`` to fit ``size`` pixels
    (aspect kept); a PNG as it is. Raises ``OSError`` when it cannot be read."""
    from PIL import Image

    if source.kind == "svg":
        exe = svg_renderer()
        if exe is None:
            raise OSError("rsvg-convert not found (apt-get install librsvg2-bin)")
        r = subprocess.run([exe, "-w", str(size), "-h", str(size), "-a", "-f", "png", source.real],
                           capture_output=True, timeout=60)
        if r.returncode != 0 or not r.stdout:
            raise OSError(f"rsvg-convert failed: {r.stderr.decode(errors='replace').strip()[:200]}")
        data = io.BytesIO(r.stdout)
    else:
        data = source.real
    with Image.open(data) as im:
        im.load()
        return im.convert("RGBA")


def on_white(image, size: int) -> np.ndarray:
    """An RGBA image composited onto white, scaled to fit ``size`` square (aspect kept, Lanczos;
    compositing first is the same as scaling with premultiplied alpha) and centred on white:
    ``(size, size, 3)`` uint8."""
    from PIL import Image

    flat = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    w, h = flat.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    if (nw, nh) != (w, h):
        flat = flat.resize((nw, nh), Image.LANCZOS)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(flat, ((size - nw) // 2, (size - nh) // 2))
    return np.array(canvas, dtype=np.uint8)


def is_blank(image: np.ndarray, ink: float = 0.25, min_fraction: float = 0.005) -> bool:
    """Whether a render on white shows (almost) nothing: fewer than ``min_fraction`` of its pixels
    differ from white by ``ink`` or more in some channel (a light glyph drawn for dark panels)."""
    darkness = 255 - image.min(axis=-1)
    return bool((darkness >= ink * 255).mean() < min_fraction)


def render_icon(source: Source, size: int) -> np.ndarray:
    """``(size, size, 3)`` uint8: the source drawn on white (:func:`load_rgba`, :func:`on_white`)."""
    return on_white(load_rgba(source, size), size)


def ink_difference(a: np.ndarray, b: np.ndarray, ground: float = 0.05) -> np.ndarray:
    """Pairwise difference of renders on white, ``(n, H, W, 3)`` and ``(m, H, W, 3)`` uint8 ->
    ``(n, m)``: the mean absolute difference (0-1, mean over the channels) over the pixels that
    either render draws on (some channel darker than white by more than ``ground``); 0 for two
    white squares."""
    x = a.astype(np.float32).reshape(len(a), -1, 3) / 255.0
    y = b.astype(np.float32).reshape(len(b), -1, 3) / 255.0
    ink_x, ink_y = x.min(-1) < 1 - ground, y.min(-1) < 1 - ground
    out = np.zeros((len(a), len(b)), dtype=np.float32)
    for i in range(len(a)):
        diff = np.abs(x[i][None] - y).mean(-1)                  # (m, P)
        ink = (ink_x[i][None] | ink_y).sum(-1)
        out[i] = diff.sum(-1) / np.maximum(ink, 1)
    return out


# -- the benchmark -------------------------------------------------------------------------------------

@dataclass
class IconBenchmark:
    """What :func:`build_benchmark` keeps: per class, its renders and the themes they came from."""

    themes: List[Theme]
    classes: List[str]                  # kept icon names, sorted
    renders: List[np.ndarray]           # per class: (n_i, size, size, 3) uint8
    theme_ids: List[List[int]]          # per class: index into ``themes`` of each render
    manifest: Dict


def class_order(themes: Sequence[Theme], candidates: Sequence[int], name: str, seed: int) -> List[int]:
    """The candidate themes of one class in the glyph builder's order: round-robin over families,
    families and the themes within each in an order drawn from ``seed`` and the name."""
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    sub = [themes[j] for j in candidates]
    return [candidates[i] for i in face_order(sub, np.ones((len(sub), 1), dtype=bool), rng)]


def select_renders(name: str, order: Sequence[int], scans: Sequence[ThemeScan], size: int, *,
                   instance_threshold: float, max_instances: int, max_per_family: int,
                   log_drop) -> tuple[List[int], List[np.ndarray]]:
    """Visit ``order`` (scan indices), render, keep distinct non-blank renders (module docstring, 4)."""
    kept_ids: List[int] = []
    kept: List[np.ndarray] = []
    per_family: Counter = Counter()
    for j in order:
        if max_instances and len(kept) >= max_instances:
            break
        fam = scans[j].theme.family
        if max_per_family and per_family[fam] >= max_per_family:
            continue
        source, _ = scans[j].chosen[name]
        try:
            img = render_icon(source, size)
        except (OSError, ValueError, subprocess.TimeoutExpired) as e:
            log_drop("render failed", name, j, str(e)[:200])
            continue
        if is_blank(img):
            log_drop("blank on white", name, j)
            continue
        if kept and not bool((ink_difference(img[None], np.stack(kept))[0] >= instance_threshold).all()):
            log_drop("duplicate", name, j)
            continue
        kept_ids.append(j)
        kept.append(img)
        per_family[fam] += 1
    return kept_ids, kept


def lookalike_instances(classes: Sequence[str], theme_ids: Sequence[Sequence[int]], renders: Sequence[np.ndarray],
                        themes: Sequence[Theme], spread: Counter, threshold: float,
                        screen: float = 0.05) -> List[tuple[int, int, int]]:
    """``(class, render index, class it looks like)`` for renders that, within one family, differ
    from a render of a class with a larger spread by less than ``threshold`` (:func:`ink_difference`).
    Pairs are screened on 16x16 grey thumbnails (mean absolute difference under ``screen``, which
    an ink difference under ``screen`` implies), then checked at full size."""
    by_family: Dict[str, List[tuple[int, int]]] = defaultdict(list)
    for c, ids in enumerate(theme_ids):
        for r, j in enumerate(ids):
            by_family[themes[j].family].append((c, r))
    key = rank_key(spread)
    found = []
    for fam, items in sorted(by_family.items()):
        if len(items) < 2:
            continue
        imgs = np.stack([renders[c][r] for c, r in items])
        n, s = len(imgs), imgs.shape[1]
        k = max(1, s // 16)
        thumbs = imgs[:, : s // k * k, : s // k * k].mean(-1).reshape(n, s // k, k, s // k, k).mean((2, 4))
        d = mean_abs_difference(thumbs.astype(np.uint8), thumbs.astype(np.uint8))
        for a, b in zip(*np.nonzero(np.triu(d < screen, k=1))):
            (ca, ra), (cb, rb) = items[a], items[b]
            if ca == cb or ink_difference(imgs[a][None], imgs[b][None])[0, 0] >= threshold:
                continue
            lose, win = ((cb, rb), ca) if key(classes[ca]) < key(classes[cb]) else ((ca, ra), cb)
            found.append((lose[0], lose[1], win))
    return sorted(set(found))


def build_benchmark(themes: Sequence[Theme], *, size: int = 64, min_source_pixels: Optional[int] = None,
                    instance_threshold: float = 0.12, lookalike_threshold: float = 0.01, min_instances: int = 4,
                    max_instances: int = 12, max_per_family: int = 1, seed: int = 0, log=print) -> IconBenchmark:
    """Scan ``themes``, choose classes and keep distinct renders (module docstring)."""
    t0 = time.perf_counter()
    used = [t for t in themes if exclusion(t.name) is None]
    digests: Dict[str, str] = {}
    min_source_pixels = size // 2 if min_source_pixels is None else min_source_pixels
    scans = [scan_theme(t, size, digests, min_source_pixels) for t in used]
    log(f"scanned {len(scans)} themes ({sum(len(s.chosen) for s in scans)} names) in {time.perf_counter() - t0:.0f} s")
    spread = name_spread(scans)
    candidates = sorted(n for n, k in spread.items() if k >= min_instances)
    aliases = alias_classes(scans, candidates, spread)
    classes0 = [n for n in candidates if n not in aliases]
    owned = theme_instances(scans, classes0, spread)
    drops: Dict[str, list] = defaultdict(list)

    def log_drop(why, name, j, detail=None):
        drops[why].append({"class": name, "theme": scans[j].theme.name, **({"detail": detail} if detail else {})})

    few_families, kept_names, kept_ids, kept_renders = [], [], [], []
    for name in classes0:
        cand = owned.get(name, [])
        if len({scans[j].theme.family for j in cand}) < min_instances:
            few_families.append(name)
            continue
        order = class_order([s.theme for s in scans], cand, name, seed)
        ids, imgs = select_renders(name, order, scans, size, instance_threshold=instance_threshold,
                                   max_instances=max_instances, max_per_family=max_per_family, log_drop=log_drop)
        kept_names.append(name)
        kept_ids.append(ids)
        kept_renders.append(np.stack(imgs) if imgs else np.zeros((0, size, size, 3), np.uint8))
    log(f"rendered {sum(len(r) for r in kept_renders)} drawings of {len(kept_names)} names "
        f"in {time.perf_counter() - t0:.0f} s")
    lookalikes = lookalike_instances(kept_names, kept_ids, kept_renders, [s.theme for s in scans], spread,
                                     lookalike_threshold)
    lose: Dict[int, set] = defaultdict(set)
    for c, r, win in lookalikes:
        lose[c].add(r)
        drops["looks like another class's drawing in the same family"].append(
            {"class": kept_names[c], "theme": scans[kept_ids[c][r]].theme.name, "like": kept_names[win]})
    classes, renders, theme_ids, too_few = [], [], [], []
    for c, name in enumerate(kept_names):
        keep = [r for r in range(len(kept_ids[c])) if r not in lose[c]]
        if len(keep) < min_instances:
            too_few.append(name)
            continue
        classes.append(name)
        renders.append(kept_renders[c][keep])
        theme_ids.append([kept_ids[c][r] for r in keep])
    manifest = _manifest(themes, scans, classes, theme_ids, spread, aliases, few_families, too_few, drops,
                         dict(size=size, min_source_pixels=min_source_pixels, instance_threshold=instance_threshold,
                              lookalike_threshold=lookalike_threshold, difference="ink_difference",
                              min_instances=min_instances, max_instances=max_instances,
                              max_per_family=max_per_family, seed=seed),
                         time.perf_counter() - t0)
    return IconBenchmark([s.theme for s in scans], classes, renders, theme_ids, manifest)


def _manifest(themes, scans, classes, theme_ids, spread, aliases, few_families, too_few, drops, params,
              seconds) -> Dict:
    per_class = [len(ids) for ids in theme_ids]
    kept_by_theme: Counter = Counter(j for ids in theme_ids for j in ids)
    how_by_theme: Dict[int, Counter] = defaultdict(Counter)
    alias_members: Dict[str, List[str]] = defaultdict(list)
    for name, (other, _, _) in aliases.items():
        alias_members[other].append(name)
    details = []
    for name, ids in zip(classes, theme_ids):
        inst = []
        for j in ids:
            source, how = scans[j].chosen[name]
            how_by_theme[j][how] += 1
            inst.append({"theme": scans[j].theme.name, "family": scans[j].theme.family, "source": source.path,
                         "file": source.real, "how": how})
        details.append({"folder": name, "spread": spread[name], "instances": inst,
                        "aliases_dropped": sorted(alias_members.get(name, []))})
    scanned = {s.theme.name: j for j, s in enumerate(scans)}
    theme_rows = []
    for t in themes:
        row = {**asdict(t), "used": t.name in scanned}
        if t.name in scanned:
            s = scans[scanned[t.name]]
            row.update(names=len(s.chosen), drawings=len(s.groups), skipped_names=s.skipped,
                       kept=kept_by_theme[scanned[t.name]], kept_by_source=dict(how_by_theme[scanned[t.name]]))
        else:
            row["excluded"] = exclusion(t.name)
        theme_rows.append(row)
    return {
        **params,
        "background": "white", "mode": "RGB",
        "classes": len(classes), "images": int(sum(per_class)),
        "instances_per_class": {"min": min(per_class, default=0),
                                "median": statistics.median(per_class) if per_class else 0,
                                "max": max(per_class, default=0),
                                "histogram": {str(k): v for k, v in sorted(Counter(per_class).items())}},
        "themes": theme_rows,
        "families": sorted({s.theme.family for s in scans}),
        "class_rules": {
            "alias": "two names are one concept when, in at least as many families as draw them apart, a theme "
                     "draws them with one file (a shared resolved path at some size, or the same bytes); the "
                     "name more families have is the class, the other is dropped (dropped.alias_of)",
            "shared drawing": "within a theme a drawing counts once: it is an instance only of the class that "
                              "more families have among the names reaching it",
            "duplicate": "per class, a render is kept when its ink_difference (mean absolute difference over "
                         "the pixels either render draws on) from every render kept before it in the class's "
                         "round-robin order is at least instance_threshold",
            "lookalike": "within a family, a render that differs from another class's render by less than "
                         "lookalike_threshold stays only with the class more families have",
            "skipped names": "-symbolic names (monochrome glyphs), -rtl/-ltr direction variants, "
                             "indicator-keyboard-* (a keyboard layout's code set as text), names whose best "
                             "source is a PNG under min_source_pixels (too small to upscale)",
        },
        "dropped": {
            "alias_of": {n: {"class": o, "families_one_file": a, "families_with_both": b}
                         for n, (o, a, b) in sorted(aliases.items())},
            "names_seen": len(spread),
            "names_in_fewer_than_min_families": sum(k < params["min_instances"] for k in spread.values()),
            "fewer_than_min_families_after_sharing": few_families,
            "fewer_than_min_distinct_renders": too_few,
            "renders": {why: items for why, items in sorted(drops.items())},
            "render_counts": {why: len(items) for why, items in sorted(drops.items())},
        },
        "classes_detail": details,
        "seconds": round(seconds, 1),
    }


def write_image_folder(bench: IconBenchmark, out: str | os.PathLike, extra: Optional[Dict] = None) -> Path:
    """``out/<icon name>/<theme>.png`` per render (8-bit RGB) and ``out/manifest.json`` (plus
    ``extra``); an existing ``out`` made by this script (it has a manifest) is replaced, any other
    non-empty folder is refused."""
    from PIL import Image

    out = fresh_output_folder(out)
    for name, imgs, ids in zip(bench.classes, bench.renders, bench.theme_ids):
        folder = out / name
        folder.mkdir()
        for img, j in zip(imgs, ids):
            Image.fromarray(img, mode="RGB").save(folder / f"{bench.themes[j].name}.png")
    (out / "manifest.json").write_text(json.dumps({**bench.manifest, **(extra or {})}, indent=1))
    return out


def main(argv: Optional[Iterable[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="the image folder to write (e.g. /tmp/suite/icons)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--min-source-pixels", type=int, default=None,
                    help="smallest PNG to upscale when a theme has no larger PNG nor an SVG (default --size / 2)")
    ap.add_argument("--instance-threshold", type=float, default=0.12,
                    help="renders of one class differ at least this much (ink_difference)")
    ap.add_argument("--lookalike-threshold", type=float, default=0.01,
                    help="renders of two classes in one family differing less are one drawing (a copy, not a "
                         "template: a theme's mimetype icons share a page and differ in a small glyph)")
    ap.add_argument("--min-instances", type=int, default=4)
    ap.add_argument("--max-instances", type=int, default=12, help="renders kept per class at most (0: all)")
    ap.add_argument("--max-per-family", type=int, default=1, help="renders kept per class and family (0: all)")
    ap.add_argument("--seed", type=int, default=0, help="draws each class's themes (families in random order)")
    ap.add_argument("--themes", nargs="+", help="theme folders (or folders of themes) instead of the Debian packages")
    ap.add_argument("--no-install", action="store_true", help="do not apt-get install missing packages")
    args = ap.parse_args(list(argv) if argv is not None else None)
    t0 = time.perf_counter()
    if svg_renderer() is None:
        if args.no_install or os.geteuid() != 0:
            raise SystemExit("rsvg-convert not found: apt-get install librsvg2-bin")
        install_packages(["librsvg2-bin"], what="SVG renderer")
    if args.themes:
        themes, packages = folder_themes(args.themes), {}
    else:
        if not args.no_install:
            install_packages(PACKAGES, what="icon theme")
        themes = package_themes(PACKAGES)
        have = installed_packages(PACKAGES)
        packages = {"packages_asked": list(PACKAGES), "packages_installed": have,
                    "packages_missing": [p for p in PACKAGES if p not in have]}
    if sum(exclusion(t.name) is None for t in themes) < args.min_instances:
        raise SystemExit(f"fewer than {args.min_instances} usable icon themes found: install the packages "
                         "(drop --no-install) or give --themes")
    bench = build_benchmark(themes, size=args.size, min_source_pixels=args.min_source_pixels,
                            instance_threshold=args.instance_threshold,
                            lookalike_threshold=args.lookalike_threshold, min_instances=args.min_instances,
                            max_instances=args.max_instances, max_per_family=args.max_per_family, seed=args.seed)
    out = write_image_folder(bench, args.out, packages)
    m = bench.manifest
    print(f"{'theme':<26}{'family':<28}{'names':>7}{'kept':>6}  sources kept")
    for t in m["themes"]:
        if t["used"]:
            print(f"{t['name'][:25]:<26}{t['family'][:27]:<28}{t['names']:>7}{t['kept']:>6}  {t['kept_by_source']}")
    print(f"left out: {', '.join(t['name'] for t in m['themes'] if not t['used'])}")
    ipc = m["instances_per_class"]
    d = m["dropped"]
    print(f"kept {m['classes']} classes, {m['images']} images (instances per class min {ipc['min']} / median "
          f"{ipc['median']} / max {ipc['max']}) from {len(m['families'])} families; dropped "
          f"{len(d['alias_of'])} aliases, {d['names_in_fewer_than_min_families']} of {d['names_seen']} names in "
          f"fewer than {args.min_instances} families (and {len(d['fewer_than_min_families_after_sharing'])} once "
          f"shared drawings count once), {len(d['fewer_than_min_distinct_renders'])} with too few distinct "
          f"renders; renders dropped: {d['render_counts']}; {time.perf_counter() - t0:.0f} s; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
