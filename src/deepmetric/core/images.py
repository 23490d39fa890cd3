"""The one image decode: bytes or a file -> a PIL image in the mode a model takes (``L`` or ``RGB``).

Training, evaluation, ``deepmetric embed``, the server, :class:`~deepmetric.inference.Predictor`
and ONNX serving all decode through :func:`decode_image`, so a file means the same pixels
everywhere. It uses numpy and Pillow only (an ONNX server has no PyTorch). What it does, in order:

1. **Format and size from the header**, before any pixel is decoded: only the decoders in
   ``formats`` are tried (never plugins that shell out, such as EPS through Ghostscript), and an
   image of more than ``max_pixels`` pixels is refused (decompression-bomb guard).
2. **Draft decoding** (JPEG only, when ``draft_to`` is given): a decode at 1/2, 1/4 or 1/8 scale in
   the DCT domain while the image stays ``draft_to`` or larger (the caller passes a margin above the
   size it resizes to next).
3. **EXIF orientation** applied (a phone photo stored sideways with orientation 6 comes out upright).
4. **Bit depth**: 16-bit greyscale (PIL modes ``I;16*``, ``I``) becomes 8-bit by its high byte
   (``v >> 8``: the 8-bit image ``v`` saved as 16-bit ``257 v`` decodes back to ``v``); 32-bit float
   (``F``) is taken as [0, 1] when its maximum is at most 1, else as [0, 255]. PIL would clip both
   to 255 (a white image).
5. **Transparency composited onto white** (RGBA, LA, PA and palettes with a transparent colour):
   ``(c a + 255 (255 - a) + 127) // 255`` per channel, so what shows through is a white page, not the
   colour a transparent pixel happens to store.
6. **Mode**: ``L`` (PIL's ITU-R 601-2 luma) or ``RGB`` (grey replicated; CMYK and YCbCr converted).

Errors are :class:`ImageError` s whose one line starts with ``name`` (the file, or ``upload``);
their HTTP status says what kind of problem it is (400, 413 too large, 415 not an image).
"""
from __future__ import annotations

import io
import os
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

#: decoders uploads and files are handed to: never plugins that shell out (EPS -> Ghostscript)
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")
#: PIL raises DecompressionBombError above twice its warning limit; files are refused above that too
FILE_MAX_PIXELS = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)
#: the image file name extensions folders are searched for
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")
#: EXIF orientations that swap width and height
_TRANSPOSED = (5, 6, 7, 8)
_EXIF_ORIENTATION = 0x0112


class ImageError(UserError):
    """An image that cannot be used: corrupt, truncated or empty (HTTP 400)."""

    status = 400


class NotAnImageError(ImageError):
    """Bytes that no accepted decoder recognises (HTTP 415)."""

    status = 415


class ImageTooLargeError(ImageError):
    """An image above the pixel limit, refused from its header (HTTP 413)."""

    status = 413


def orientation(img: Image.Image) -> int:
    """The EXIF orientation of an opened image (1, upright, when it has none or it cannot be read)."""
    try:
        value = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a malformed EXIF block is no orientation
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def to_8bit(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit greyscale (``I;16``, ``I;16B``, ``I``, ``F``) as 8-bit ``L`` (see the module
    docstring); every other mode is returned as it is."""
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.clip(np.asarray(img).astype(np.int64), 0, 65535) >> 8  # any byte order
        return Image.fromarray(arr.astype(np.uint8), "L")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        finite = arr[np.isfinite(arr)]
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        arr = np.nan_to_num(arr * scale, nan=0.0, posinf=255.0, neginf=0.0)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
    return img


def composite_on_white(img: Image.Image) -> Image.Image:
    """An image with transparency (``RGBA``, ``LA``, ``PA``, a palette or ``L``/``RGB`` with a
    transparent colour) as ``RGB`` or ``L`` over a white background; others unchanged."""
    if img.mode in ("P", "L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA" if img.mode in ("P", "RGB") else "LA")
    elif img.mode == "PA":
        img = img.convert("RGBA")
    if img.mode not in ("RGBA", "LA", "La", "RGBa"):
        return img
    if img.mode in ("La", "RGBa"):  # premultiplied alpha: back to straight alpha first
        img = img.convert("LA" if img.mode == "La" else "RGBA")
    arr = np.asarray(img, dtype=np.uint32)
    colour, alpha = arr[..., :-1], arr[..., -1:]
    out = (colour * alpha + 255 * (255 - alpha) + 127) // 255
    mode = "L" if img.mode == "LA" else "RGB"
    return Image.fromarray(out.astype(np.uint8).squeeze(-1) if mode == "L" else out.astype(np.uint8), mode)


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Steps 3-6 of the module docstring on a loaded image: upright, 8-bit, on white, in ``mode``."""
    if mode not in ("L", "RGB"):
        raise ValueError(f"mode must be 'L' or 'RGB', got {mode!r}")
    turn = orientation(img)
    if turn != 1:
        img = ImageOps.exif_transpose(img)
    img = composite_on_white(to_8bit(img))
    return img if img.mode == mode else img.convert(mode)


def decode_image(data: bytes, *, mode: str = "RGB", max_pixels: Optional[int] = None, name: str = "upload",
                 formats: Sequence[str] = ACCEPTED_FORMATS, draft_to: Optional[Tuple[int, int]] = None,
                 too_large_why: str = "decompression-bomb guard") -> Image.Image:
    """Image bytes -> a loaded PIL image in ``mode`` (``"L"`` or ``"RGB"``), as the module says.

    Args:
        data: the file's bytes.
        mode: ``"L"`` (greyscale) or ``"RGB"``.
        max_pixels: refuse images of more pixels, from the header (default :data:`FILE_MAX_PIXELS`).
        name: how messages name the image (``image /path/a.png``, ``upload``).
        formats: the PIL decoders that may open it.
        draft_to: ``(W, H)`` a JPEG may be draft-decoded down to (upright orientation), or None.
        too_large_why: the reason a too-large image is refused, for its message.

    Raises:
        NotAnImageError, ImageTooLargeError, ImageError: one line starting with ``name``.
    """
    limit = FILE_MAX_PIXELS if max_pixels is None else int(max_pixels)
    if not data:
        raise ImageError(f"{name}: empty file; expected an image")
    try:
        img = Image.open(io.BytesIO(data), formats=list(formats))
    except UnidentifiedImageError:
        raise NotAnImageError(f"{name}: not an image: send a JPEG, PNG, WebP, BMP, GIF or TIFF file") from None
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{name}: image too large: {e}") from None
    except Exception as e:  # noqa: BLE001 - malformed headers raise many types
        raise ImageError(f"{name}: cannot read the image header ({type(e).__name__})") from None
    w, h = img.size
    if w * h > limit:  # from the header, before any pixel is decoded
        raise ImageTooLargeError(f"{name}: image is {w}x{h} = {w * h} pixels, above the limit of {limit} "
                                 f"({too_large_why}); use a smaller image")
    try:
        if draft_to is not None and img.format == "JPEG":  # DCT-domain scaling, 1/2 to 1/8
            tw, th = draft_to
            if orientation(img) in _TRANSPOSED:  # the stored image is sideways: so is its target
                tw, th = th, tw
            img.draft(None, (int(tw), int(th)))
        img.load()
        return to_mode(img, mode)
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{name}: image too large: {e}") from None
    except Exception as e:  # noqa: BLE001 - truncated data, decoder errors
        raise ImageError(f"{name}: corrupt or truncated image ({type(e).__name__}: {e})".splitlines()[0]) from None


def read_file(path: str | os.PathLike) -> bytes:
    """The bytes of an image file, or an :class:`ImageError` naming it (missing, a folder, unreadable)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ImageError(f"image {path}: file not found") from None
    except IsADirectoryError:
        raise ImageError(f"image {path}: is a directory, expected an image file") from None
    except OSError as e:
        raise ImageError(f"image {path}: cannot read ({e.strerror or e})") from None


def load_image_file(path: str | os.PathLike, *, mode: str = "RGB", max_pixels: Optional[int] = None,
                    draft_to: Optional[Tuple[int, int]] = None) -> Image.Image:
    """:func:`decode_image` of a file (messages name it: ``image /data/a.png: ...``)."""
    path = os.fspath(path)
    return decode_image(read_file(path), mode=mode, max_pixels=max_pixels, name=f"image {path}", draft_to=draft_to)
