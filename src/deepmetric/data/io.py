"""Reading things from disk: images, list files, and the generic image-list dataset.

Every error here is a :class:`~deepmetric.data.base.DataError` whose one-line message names the
file (and the line, for list files) and says what was expected, so a broken download is found
from the message alone.

Decompression-bomb policy: :func:`load_image` refuses images with more than ``max_pixels`` pixels
(default :data:`DEFAULT_MAX_PIXELS`, PIL's own hard limit) by reading the header size before any
pixel is decoded. The limit can only be lowered per call; raising it above PIL's is a process-wide
decision the caller makes explicitly with ``PIL.Image.MAX_IMAGE_PIXELS`` (we never change it).
Truncated files are errors, never silently padded (``ImageFile.LOAD_TRUNCATED_IMAGES`` stays off).
"""
from __future__ import annotations

import csv
import io
import os
import struct
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..core.images import FILE_MAX_PIXELS, IMAGE_EXTENSIONS, ImageError, load_image_file, orientation
from .base import DataError, MetricDataset

#: PIL raises DecompressionBombError above twice its warning limit; we use the same ceiling.
DEFAULT_MAX_PIXELS = FILE_MAX_PIXELS


def load_image(path: str | os.PathLike, max_pixels: Optional[int] = None, channels: Optional[int] = None) -> Image.Image:
    """Open ``path`` fully and return it as an RGB ``PIL.Image`` (``L`` with ``channels=1``), decoded
    by :func:`deepmetric.core.images.decode_image`: the one decode of training, evaluation and
    serving (EXIF orientation applied, 16-bit greyscale scaled to 8 bits, transparency composited
    onto white).

    PIL opens lazily (only the header); pixels are decoded by ``load()``, which is where truncated
    or corrupt data fails, so both happen inside the ``try``.

    Raises:
        DataError: missing file, unreadable/corrupt/truncated image, or more than ``max_pixels``
            pixels; the message names the file.
    """
    try:
        return load_image_file(path, mode="L" if channels == 1 else "RGB", max_pixels=max_pixels)
    except ImageError as e:
        raise DataError(str(e)) from None


_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_header(data: bytes) -> Optional[tuple[int, int, int, int]]:
    """``(width, height, bit depth, colour type)`` from a PNG's IHDR chunk (always the first)."""
    if len(data) < 26 or data[12:16] != b"IHDR":
        return None
    w, h = struct.unpack(">II", data[16:24])
    return w, h, data[24], data[25]


def _png_has_transparency(data: bytes) -> bool:
    """Whether a PNG has a ``tRNS`` chunk (a transparent colour or palette alpha), which comes before IDAT."""
    idat = data.find(b"IDAT")
    return data.find(b"tRNS", 0, idat if idat >= 0 else len(data)) >= 0


def read_image_tensor(path: str | os.PathLike, max_pixels: Optional[int] = None,
                      channels: Optional[int] = None) -> torch.Tensor:
    """Decode ``path`` into a ``(3, H, W) uint8`` tensor, the fast way where it is safe.

    Upright JPEGs and 8-bit greyscale or RGB PNGs without transparency are decoded by
    ``torchvision.io`` (libjpeg-turbo / libpng into a tensor, no PIL image in between;
    ``benchmarks/bench_decode.py`` compares it with Pillow): the same pixels as :func:`load_image`
    (the same libjpeg-turbo decode; CMYK and grey JPEGs become RGB alike, pinned by tests). Everything
    else (EXIF-rotated JPEGs, 16-bit, palette and transparent PNGs, other formats, any file torchvision
    refuses) goes through :func:`load_image`, the one decode, so errors (truncated, corrupt, missing,
    bombs) are the same one-line :class:`DataError` naming the file. The file is read once; its
    header is checked against ``max_pixels`` before decoding.

    ``channels=1`` (the caller converts to greyscale next, :class:`~deepmetric.data.transforms.ToChannels`)
    returns greyscale images as their one ``(1, H, W)`` channel: the pixels the conversion of their
    RGB decode gives (grey ``v`` stays ``v``), without decoding three copies and converting them back
    (0.27 ms -> 0.10 ms for a 32 x 32 glyph).
    """
    from torchvision.io import ImageReadMode, decode_image

    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        data = b""  # missing file, directory, permissions: load_image words the error
    if data.startswith(_JPEG_MAGIC) or data.startswith(_PNG_MAGIC):
        try:
            png = _png_header(data) if data.startswith(_PNG_MAGIC) else None
            if png is not None:
                w, h = png[:2]
                plain = png[2] == 8 and png[3] in (0, 2) and not _png_has_transparency(data)
            else:
                with Image.open(io.BytesIO(data)) as header:  # header only: the size, before any pixel
                    w, h = header.size
                    plain = orientation(header) == 1
            grey = channels == 1 and png is not None and png[3] == 0
            limit = DEFAULT_MAX_PIXELS if max_pixels is None else int(max_pixels)
            if plain and w * h <= limit:
                out = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                   mode=ImageReadMode.GRAY if grey else ImageReadMode.RGB)
                if out.dtype == torch.uint8 and out.shape[-2:] == (h, w):
                    return out
        except (RuntimeError, OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            pass  # load_image re-reads it and says exactly what is wrong
    img = load_image(path, max_pixels, channels)
    arr = np.array(img, dtype=np.uint8)
    return torch.from_numpy((arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)).copy())


# ---------------------------------------------------------------------------------------------
# list files


@dataclass(frozen=True)
class Row:
    """One data line of a list file: its 1-based ``line`` number and its ``fields`` (strings)."""

    line: int
    fields: tuple[str, ...]


def read_rows(path: str | os.PathLike, *, sep: Optional[str] = None, skip_lines: int = 0,
              maxsplit: int = -1) -> list[Row]:
    """Non-blank lines of a text list file split on ``sep`` (whitespace when ``None``).

    Field counts may vary; :func:`read_table` checks them. Raises :class:`DataError` when the file
    is missing or not UTF-8 text.
    """
    path = os.fspath(path)
    rows: list[Row] = []
    for lineno, text in _lines(path):
        text = text.strip()
        if lineno <= skip_lines or not text:
            continue
        fields = text.split(sep, maxsplit) if sep is None else [f.strip() for f in text.split(sep, maxsplit)]
        rows.append(Row(lineno, tuple(fields)))
    return rows


def read_table(
    path: str | os.PathLike,
    columns: Sequence[str],
    *,
    sep: Optional[str] = None,
    skip_lines: int = 0,
    header_if: Optional[Callable[[tuple[str, ...]], bool]] = None,
    last_column_may_contain_sep: bool = False,
) -> list[Row]:
    """Read a whitespace- (``sep=None``) or ``sep``-separated list file with a fixed column count.

    Args:
        columns: the expected column names, used for the count and in error messages.
        skip_lines: leading lines skipped unconditionally (counts, headers).
        header_if: called on the first remaining row's fields; if True that row is a header
            and skipped (``lambda f: f[0] == "image_id"`` for the SOP lists).
        last_column_may_contain_sep: split at most ``len(columns) - 1`` times so the last column
            (a path) may contain spaces.

    Blank lines are skipped. Raises :class:`DataError`
    (``"Ebay_train.txt line 17: expected 4 columns 'image_id class_id super_class_id path', got 3"``).
    """
    path = os.fspath(path)
    n = len(columns)
    rows = read_rows(path, sep=sep, skip_lines=skip_lines, maxsplit=n - 1 if last_column_may_contain_sep else -1)
    if rows and header_if is not None and header_if(rows[0].fields):
        rows = rows[1:]
    for r in rows:
        if len(r.fields) != n:
            raise DataError(
                f"{path} line {r.line}: expected {n} columns '{' '.join(columns)}', got {len(r.fields)}"
            )
    return rows


def read_csv(path: str | os.PathLike, required: Sequence[str], delimiter: str = ",") -> list[tuple[int, dict]]:
    """Read a CSV with a header row; returns ``(line_number, {column: value})`` per data row.

    Raises :class:`DataError` naming the file when a required column is missing from the header or
    a row has the wrong number of cells.
    """
    path = os.fspath(path)
    _require_file(path, "CSV list file")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise DataError(f"{path}: empty file, expected a header row naming the columns") from None
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(
                f"{path}: header has no column {', '.join(repr(m) for m in missing)} "
                f"(found {', '.join(repr(h) for h in header)})"
            )
        out = []
        for cells in reader:
            lineno = reader.line_num
            if not cells or all(not c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                raise DataError(
                    f"{path} line {lineno}: expected {len(header)} cells "
                    f"'{delimiter.join(header)}', got {len(cells)}"
                )
            out.append((lineno, {h: c.strip() for h, c in zip(header, cells)}))
    return out


def to_int(value: str, path: str, line: int, column: str) -> int:
    """``int(value)`` or a :class:`DataError` naming file, line and column."""
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{path} line {line}: column '{column}' should be an integer, got {value!r}") from None


def _lines(path: str) -> Iterator[tuple[int, str]]:
    _require_file(path, "list file")
    try:
        with open(path, encoding="utf-8-sig") as f:
            for lineno, text in enumerate(f, start=1):
                yield lineno, text
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise DataError(f"{path}: {what} not found")


# ---------------------------------------------------------------------------------------------
# dataset roots


def require_root(root: Optional[str | os.PathLike], fmt: str, expected: str) -> str:
    """Check that ``root`` names an existing folder; ``expected`` says what it should hold.

    Raises :class:`DataError`: ``"sop: no data root given (set root to ...)"`` or
    ``"SOP root /x: folder not found (expected ...)"``.
    """
    if root is None or not str(root).strip():
        raise DataError(f"{fmt}: no data root given (set {{root}} to {expected})", "root")
    path = os.path.expanduser(os.fspath(root))
    if not os.path.isdir(path):
        what = "is a file, not a folder" if os.path.exists(path) else "folder not found"
        raise DataError(f"{fmt} root {path}: {what} (expected {expected})")
    return path


def find_images(root: str, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> tuple[list[str], list[str], np.ndarray]:
    """The images below ``root``: ``(class names, paths relative to root, labels (N,) int64)``.

    Class ``i`` is the ``i``-th subfolder in sorted name order and holds the images anywhere below it;
    images lying directly in ``root`` get label -1. Hidden files and folders are skipped; paths come
    in sorted order (those in ``root`` first, then each class folder's, depth first). Symbolic links
    are followed (a data set assembled by linking folders from several places), each real folder once:
    a link back to a folder already walked (a loop, or a second link to it) is not entered again.
    """
    exts = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions)
    with os.scandir(root) as it:
        names = sorted(e.name for e in it if e.is_dir() and not e.name.startswith("."))
    index = {n: i for i, n in enumerate(names)}
    paths: list[str] = []
    labels: list[int] = []
    seen: set[tuple[int, int]] = set()  # the real folders walked (device, inode)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        rel = os.path.relpath(dirpath, root)
        top = rel.split(os.sep)[0]
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:  # a loop, or a folder linked twice
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found = [f for f in sorted(filenames) if not f.startswith(".") and f.lower().endswith(exts)]
        paths += [f if rel == "." else os.path.join(rel, f) for f in found]
        labels += [-1 if rel == "." else index[top]] * len(found)
    return names, paths, np.asarray(labels, dtype=np.int64)


def list_file(root: Optional[str | os.PathLike], file: str, fmt: str, expected: str) -> tuple[str, str]:
    """``(root folder, list file path)`` for a list format whose ``root`` is the folder holding
    ``file`` or the list file itself; :class:`DataError` when either is missing (``expected`` says
    what the file should hold, and that ``{file}`` names it)."""
    if root is not None and os.path.isfile(os.path.expanduser(str(root))):
        root, file = os.path.split(os.path.expanduser(str(root)))
    root = require_root(root, fmt, f"the folder holding {file}")
    path = os.path.join(root, file)
    if not os.path.isfile(path):
        raise DataError(f"{fmt} root {root}: missing {file} (expected {expected}; set {{file}} to its name)", "file")
    return root, path


def descend(root: str, marker: str, subdirs: Sequence[str]) -> str:
    """``root``, or ``root/<subdir>`` when only that holds ``marker`` (the archive's top folder).

    Lets users point at the folder they extracted into as well as the dataset folder itself.
    """
    if os.path.exists(os.path.join(root, marker)):
        return root
    for sub in subdirs:
        if os.path.exists(os.path.join(root, sub, marker)):
            return os.path.join(root, sub)
    return root


def require_in(root: str, name: str, fmt: str, expected: str) -> str:
    """``root/name`` if it exists, else ``DataError("<fmt> root <root>: missing <name> (expected ...)")``."""
    path = os.path.join(root, name)
    if not os.path.exists(path):
        raise DataError(f"{fmt} root {root}: missing {name} (expected {expected})")
    return path


# ---------------------------------------------------------------------------------------------
# the dataset every image format produces


class ImageListDataset(MetricDataset):
    """Images named by a list of paths, loaded lazily with :func:`load_image`.

    Args:
        paths: image paths, relative to ``root`` (or absolute). ``self.paths`` holds the resolved
            paths, so search results and error messages point at real files.
        labels: ``(N,)`` class ids (int64).
        camids: optional ``(N,)`` camera ids.
        root: folder the relative paths are resolved against.
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int] | np.ndarray,
        camids: Optional[Sequence[int] | np.ndarray] = None,
        root: Optional[str | os.PathLike] = None,
        transform: Optional[Callable] = None,
        name: str = "images",
        max_pixels: Optional[int] = None,
    ) -> None:
        self.root = None if root is None else os.fspath(root)
        resolved = [p if self.root is None else os.path.join(self.root, p) for p in map(os.fspath, paths)]
        self.max_pixels = max_pixels
        super().__init__(labels, camids=camids, paths=resolved, transform=transform, name=name)

    def load(self, i: int) -> Image.Image:
        return load_image(self.paths[i], self.max_pixels)

    def read(self, i: int, decoder: str = "pil", channels: Optional[int] = None) -> Image.Image | torch.Tensor | str:
        if decoder == "file":  # the test pipeline decodes it, as deployment does
            return self.paths[i]
        if decoder == "torchvision":
            return read_image_tensor(self.paths[i], self.max_pixels, channels)
        return self.load(i)
