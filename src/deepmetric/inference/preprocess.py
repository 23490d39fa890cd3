"""Image bytes or files -> the model's input array, with numpy and Pillow only (no PyTorch).

:class:`Preprocessing` is the test-time pipeline of a trained model, rebuilt from its metadata
(checkpoint config or ONNX ``metadata_props``, see :mod:`deepmetric.inference.export`): decode with
bounded work, convert to the model's channels, resize and crop as the preset's test pipeline does,
normalise. It equals ``deepmetric.data.transforms.build_transform(preset, train=False)`` applied to
the decoded image (tested per preset), so an ONNX model served without PyTorch sees the same inputs.

Every input is brought to the model's training input size ``(H, W)``: presets that never resize
(``tensor``: digits 8x8, Fashion-MNIST 28x28) are resized to it too, as the model has only ever seen
that size. A model whose input size is unknown (no ``input_size`` and no recorded ``input_shape``)
is run at the image's own size, but only up to :data:`UNSIZED_MAX_PIXELS`.

Bounded decoding (uploads are untrusted; a 236 KB all-black 9000x9000 PNG is 243 MB of pixels):

- the header's ``width x height`` is checked against ``max_pixels`` before any pixel is decoded;
  the default for uploads (:func:`default_max_pixels`) is :data:`PIXELS_PER_INPUT_PIXEL` times the
  model's input pixels, at least :data:`MIN_MAX_PIXELS`;
- JPEGs decode at 1/2, 1/4 or 1/8 scale (``draft``, DCT-domain scaling) while still
  :data:`REDUCING_GAP` times the size the preset resizes to, so the final antialiased resize does the
  filtering (within 2 grey levels of a full-size decode); other formats decode whole (box-reducing
  them after decoding saves no decode time and moves pixels by ~2 grey levels on average);
- decoded pixels therefore take at most ``4 * max_pixels`` bytes per image (RGBA), one float plane
  of the same size at most more while resizing.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..core.errors import UserError

#: decoders uploads and files are handed to: never plugins that shell out (EPS -> Ghostscript)
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM")
#: the default pixel limit for uploads is this many times the model's input pixels ...
PIXELS_PER_INPUT_PIXEL = 256
#: ... and at least this (4096 x 4096: a phone photo passes whatever the model)
MIN_MAX_PIXELS = 4096 * 4096
#: largest image run through a model whose input size is unknown (its own size, up to 1024 x 1024)
UNSIZED_MAX_PIXELS = 1024 * 1024
#: local files (galleries the user owns) are refused only above PIL's own hard limit, as data.io does
FILE_MAX_PIXELS = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)
#: JPEG draft decoding stops while the image is still this many times the preset's resize target
REDUCING_GAP = 3

Size = Tuple[int, int]


class ImageError(UserError):
    """An image that cannot be used: corrupt, truncated or empty (HTTP 400)."""

    status = 400


class NotAnImageError(ImageError):
    """Bytes that no accepted decoder recognises (HTTP 415)."""

    status = 415


class ImageTooLargeError(ImageError):
    """An image above the pixel limit, refused from its header (HTTP 413)."""

    status = 413


def default_max_pixels(input_size: Optional[Size]) -> int:
    """The upload pixel limit for a model of ``input_size`` ``(H, W)`` (``None``: unknown size).

    >>> default_max_pixels((224, 224)), default_max_pixels((448, 448)), default_max_pixels(None)
    (16777216, 51380224, 1048576)
    """
    if input_size is None:
        return UNSIZED_MAX_PIXELS
    return max(MIN_MAX_PIXELS, PIXELS_PER_INPUT_PIXEL * int(input_size[0]) * int(input_size[1]))


# -- the preset test pipelines, as (resize, crop) steps -----------------------------------------------
# Mirrors deepmetric.data.transforms: a test checks each preset against build_transform.

@dataclass(frozen=True)
class _Steps:
    resize: Optional[str]  # "short" (short side to `length`), "exact" (to the input size) or None
    length: int = 0
    resample: int = Image.Resampling.BILINEAR
    crop: bool = False
    float_resize: bool = False  # the tensor presets resize float pixels (torch's antialiased bilinear)


def _steps(preset: str, size: Optional[Size]) -> _Steps:
    if size is None:
        return _Steps(None)
    short = int(round(min(size) * 256 / 224))
    table = {
        "tensor": _Steps("exact", float_resize=True),
        "tensor_augment": _Steps("exact", float_resize=True),
        "paddle_sop": _Steps("short", min(size), Image.Resampling.LANCZOS, crop=True),
        "xbm": _Steps("short", short, crop=True),
        "imagenet": _Steps("short", short, crop=True),
        "reid": _Steps("exact"),
        "face": _Steps("exact"),
    }
    return table.get(preset, _Steps("exact"))


def _short_side_size(w: int, h: int, length: int) -> Size:
    """``(W, H)`` with the short side ``length`` (torchvision's rounding: the long side truncates)."""
    if w <= h:
        return length, int(length * h / w)
    return int(length * w / h), length


def _center_crop(img: Image.Image, size: Size) -> Image.Image:
    """torchvision's CenterCrop: a side shorter than the crop is zero-padded (half each side), then
    the anchor is rounded. PIL's crop fills outside the image with zeros, which is that padding."""
    ch, cw = size
    w, h = img.size
    pad_left = (cw - w) // 2 if cw > w else 0
    pad_top = (ch - h) // 2 if ch > h else 0
    left = int(round((max(w, cw) - cw) / 2.0)) - pad_left
    top = int(round((max(h, ch) - ch) / 2.0)) - pad_top
    return img.crop((left, top, left + cw, top + ch))


@dataclass(frozen=True)
class Preprocessing:
    """A model's test-time input pipeline: ``decode`` (bytes or path -> PIL image, bounded) and
    ``__call__`` (PIL image -> ``(C, H, W) float32``, resized to ``input_size`` and normalised).

    ``input_size``: ``(H, W)`` the model was trained at, ``None`` if unknown (then images are used at
    their own size, up to :data:`UNSIZED_MAX_PIXELS`). ``mean``/``std``: per channel, on pixels in [0, 1].
    """

    preset: str
    input_size: Optional[Size]
    channels: int
    mean: Tuple[float, ...]
    std: Tuple[float, ...]

    @classmethod
    def from_metadata(cls, meta: Dict[str, Any]) -> "Preprocessing":
        """From export metadata: ``preset``, ``input_size`` (or ``input_shape`` ``[C, H, W]``),
        ``channels``, ``mean``, ``std``, ``normalization_in_graph``."""
        c = int(meta["channels"])
        mean, std = [float(v) for v in meta["mean"]], [float(v) for v in meta["std"]]
        if meta.get("normalization_in_graph"):  # the graph normalises: feed 0-255 pixels
            mean, std = [0.0] * c, [1 / 255.0] * c
        size = meta.get("input_size")
        if not size and meta.get("input_shape"):  # [C, H, W] of the training inputs
            size = meta["input_shape"][1:]
        size = (int(size[0]), int(size[1])) if size else None
        if len(mean) == 1:
            mean, std = mean * c, std * c
        return cls(str(meta.get("preset") or "tensor"), size, c, tuple(mean), tuple(std))

    @property
    def color(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    def pixel_limit(self, max_pixels: Optional[int] = None) -> int:
        """The pixel limit :meth:`decode` applies: ``max_pixels`` (default :func:`default_max_pixels`),
        never above :data:`UNSIZED_MAX_PIXELS` for a model of unknown input size."""
        limit = int(max_pixels or default_max_pixels(self.input_size))
        return min(limit, UNSIZED_MAX_PIXELS) if self.input_size is None else limit

    def _target(self) -> Optional[Size]:
        """``(W, H)`` the image must keep at least, so that draft decoding never goes below the resize."""
        if self.input_size is None:
            return None
        steps = _steps(self.preset, self.input_size)
        h, w = self.input_size
        return (steps.length, steps.length) if steps.resize == "short" else (w, h)

    # -- decoding --------------------------------------------------------------------------------------

    def decode(self, data: bytes, max_pixels: Optional[int] = None, name: str = "upload") -> Image.Image:
        """Image bytes -> a PIL image in the model's colour mode, decoded with bounded work.

        Raises :class:`NotAnImageError`, :class:`ImageTooLargeError` (above :meth:`pixel_limit`,
        from the header alone) or :class:`ImageError`; messages start with ``name``.
        """
        limit = self.pixel_limit(max_pixels)
        if not data:
            raise ImageError(f"{name}: empty file; send an image")
        try:
            img = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        except UnidentifiedImageError:
            raise NotAnImageError(f"{name}: not an image: send a JPEG, PNG, WebP, BMP, GIF or TIFF file") from None
        except Image.DecompressionBombError as e:
            raise ImageTooLargeError(f"{name}: image too large: {e}") from None
        except Exception as e:  # noqa: BLE001 - malformed headers raise many types
            raise ImageError(f"{name}: cannot read the image header ({type(e).__name__})") from None
        w, h = img.size
        if w * h > limit:  # from the header, before any pixel is decoded
            why = ("the model records no input size, so images are used at their own size up to this bound"
                   if self.input_size is None and limit == UNSIZED_MAX_PIXELS else "decompression-bomb guard")
            raise ImageTooLargeError(f"{name}: image is {w}x{h} = {w * h} pixels, above the limit of {limit} "
                                     f"({why}); send a smaller image")
        target = self._target()
        try:
            if target is not None:  # JPEG: decode at 1/2, 1/4 or 1/8 scale (DCT scaling)
                img.draft(None, (target[0] * REDUCING_GAP, target[1] * REDUCING_GAP))
            img.load()
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            if img.mode != self.color:
                img = img.convert(self.color)
        except Image.DecompressionBombError as e:
            raise ImageTooLargeError(f"{name}: image too large: {e}") from None
        except Exception as e:  # noqa: BLE001 - truncated data, decoder errors
            raise ImageError(f"{name}: corrupt or truncated image ({type(e).__name__}: {e})".splitlines()[0]) from None
        return img

    def decode_file(self, path: str | os.PathLike, max_pixels: Optional[int] = None) -> Image.Image:
        """An image file -> PIL image (as :meth:`decode`; ``max_pixels`` default :data:`FILE_MAX_PIXELS`)."""
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise ImageError(f"image {path}: file not found") from None
        except IsADirectoryError:
            raise ImageError(f"image {path}: is a directory, expected an image file") from None
        except OSError as e:
            raise ImageError(f"image {path}: cannot read ({e.strerror})") from None
        return self.decode(data, max_pixels or FILE_MAX_PIXELS, name=f"image {path}")

    # -- the pipeline ------------------------------------------------------------------------------------

    def __call__(self, image: Image.Image) -> np.ndarray:
        """PIL image -> ``(C, H, W) float32``: colour, the preset's resize/crop (to ``input_size``), normalise."""
        if self.input_size is None and image.size[0] * image.size[1] > UNSIZED_MAX_PIXELS:
            raise ImageTooLargeError(f"image is {image.size[0]}x{image.size[1]} pixels, above {UNSIZED_MAX_PIXELS} "
                                     "(the model records no input size, so images are used at their own size)")
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode != self.color:
            image = image.convert(self.color)
        steps = _steps(self.preset, self.input_size)
        if steps.float_resize:
            x = _float_resize(image, self.input_size)
        else:
            if steps.resize == "short":
                size = _short_side_size(*image.size, steps.length)
                if size != image.size:
                    image = image.resize(size, steps.resample)
            elif steps.resize == "exact" and image.size != self.input_size[::-1]:
                image = image.resize(self.input_size[::-1], steps.resample)
            if steps.crop:
                image = _center_crop(image, self.input_size)
            x = np.asarray(image, dtype=np.float32) / np.float32(255.0)
        if x.ndim == 2:
            x = x[:, :, None]
        x = x.transpose(2, 0, 1)
        mean = np.asarray(self.mean, np.float32).reshape(-1, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(-1, 1, 1)
        return np.ascontiguousarray((x - mean) / std, dtype=np.float32)


def _float_resize(image: Image.Image, size: Optional[Size]) -> np.ndarray:
    """PIL image -> ``(H, W, C) float32`` in [0, 1], resized to ``size`` with antialiased bilinear on
    float pixels, one channel at a time (PIL mode F: torch's ``antialias=True`` matches it to ~1e-5,
    and one float plane at a time keeps memory at 4 bytes per pixel)."""
    if size is None or image.size == size[::-1]:
        x = np.asarray(image, dtype=np.float32)
        return (x[:, :, None] if x.ndim == 2 else x) / np.float32(255.0)
    planes = [np.asarray(image.getchannel(c).convert("F").resize(size[::-1], Image.Resampling.BILINEAR))
              for c in range(len(image.getbands()))]
    return np.stack(planes, axis=2) / np.float32(255.0)
