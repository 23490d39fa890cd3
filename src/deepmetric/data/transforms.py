"""Image preprocessing presets, one per seed system, built by name.

``build_transform("paddle_sop", train=True)`` returns a callable that turns a ``PIL.Image`` (or, for
``"tensor"``, a numpy array) into a ``(C, H, W) float32`` tensor. :func:`describe` reports the input
size and normalisation a preset uses, for export metadata (a deployed model must be fed the same).
What a preset is (size, normalisation, test-time resize and crop) is defined once, in
:data:`deepmetric.core.preprocessing.PRESETS`; every test pipeline is that module's
:class:`~deepmetric.core.preprocessing.Preprocessing` (:class:`TestInput`), and this module adds
the training augmentation:

| preset | train | default size | mean / std |
|---|---|---|---|
| tensor | to tensor, normalise (no augmentation) | input's own | 0.5 / 0.5 |
| tensor_augment | as tensor, with RandomAffine(10 degrees, 10% shift, 0.9-1.1 scale) | input's own | 0.5 / 0.5 |
| paddle_sop | RandomResizedCrop(scale .08-1, ratio 3/4-4/3, Lanczos), hflip | 224 | ImageNet |
| xbm | Resize(256), RandomResizedCrop(scale .2-1), hflip | 224 | ImageNet |
| reid | Resize(256x128), hflip, Pad(10), RandomCrop, normalise, RandomErasing | 256x128 | ImageNet |
| face | Resize(112x112), hflip | 112x112 | 0.5 / 0.5 |
| imagenet | RandomResizedCrop, hflip | 224 | ImageNet |

``image_size`` (int or ``(H, W)``) replaces the default size; resize-then-crop presets scale the
resize step with it (``xbm`` at 448 resizes to 512).

``channels`` (the model's ``model.in_chans``) makes image files arrive in that many channels: 1 is
greyscale (PIL's ``L``), 3 is RGB; a preset's RGB mean/std become their average for one channel.
"""
from __future__ import annotations

import math
import os
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from ..core.errors import ParameterError
from ..core.preprocessing import HALF, IMAGENET_MEAN, IMAGENET_STD, Preprocessing, PresetSpec, preset_spec  # noqa: F401
from ..core.preprocessing import PRESETS as CORE_PRESETS

Size = tuple[int, int]


class ArrayToTensor:
    """numpy ``(H, W)`` / ``(H, W, C)`` array or PIL image -> ``(C, H, W) float32`` tensor.

    ``uint8`` input is scaled to [0, 1] (as torchvision's ``ToTensor``); float input is kept as is,
    so a dataset already in [0, 1] is not divided twice.
    """

    def __call__(self, x: Any) -> torch.Tensor:
        if isinstance(x, Image.Image):
            x = T.functional.pil_to_tensor(x)
        if torch.is_tensor(x):
            t = x
        else:
            arr = np.asarray(x)
            if arr.ndim == 2:
                arr = arr[:, :, None]
            if arr.ndim != 3:
                raise ValueError(f"tensor preset: expected an (H, W) or (H, W, C) array, got shape {arr.shape}")
            t = torch.from_numpy(np.array(arr.transpose(2, 0, 1), copy=True))  # own, writable memory
        if t.dtype == torch.uint8:
            return t.float().div_(255.0)
        return t.float()


def channel_stats(values: Sequence[float], channels: int) -> tuple[float, ...]:
    """Normalisation constants for ``channels`` channels: as given when they fit (one value serves
    every channel), else for one channel the average of the RGB constants (grey mixes the three).

    >>> channel_stats((0.5,), 3), channel_stats((0.25, 0.5, 0.75), 1)
    ((0.5,), (0.5,))

    Raises:
        ParameterError: any other count, naming ``channels``.
    """
    values = tuple(float(v) for v in values)
    if len(values) in (1, channels):
        return values
    if channels == 1:
        return (sum(values) / len(values),)
    raise ParameterError(f"{{channels}}={channels}: the preset normalises {len(values)} channels "
                         f"(mean {list(values)}); set {{channels}} to 1 or {len(values)}", "channels")


class ToChannels:
    """PIL image or ``(C, H, W) uint8`` tensor -> ``channels`` channels (1: greyscale, 3: RGB).

    Greyscale uses PIL's ``L`` conversion, ITU-R 601-2 luma in fixed point,
    ``L = (19595 R + 38470 G + 7471 B + 32768) >> 16``, also on tensors, so both decoders give the
    same pixels, and a grey image decoded to RGB comes back unchanged. uint8 arrays of one or three
    channels (digits, MNIST) are converted the same way, so the default recipe (digits, a 3-channel
    model) trains; anything else (float tensors, other channel counts) passes as it is.
    """

    def __init__(self, channels: int) -> None:
        self.channels = int(channels)

    def __call__(self, x: Any) -> Any:
        if isinstance(x, np.ndarray) and x.dtype == np.uint8 and self.channels in (1, 3):
            return self._array(x)
        decoded = isinstance(x, Image.Image) or (torch.is_tensor(x) and x.dtype == torch.uint8 and x.ndim == 3)
        if not decoded:
            return x
        if self.channels not in (1, 3):
            raise ParameterError(f"{{channels}}={self.channels}: image files load as 1 (greyscale) or 3 (RGB) "
                                 "channels; set {channels} to 1 or 3, or use a dataset format of arrays", "channels")
        if isinstance(x, Image.Image):
            mode = "L" if self.channels == 1 else "RGB"
            return x if x.mode == mode else x.convert(mode)
        if x.shape[0] == self.channels:
            return x
        if self.channels == 3:
            return x.expand(3, *x.shape[1:]).clone()
        r, g, b = x[:3].to(torch.int32)
        return ((19595 * r + 38470 * g + 7471 * b + 32768) >> 16).to(torch.uint8)[None]

    def _array(self, x: np.ndarray) -> np.ndarray:
        """A uint8 ``(H, W)`` or ``(H, W, C)`` array (digits, MNIST) in ``channels`` channels: grey is
        repeated into RGB, RGB becomes grey by the same luma; other layouts pass as they are."""
        have = 1 if x.ndim == 2 else x.shape[2] if x.ndim == 3 else None
        if have is None or have == self.channels or have not in (1, 3):
            return x
        if self.channels == 3:
            return np.repeat(x.reshape(*x.shape[:2], 1), 3, axis=2)
        rgb = x.astype(np.int32)
        return ((19595 * rgb[..., 0] + 38470 * rgb[..., 1] + 7471 * rgb[..., 2] + 32768) >> 16).astype(np.uint8)

    def __repr__(self) -> str:
        return f"ToChannels({self.channels})"


class ToFloat:
    """PIL image or ``(C, H, W) uint8`` tensor -> ``(C, H, W) float32`` in [0, 1].

    torchvision's ``ToTensor`` for both inputs the presets see: PIL images (``data.decoder=pil``)
    and the uint8 tensors :func:`~deepmetric.data.io.read_image_tensor` decodes into
    (``data.decoder=torchvision``), so one pipeline serves both decoders.
    """

    def __call__(self, x: Any) -> torch.Tensor:
        if torch.is_tensor(x):
            if x.dtype != torch.uint8:
                raise TypeError(f"expected a uint8 image tensor, got {x.dtype}")
            return x.float().div_(255.0)
        return T.functional.pil_to_tensor(x).float().div_(255.0)

    def __repr__(self) -> str:
        return "ToFloat()"


class ToUint8:
    """PIL image or ``(C, H, W) uint8`` tensor -> ``(C, H, W) uint8`` tensor (no scaling)."""

    def __call__(self, x: Any) -> torch.Tensor:
        if torch.is_tensor(x):
            if x.dtype != torch.uint8:
                raise TypeError(f"expected a uint8 image tensor, got {x.dtype}")
            return x
        return T.functional.pil_to_tensor(x)

    def __repr__(self) -> str:
        return "ToUint8()"


class BatchNormalize:
    """``(B, C, H, W) uint8`` batch -> ``(x / 255 - mean) / std`` in float32, on the batch's device.

    The second half of a pipeline split by :meth:`Pipeline.split_normalisation`: loader workers
    send uint8 images (a quarter of the bytes through shared memory, pinned memory and PCIe) and
    the GPU converts them, where it costs nothing.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(v) for v in std)
        self._constants: dict = {}  # device -> (shift, scale): no host-to-device copy per batch

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if batch.dtype != torch.uint8 or batch.ndim != 4:
            raise TypeError(f"expected a (B, C, H, W) uint8 batch, got {batch.dtype} {tuple(batch.shape)}")
        if batch.device not in self._constants:
            shift = torch.tensor(self.mean, device=batch.device).mul_(255.0).view(1, -1, 1, 1)
            scale = torch.tensor(self.std, device=batch.device).mul_(255.0).reciprocal_().view(1, -1, 1, 1)
            self._constants[batch.device] = (shift, scale)
        shift, scale = self._constants[batch.device]
        return batch.float().sub_(shift).mul_(scale)

    def __repr__(self) -> str:
        return f"BatchNormalize(mean={self.mean}, std={self.std})"


class Pipeline(T.Compose):
    """A preset's transforms plus the input they take: ``decoder`` is ``"torchvision"`` when the
    dataset should hand it uint8 tensors, ``"pil"`` when PIL images (read by the dataset);
    ``channels`` the count its first step (:class:`ToChannels`) converts to, or ``None``."""

    def __init__(self, transforms: list, decoder: str) -> None:
        super().__init__(transforms)
        self.decoder = decoder
        first = self.transforms[0] if self.transforms else None
        self.channels = first.channels if isinstance(first, ToChannels) else None

    def split_normalisation(self) -> Optional[tuple["Pipeline", BatchNormalize]]:
        """``(per-image part ending in uint8, batch normaliser)`` when this pipeline ends in
        float conversion + normalisation (every image preset but ``reid``, whose random erasing
        works on normalised values, and the array presets); ``None`` otherwise."""
        steps = list(self.transforms)
        if len(steps) < 2 or type(steps[-2]) is not ToFloat or not isinstance(steps[-1], T.Normalize):
            return None
        return Pipeline(steps[:-2] + [ToUint8()], self.decoder), BatchNormalize(steps[-1].mean, steps[-1].std)

    def split_affine(self) -> Optional[tuple["Pipeline", "BatchAffine"]]:
        """``(per-image part ending in an AffineDraw, its BatchAffine)`` when the pipeline has a
        ``RandomAffine`` (about its centre, nearest or bilinear, a numeric fill) followed only by
        normalisation (the ``tensor_augment`` preset); ``None`` otherwise. The per-image part draws
        what the whole pipeline would draw, in the same order, so a batch warped this way holds the
        pixels the per-image pipeline gives (``tests/data/test_batch_affine.py``)."""
        steps = list(self.transforms)
        at = [i for i, s in enumerate(steps) if type(s) is T.RandomAffine]
        if len(at) != 1:
            return None
        k = at[0]
        affine, tail = steps[k], steps[k + 1:]
        mode = getattr(affine.interpolation, "value", affine.interpolation)
        fill = affine.fill
        if affine.center is not None or mode not in ("nearest", "bilinear") or not all(type(s) is T.Normalize for s in tail):
            return None
        if isinstance(fill, (int, float)):
            fill = [float(fill)]
        elif not (isinstance(fill, (list, tuple)) and all(isinstance(f, (int, float)) for f in fill)):
            return None  # a per-type fill dictionary
        return Pipeline(steps[:k] + [AffineDraw(affine)], self.decoder), BatchAffine(mode, fill, tail)

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f"    decoder={self.decoder}\n)"


class AffineDraw:
    """The per-image half of a :class:`torchvision.transforms.v2.RandomAffine` done on the batch.

    Draws the transform's parameters exactly as it does (its own ``make_params``: the same generator
    calls in the same order) and returns ``(image, theta)``, ``theta`` the ``(2, 3)`` inverse matrix
    torchvision builds from them; :class:`BatchAffine` then warps every image of the batch at once.
    The warp is most of the transform's cost (a grid and a ``grid_sample`` per image, about 0.6 ms
    for a 32 x 32 glyph on one thread), and one batched call does 64 of them in about 1 ms.
    """

    def __init__(self, affine: T.RandomAffine) -> None:
        self.affine = affine

    def __call__(self, img: torch.Tensor):
        if not torch.is_tensor(img):
            raise TypeError(f"AffineDraw takes tensors, got {type(img).__name__}")
        p = self.affine.make_params([img])
        shear = p["shear"]
        matrix = inverse_affine_matrix(float(p["angle"]), [float(t) for t in p["translate"]], float(p["scale"]),
                                       [float(shear[0]), float(shear[1])])
        return img, torch.tensor(matrix, dtype=torch.float32).view(2, 3)

    def __repr__(self) -> str:
        return f"AffineDraw({self.affine!r})"


def inverse_affine_matrix(angle: float, translate: Sequence[float], scale: float,
                          shear: Sequence[float]) -> list[float]:
    """The output-to-input map of rotating by ``angle`` degrees, scaling, shearing (degrees) and
    then translating (pixels) about the image centre, as six numbers ``[a, b, c, d, e, f]`` of
    ``(x, y) -> (a x + b y + c, d x + e y + f)`` in centred pixel coordinates (torchvision's
    convention for tensors: the forward map is ``T C R S Sh C^-1`` with ``C`` at the centre)."""
    rot = math.radians(angle)
    sx, sy = math.radians(shear[0]), math.radians(shear[1])
    tx, ty = translate
    # R S Sh without the scale: [[a, b], [c, d]]; its inverse is [[d, -b], [-c, a]] (determinant 1)
    a = math.cos(rot - sy) / math.cos(sy)
    b = -math.cos(rot - sy) * math.tan(sx) / math.cos(sy) - math.sin(rot)
    c = math.sin(rot - sy) / math.cos(sy)
    d = -math.sin(rot - sy) * math.tan(sx) / math.cos(sy) + math.cos(rot)
    m = [d / scale, -b / scale, 0.0, -c / scale, a / scale, 0.0]
    m[2] += m[0] * -tx + m[1] * -ty
    m[5] += m[3] * -tx + m[4] * -ty
    return m


class BatchAffine:
    """The batch half of a split :class:`~torchvision.transforms.v2.RandomAffine`: warps a
    ``(B, C, H, W)`` batch by per-image ``(B, 2, 3)`` matrices from :class:`AffineDraw` in one
    ``grid_sample`` (torchvision's grid, sampling and fill, image by image the same pixels), then
    applies the steps that followed the affine in the pipeline (normalisation), on the batch's device.
    """

    def __init__(self, interpolation: str, fill: Optional[Sequence[float]], tail: Sequence[Callable]) -> None:
        self.interpolation = interpolation
        self.fill = None if fill is None else tuple(float(f) for f in fill)
        self.tail = list(tail)
        self._grids: dict = {}  # (h, w, dtype, device) -> (1, h * w, 3) base grid

    def _base(self, h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (h, w, dtype, device)
        if key not in self._grids:
            base = torch.empty(1, h, w, 3, dtype=dtype, device=device)
            base[..., 0].copy_(torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, device=device))
            base[..., 1].copy_(torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, device=device).unsqueeze_(-1))
            base[..., 2].fill_(1)
            self._grids[key] = base.view(1, h * w, 3)
        return self._grids[key]

    def __call__(self, images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or theta.shape != (images.shape[0], 2, 3):
            raise ValueError(f"expected (B, C, H, W) images and (B, 2, 3) matrices, got {tuple(images.shape)} "
                             f"and {tuple(theta.shape)}")
        b, c, h, w = images.shape
        fp = images.is_floating_point()
        x = images if fp else images.float()
        theta = theta.to(device=x.device, dtype=x.dtype)
        scaled = theta.transpose(1, 2) / torch.tensor([0.5 * w, 0.5 * h], dtype=x.dtype, device=x.device)
        grid = torch.bmm(self._base(h, w, x.dtype, x.device).expand(b, -1, -1), scaled).view(b, h, w, 2)
        if self.fill is not None:
            x = torch.cat((x, x.new_ones(b, 1, h, w)), dim=1)
        x = torch.nn.functional.grid_sample(x, grid, mode=self.interpolation, padding_mode="zeros",
                                            align_corners=False)
        if self.fill is not None:
            x, mask = x[:, :-1], x[:, -1:].expand(b, c, h, w)
            fill = torch.tensor(self.fill, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            if self.interpolation == "nearest":
                x = torch.where(mask < 0.5, fill.expand_as(x), x)
            else:
                x = x.sub(fill).mul_(mask).add_(fill)
        if not fp:
            x = x.round_().to(images.dtype)
        for step in self.tail:
            x = step(x)
        return x

    def __repr__(self) -> str:
        return f"BatchAffine(interpolation={self.interpolation}, fill={self.fill}, tail={self.tail})"


class RandomErasing:
    """Random erasing as in the re-ID reference (Zhong et al. 2017; centroids-reid, torchreid).

    With probability ``p``, up to 100 attempts draw an area fraction ``U(sl, sh)`` and an aspect
    ratio ``U(r1, 1/r1)``; the first rectangle that fits is filled with ``value`` (per channel, in
    the normalised tensor: the reference fills with the pixel-mean values themselves, so the
    ``reid`` preset passes its normalisation mean). Differs
    from torchvision's ``RandomErasing``, which draws the ratio log-uniformly and tries 10 times.
    Uses torch's RNG, so DataLoader worker seeding makes it reproducible.
    """

    def __init__(self, p: float = 0.5, sl: float = 0.02, sh: float = 0.4, r1: float = 0.3,
                 value: Sequence[float] = IMAGENET_MEAN) -> None:
        self.p, self.sl, self.sh, self.r1 = p, sl, sh, r1
        self.value = tuple(float(v) for v in value)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if torch.rand(()).item() >= self.p:
            return img
        _, height, width = img.shape
        area = height * width
        for _ in range(100):
            target = area * _uniform(self.sl, self.sh)
            aspect = _uniform(self.r1, 1.0 / self.r1)
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if w < width and h < height:
                top = int(torch.randint(0, height - h + 1, ()).item())
                left = int(torch.randint(0, width - w + 1, ()).item())
                img = img.clone()
                fill = torch.tensor(self.value[: img.shape[0]], dtype=img.dtype).view(-1, 1, 1)
                img[:, top : top + h, left : left + w] = fill
                return img
        return img

    def __repr__(self) -> str:
        return f"RandomErasing(p={self.p}, sl={self.sl}, sh={self.sh}, r1={self.r1}, value={self.value})"


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand(()).item()


# ---------------------------------------------------------------------------------------------
# presets


class TestInput:
    """A preset's test-time pipeline, the one step of every evaluation transform.

    Image files (a path, which datasets hand over when the pipeline's ``decoder`` is ``"file"``) and
    PIL images go through :class:`~deepmetric.core.preprocessing.Preprocessing`, the definition
    ``deepmetric embed``, the server, the :class:`~deepmetric.inference.Predictor` and ONNX serving
    use: a checkpoint's evaluation and its deployment see the same inputs, bit for bit. Arrays (digits,
    MNIST) and tensors, which no deployed model is fed, go through ``array_steps`` (to tensor, resize
    with torch's antialiased bilinear, which ``Preprocessing`` matches to ~1e-5 on float pixels, and
    normalise).
    """

    def __init__(self, preprocessing: Preprocessing, array_steps: Sequence[Callable]) -> None:
        self.preprocessing = preprocessing
        self.array_steps = T.Compose(list(array_steps))

    def __call__(self, x: Any) -> torch.Tensor:
        if isinstance(x, (str, os.PathLike)):
            return torch.from_numpy(self.preprocessing.load(x))
        if isinstance(x, Image.Image):
            return torch.from_numpy(self.preprocessing(x))
        return self.array_steps(x)

    def __repr__(self) -> str:
        return f"TestInput({self.preprocessing!r})"


def _tensor(size, norm):
    return [ArrayToTensor()] + ([T.Resize(size, antialias=True)] if size else []) + [norm]


#: the ``tensor_augment`` preset's random affine (also the instance term's second view,
#: :func:`deepmetric.engine.step.second_view`): degrees either way, shift as a share of the side, scale
SMALL_AFFINE = {"degrees": 10.0, "translate": 0.1, "scale": (0.9, 1.1)}


def _tensor_augmented(size, norm):
    # small random shifts, rotations and scale changes: the invariances of handwriting, learned from
    # a handful of classes and carried over to unseen ones
    a = SMALL_AFFINE
    return [ArrayToTensor()] + ([T.Resize(size, antialias=True)] if size else []) + [
        T.RandomAffine(degrees=a["degrees"], translate=(a["translate"],) * 2, scale=a["scale"]), norm]


def _reid(s, norm):
    return [T.Resize(s), T.RandomHorizontalFlip(0.5), T.Pad(10), T.RandomCrop(s), ToFloat(), norm,
            RandomErasing(p=0.5, sl=0.02, sh=0.4, r1=0.3, value=norm.mean)]


_LANCZOS = InterpolationMode.LANCZOS

#: each preset's training pipeline ``(size, normalisation) -> steps``; what the presets are (size,
#: normalisation, test-time geometry) is :data:`deepmetric.core.preprocessing.PRESETS`
TRAIN_STEPS: dict[str, Callable[[Optional[Size], T.Normalize], list]] = {
    "tensor_augment": _tensor_augmented,
    "tensor": _tensor,
    "paddle_sop": lambda s, norm: [
        T.RandomResizedCrop(s, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), interpolation=_LANCZOS),
        T.RandomHorizontalFlip(0.5), ToFloat(), norm],
    "xbm": lambda s, norm: [
        T.Resize(_scaled(s, 256 / 224)), T.RandomResizedCrop(s, scale=(0.2, 1.0)), T.RandomHorizontalFlip(0.5),
        ToFloat(), norm],
    "reid": _reid,
    "face": lambda s, norm: [T.Resize(s), T.RandomHorizontalFlip(0.5), ToFloat(), norm],
    "imagenet": lambda s, norm: [T.RandomResizedCrop(s), T.RandomHorizontalFlip(0.5), ToFloat(), norm],
}
#: training pipelines with a step that only takes PIL images (Lanczos resizing exists only in PIL)
PIL_ONLY = frozenset({"paddle_sop"})
PRESETS = CORE_PRESETS


def _scaled(size: Size, ratio: float) -> int:
    """Short-side resize length for a crop of ``size`` (256/224 for the ImageNet convention)."""
    return int(round(min(size) * ratio))


def _preset(name: str) -> PresetSpec:
    try:
        return preset_spec(name)
    except KeyError as e:
        raise ParameterError(e.args[0]) from None


def _size(image_size: Optional[int | Sequence[int]], default: Optional[Size]) -> Optional[Size]:
    if image_size is None:
        return default
    if isinstance(image_size, int):
        return (image_size, image_size)
    hw = tuple(int(v) for v in image_size)
    if len(hw) != 2 or min(hw) <= 0:
        raise ParameterError(f"{{image_size}} must be an int or (H, W) of positive ints, got {image_size!r}",
                             "image_size")
    return hw  # type: ignore[return-value]


def describe(
    preset: str,
    image_size: Optional[int | Sequence[int]] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
) -> dict:
    """What a preset feeds the model, for export metadata.

    Returns ``{"preset", "input_size": [H, W] or None (the input's own size), "mean", "std",
    "pixel_range": "0-1", "description"}``; normalised input is ``(x/255 - mean) / std``.
    """
    p = _preset(preset)
    size = _size(image_size, p.size)
    return {
        "preset": preset,
        "input_size": None if size is None else list(size),
        "mean": list(p.mean if mean is None else mean),
        "std": list(p.std if std is None else std),
        "pixel_range": "0-1",
        "description": p.description,
    }


def build_transform(
    preset: str,
    train: bool,
    image_size: Optional[int | Sequence[int]] = None,
    mean: Optional[Sequence[float]] = None,
    std: Optional[Sequence[float]] = None,
    decoder: str = "auto",
    channels: Optional[int] = None,
) -> Pipeline:
    """The train or test pipeline of ``preset``; output ``(C, H, W) float32``.

    Args:
        preset: one of :data:`PRESETS`.
        train: the augmenting training pipeline, or the deterministic test pipeline
            (:class:`TestInput`: image files through the one test-time definition,
            :class:`~deepmetric.core.preprocessing.Preprocessing`; its ``decoder`` is ``"file"``).
        image_size: int or ``(H, W)`` replacing the preset's default input size.
        mean: per-channel means replacing the preset's (of ``x`` in [0, 1]).
        std: per-channel standard deviations replacing the preset's.
        decoder: what image files are decoded into for training (the pipeline's ``decoder`` attribute
            tells the dataset): ``"torchvision"`` uint8 tensors (libjpeg-turbo straight into a tensor,
            then tensor resizing: faster, see ``benchmarks/bench_decode.py``), ``"pil"`` PIL images, or
            ``"auto"``: torchvision where every step of the preset takes tensors, else PIL. Both
            decode the pixels of :func:`deepmetric.core.images.decode_image`.
        channels: the model's input channels (``model.in_chans``): images become greyscale (1) or
            RGB (3) first (:class:`ToChannels`), and mean/std follow (:func:`channel_stats`).
            ``None`` leaves array inputs' channels alone (image files load as RGB).

    Raises:
        ParameterError: unknown preset (the message lists the valid ones), bad size, a decoder the
            preset cannot take, or mean/std that cannot serve ``channels``.
    """
    p = _preset(preset)
    size = _size(image_size, p.size)
    if decoder not in ("auto", "pil", "torchvision"):
        raise ParameterError(f"unknown {{decoder}} {decoder!r} (valid: auto, pil, torchvision)", "decoder")
    if decoder == "torchvision" and preset in PIL_ONLY:
        raise ParameterError(f"preset {preset!r} resizes with Lanczos, which only PIL has; use {{decoder}} pil or auto",
                             "decoder")
    mean, std = tuple(p.mean if mean is None else mean), tuple(p.std if std is None else std)
    if channels is not None:
        mean, std = channel_stats(mean, channels), channel_stats(std, channels)
    norm = T.Normalize(mean, std)
    if not train:
        files = Preprocessing(preset, size, 3 if channels is None else channels, mean, std)
        arrays = ([] if channels is None else [ToChannels(channels)]) + _tensor(size, norm)
        return Pipeline([TestInput(files, arrays)], "file")
    chosen = "pil" if decoder == "pil" or preset in PIL_ONLY else "torchvision"
    steps = TRAIN_STEPS[preset](size, norm)
    return Pipeline(steps if channels is None else [ToChannels(channels), *steps], chosen)
