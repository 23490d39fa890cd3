"""The presets, and the one test-time pipeline: an image file or bytes -> the model's input array.

:data:`PRESETS` holds what each preset *is*: its default input size, its normalisation and its
test-time geometry (resize, crop). :class:`Preprocessing` is that test-time pipeline, with numpy and
Pillow only: decode (:func:`~deepmetric.core.images.decode_image`, bounded), convert to the model's
channels, resize and crop, normalise. It is the only definition: evaluation during training and
``deepmetric eval`` (image files go through it, see :mod:`deepmetric.data.transforms`),
``deepmetric embed``, the server, :class:`~deepmetric.inference.Predictor` and an exported ONNX
model served without PyTorch all call it, so the vectors a deployed model gives are the ones its
evaluation scored. The training pipelines (:mod:`deepmetric.data.transforms`) add augmentation
around the same sizes and normalisation.

| preset | test-time geometry | default size | mean / std |
|---|---|---|---|
| tensor, tensor_augment | resized to the input size (antialiased bilinear on float pixels) | input's own | 0.5 / 0.5 |
| paddle_sop | short side to the size (Lanczos), centre crop | 224 | ImageNet |
| xbm, imagenet | short side to size x 256/224 (bilinear), centre crop | 224 | ImageNet |
| reid | resized to 256 x 128 | 256 x 128 | ImageNet |
| face | resized to 112 x 112 | 112 x 112 | 0.5 / 0.5 |

Every input is brought to the model's input size ``(H, W)``: presets that never resize (``tensor``:
digits 8x8, Fashion-MNIST 28x28) are resized to it too, as the model has only seen that size. A
model whose input size is unknown is run at the image's own size, up to :data:`UNSIZED_MAX_PIXELS`.

Bounded decoding (uploads are untrusted; a 236 KB all-black 9000x9000 PNG is 243 MB of pixels): the
header's ``width x height`` is checked against the pixel limit before any pixel is decoded (for
uploads :func:`default_max_pixels`, :data:`PIXELS_PER_INPUT_PIXEL` times the model's input pixels, at
least :data:`MIN_MAX_PIXELS`; for files PIL's own hard limit); JPEGs decode at 1/2, 1/4 or 1/8 scale
while still :data:`REDUCING_GAP` times the size the preset resizes to, so the antialiased resize does
the filtering (within 2 grey levels of a full-size decode).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np
from PIL import Image

from .images import (FILE_MAX_PIXELS, ImageError, ImageTooLargeError, NotAnImageError, decode_image,  # noqa: F401
                     read_file, to_mode)

#: the default pixel limit for uploads is this many times the model's input pixels ...
PIXELS_PER_INPUT_PIXEL = 256
#: ... and at least this (4096 x 4096: a phone photo passes whatever the model)
MIN_MAX_PIXELS = 4096 * 4096
#: largest image run through a model whose input size is unknown (its own size, up to 1024 x 1024)
UNSIZED_MAX_PIXELS = 1024 * 1024
#: JPEG draft decoding stops while the image is still this many times the preset's resize target
REDUCING_GAP = 3

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

Size = Tuple[int, int]


@dataclass(frozen=True)
class PresetSpec:
    """What a preset is, apart from its training augmentation.

    ``resize``: ``"exact"`` (to the input size), ``"short"`` (the short side to ``ratio`` times the
    input size's short side, then a centre crop to the input size) or ``None``; ``resample``: PIL's
    filter; ``float_resize``: resize float pixels (torch's antialiased bilinear, which array data
    such as digits gets on tensors)."""

    description: str
    size: Optional[Size]
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    resize: str = "exact"
    ratio: float = 1.0
    resample: int = Image.Resampling.BILINEAR
    float_resize: bool = False

    def short_side(self, size: Size) -> int:
        """The length the short side is resized to before the centre crop (``"short"`` presets)."""
        return int(round(min(size) * self.ratio))


PRESETS: Dict[str, PresetSpec] = {
    "tensor_augment": PresetSpec(
        "like 'tensor', with small random shifts, rotations and scalings when training (digits, glyphs)",
        None, (0.5,), (0.5,), float_resize=True),
    "tensor": PresetSpec(
        "arrays or small images to tensor and normalise; no augmentation (digits, MNIST-like data)",
        None, (0.5,), (0.5,), float_resize=True),
    "paddle_sop": PresetSpec(
        "PaddlePaddle metric_learning (SOP): RandomResizedCrop Lanczos + flip / short side + centre crop",
        (224, 224), IMAGENET_MEAN, IMAGENET_STD, resize="short", resample=Image.Resampling.LANCZOS),
    "xbm": PresetSpec(
        "XBM (PaddleClas / research-xbm): Resize 256 + RandomResizedCrop(scale .2-1) + flip / Resize 256 + CenterCrop",
        (224, 224), IMAGENET_MEAN, IMAGENET_STD, resize="short", ratio=256 / 224),
    "reid": PresetSpec(
        "Centroids-ReID: Resize + flip + Pad(10) + RandomCrop + RandomErasing / Resize",
        (256, 128), IMAGENET_MEAN, IMAGENET_STD),
    "face": PresetSpec(
        "aligned faces (insightface convention): 112x112, ((x/255)-0.5)/0.5, train flip",
        (112, 112), HALF, HALF),
    "imagenet": PresetSpec(
        "generic ImageNet-style: RandomResizedCrop + flip / Resize(size*256/224) + CenterCrop",
        (224, 224), IMAGENET_MEAN, IMAGENET_STD, resize="short", ratio=256 / 224),
}


def preset_spec(name: str) -> PresetSpec:
    """The spec of preset ``name``; unknown names get a ``KeyError`` listing the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown transform preset {name!r} (valid: {', '.join(PRESETS)})") from None


def default_max_pixels(input_size: Optional[Size]) -> int:
    """The upload pixel limit for a model of ``input_size`` ``(H, W)`` (``None``: unknown size).

    >>> default_max_pixels((224, 224)), default_max_pixels((448, 448)), default_max_pixels(None)
    (16777216, 51380224, 1048576)
    """
    if input_size is None:
        return UNSIZED_MAX_PIXELS
    return max(MIN_MAX_PIXELS, PIXELS_PER_INPUT_PIXEL * int(input_size[0]) * int(input_size[1]))


def short_side_size(w: int, h: int, length: int) -> Size:
    """``(W, H)`` with the short side ``length`` (torchvision's rounding: the long side truncates)."""
    if w <= h:
        return length, int(length * h / w)
    return int(length * w / h), length


def center_crop(img: Image.Image, size: Size) -> Image.Image:
    """torchvision's CenterCrop: a side shorter than the crop is zero-padded (half each side), then
    the anchor is rounded. PIL's crop fills outside the image with zeros, which is that padding."""
    ch, cw = size
    w, h = img.size
    pad_left = (cw - w) // 2 if cw > w else 0
    pad_top = (ch - h) // 2 if ch > h else 0
    left = int(round((max(w, cw) - cw) / 2.0)) - pad_left
    top = int(round((max(h, ch) - ch) / 2.0)) - pad_top
    return img.crop((left, top, left + cw, top + ch))


def float_resize(image: Image.Image, size: Optional[Size]) -> np.ndarray:
    """PIL image -> ``(H, W, C) float32`` in [0, 1], resized to ``size`` with antialiased bilinear on
    float pixels, one channel at a time (PIL mode F: torch's ``antialias=True`` matches it to ~1e-5,
    and one float plane at a time keeps memory at 4 bytes per pixel)."""
    if size is None or image.size == size[::-1]:
        x = np.asarray(image, dtype=np.float32)
        return (x[:, :, None] if x.ndim == 2 else x) / np.float32(255.0)
    planes = [np.asarray(image.getchannel(c).convert("F").resize(size[::-1], Image.Resampling.BILINEAR))
              for c in range(len(image.getbands()))]
    return np.stack(planes, axis=2) / np.float32(255.0)


@dataclass(frozen=True)
class Preprocessing:
    """A model's test-time input pipeline: :meth:`decode` (bytes -> PIL image, bounded),
    :meth:`__call__` (PIL image -> ``(C, H, W) float32``, resized to ``input_size`` and normalised)
    and :meth:`load` (a file, both).

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

    @property
    def spec(self) -> PresetSpec:
        return PRESETS.get(self.preset, PRESETS["face"])  # an unknown preset: resized to the input size

    def pixel_limit(self, max_pixels: Optional[int] = None) -> int:
        """The pixel limit :meth:`decode` applies: ``max_pixels`` (default :func:`default_max_pixels`),
        never above :data:`UNSIZED_MAX_PIXELS` for a model of unknown input size."""
        limit = int(max_pixels or default_max_pixels(self.input_size))
        return min(limit, UNSIZED_MAX_PIXELS) if self.input_size is None else limit

    def _draft_to(self) -> Optional[Size]:
        """``(W, H)`` a JPEG may be draft-decoded down to: :data:`REDUCING_GAP` times the size the
        preset resizes to, so that draft decoding never goes below the resize."""
        if self.input_size is None:
            return None
        h, w = self.input_size
        if self.spec.resize == "short":
            n = self.spec.short_side(self.input_size)
            return n * REDUCING_GAP, n * REDUCING_GAP
        return w * REDUCING_GAP, h * REDUCING_GAP

    # -- decoding --------------------------------------------------------------------------------------

    def decode(self, data: bytes, max_pixels: Optional[int] = None, name: str = "upload") -> Image.Image:
        """Image bytes -> a PIL image in the model's colour mode, decoded with bounded work
        (:func:`~deepmetric.core.images.decode_image`).

        Raises :class:`NotAnImageError`, :class:`ImageTooLargeError` (above :meth:`pixel_limit`,
        from the header alone) or :class:`ImageError`; messages start with ``name``.
        """
        limit = self.pixel_limit(max_pixels)
        why = ("the model records no input size, so images are used at their own size up to this bound"
               if self.input_size is None and limit == UNSIZED_MAX_PIXELS else "decompression-bomb guard")
        return decode_image(data, mode=self.color, max_pixels=limit, name=name, draft_to=self._draft_to(),
                            too_large_why=why)

    def decode_file(self, path: str | os.PathLike, max_pixels: Optional[int] = None) -> Image.Image:
        """An image file -> PIL image (as :meth:`decode`; ``max_pixels`` default :data:`FILE_MAX_PIXELS`)."""
        path = os.fspath(path)
        return self.decode(read_file(path), max_pixels or FILE_MAX_PIXELS, name=f"image {path}")

    def load(self, path: str | os.PathLike, max_pixels: Optional[int] = None) -> np.ndarray:
        """An image file -> the model's ``(C, H, W) float32`` input: :meth:`decode_file`, then the pipeline."""
        return self(self.decode_file(path, max_pixels))

    # -- the pipeline ------------------------------------------------------------------------------------

    def __call__(self, image: Image.Image) -> np.ndarray:
        """PIL image -> ``(C, H, W) float32``: colour, the preset's resize/crop (to ``input_size``), normalise."""
        if self.input_size is None and image.size[0] * image.size[1] > UNSIZED_MAX_PIXELS:
            raise ImageTooLargeError(f"image is {image.size[0]}x{image.size[1]} pixels, above {UNSIZED_MAX_PIXELS} "
                                     "(the model records no input size, so images are used at their own size)")
        if image.mode != self.color:
            image = to_mode(image, self.color)
        spec = self.spec
        if self.input_size is None or spec.float_resize:
            x = float_resize(image, self.input_size)
        else:
            if spec.resize == "short":
                size = short_side_size(*image.size, spec.short_side(self.input_size))
                if size != image.size:
                    image = image.resize(size, spec.resample)
                image = center_crop(image, self.input_size)
            elif image.size != self.input_size[::-1]:
                image = image.resize(self.input_size[::-1], spec.resample)
            x = np.asarray(image, dtype=np.float32) / np.float32(255.0)
        if x.ndim == 2:
            x = x[:, :, None]
        x = x.transpose(2, 0, 1)
        mean = np.asarray(self.mean, np.float32).reshape(-1, 1, 1)
        std = np.asarray(self.std, np.float32).reshape(-1, 1, 1)
        return np.ascontiguousarray((x - mean) / std, dtype=np.float32)
