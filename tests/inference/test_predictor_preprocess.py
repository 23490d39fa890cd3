"""The predictor's torch-free preprocessing: the same pixels as each preset's torchvision test pipeline,
every input brought to the model's training input size and channels, bounded decoding (header check,
JPEG draft), and ONNX models loaded without PyTorch's help."""
from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from deepmetric.config import load_config
from deepmetric.data.transforms import PRESETS, build_transform, describe
from deepmetric.engine.build import build_model
from deepmetric.engine.checkpoint import save_checkpoint
from deepmetric.core.errors import UserError
from deepmetric.inference.preprocess import (MIN_MAX_PIXELS, REDUCING_GAP, UNSIZED_MAX_PIXELS, ImageError,
                                             ImageTooLargeError, NotAnImageError, Preprocessing,
                                             default_max_pixels)
from deepmetric.inference.predictor import Predictor

# a digits-like model: one channel, the 'tensor' preset (never resizes), no data.image_size
DIGITS = ["model.backbone=small_cnn", "model.in_chans=1", "model.embedding_dim=16", "data.transform=tensor",
          "data.image_size=null", "model.backbone_options={width: 8}"]


def noise(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def black_png(side: int) -> bytes:
    """An all-black ``side x side`` RGB PNG written row by row (never the whole image in memory): the
    decompression bomb of issue 13 (9000 x 9000 -> about 236 KB)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z, row, parts = zlib.compressobj(9), b"\0" * (1 + 3 * side), []
    for _ in range(side):
        parts.append(z.compress(row))
    parts.append(z.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def preprocessing(preset: str, size, channels: int = 3) -> Preprocessing:
    d = describe(preset, size)
    mean = d["mean"] * channels if len(d["mean"]) == 1 else d["mean"][:channels]
    std = d["std"] * channels if len(d["std"]) == 1 else d["std"][:channels]
    return Preprocessing.from_metadata({"preset": preset, "input_size": d["input_size"], "channels": channels,
                                        "mean": mean, "std": std})


def torchvision_reference(preset: str, size, mean, std):
    """Each preset's test-time geometry written with torchvision's transforms on PIL images, the
    convention the presets follow (Resize with the preset's filter, CenterCrop, ToTensor, Normalize)."""
    from torchvision import transforms as TV

    spec = PRESETS[preset]
    steps = []
    if spec.float_resize:  # float pixels, resized with torch's antialiased bilinear
        steps = [TV.ToTensor(), TV.Resize(size, antialias=True)]
    elif spec.resize == "short":
        steps = [TV.Resize(spec.short_side(size), interpolation=TV.InterpolationMode(
            {Image.Resampling.LANCZOS: "lanczos", Image.Resampling.BILINEAR: "bilinear"}[spec.resample])),
            TV.CenterCrop(size), TV.ToTensor()]
    else:
        steps = [TV.Resize(size), TV.ToTensor()]
    return TV.Compose(steps + [TV.Normalize(mean, std)])


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_matches_its_torchvision_convention(preset):
    sizes = [(32, 32), (40, 24)] + ([(8, 8)] if preset.startswith("tensor") else [])
    for size in sizes:
        for channels in ((1, 3) if preset.startswith("tensor") else (3,)):
            pp = preprocessing(preset, size, channels)
            ref_tf = torchvision_reference(preset, size, pp.mean, pp.std)
            tf = build_transform(preset, train=False, image_size=size, mean=pp.mean, std=pp.std, channels=channels)
            for h, w in [(40, 40), (37, 61), (90, 50), (20, 10)]:
                img = noise(h, w).convert(pp.color)
                got, ref = pp(img), ref_tf(img).numpy()
                assert got.dtype == np.float32 and got.shape == ref.shape == (channels, *size)
                np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=f"{preset} {size} {channels} {h}x{w}")
                # the evaluation pipeline is this preprocessing, to the bit
                assert np.array_equal(tf(img).numpy(), got)
                if preset.startswith("tensor"):  # array data (digits) through the tensor steps: within 1e-5
                    arr = np.asarray(img)
                    np.testing.assert_allclose(tf(arr).numpy(), got, atol=1e-5)


def test_images_are_brought_to_the_model_channels_and_size():
    pp = preprocessing("tensor", (8, 8), channels=1)
    for img in (noise(32, 32), noise(300, 17).convert("RGBA"), Image.new("P", (5, 9)), Image.new("L", (8, 8))):
        assert pp(img).shape == (1, 8, 8)
    assert preprocessing("tensor", (28, 28), channels=3)(Image.new("L", (64, 64))).shape == (3, 28, 28)
    unsized = preprocessing("tensor", None, channels=3)
    assert unsized.input_size is None and unsized(noise(13, 21)).shape == (3, 13, 21)
    with pytest.raises(ImageTooLargeError, match="records no input size"):
        unsized(Image.new("RGB", (1100, 1000)))


def test_default_pixel_limit_follows_the_model_input():
    assert default_max_pixels((8, 8)) == MIN_MAX_PIXELS
    assert default_max_pixels((512, 512)) == 256 * 512 * 512
    assert default_max_pixels(None) == UNSIZED_MAX_PIXELS
    assert preprocessing("tensor", None).pixel_limit(10 ** 9) == UNSIZED_MAX_PIXELS  # never above, unsized
    assert preprocessing("imagenet", (32, 32)).pixel_limit(1234) == 1234


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_is_refused_from_its_header_fast():
    bomb = black_png(9000)
    assert len(bomb) < 300_000  # a quarter of a megabyte on the wire, 243 MB of pixels
    pp = preprocessing("imagenet", (32, 32))
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="9000x9000 = 81000000 pixels, above the limit of 16777216"):
        pp.decode(bomb)
    assert time.perf_counter() - start < 0.1


def test_large_jpeg_decodes_at_reduced_scale_close_to_full_decode():
    big = noise(60, 90).resize((1800, 1200), Image.Resampling.BICUBIC)
    data = encoded(big, "JPEG", quality=92)
    pp = preprocessing("imagenet", (64, 64))  # resizes the short side to 73
    img = pp.decode(data)
    assert img.size == (450, 300) and min(img.size) >= 73 * REDUCING_GAP  # 1/4 scale, never below 3x the resize
    full = Image.open(io.BytesIO(data)).convert("RGB")
    np.testing.assert_allclose(pp(img), pp(full), atol=0.1)  # normalised units: within ~2 grey levels
    small = encoded(noise(40, 40), "JPEG")
    assert pp.decode(small).size == (40, 40)  # nothing to gain: decoded whole, pixels as PIL's


def test_decode_errors_say_what_is_wrong(tmp_path):
    pp = preprocessing("imagenet", (32, 32))
    with pytest.raises(NotAnImageError, match="not an image"):
        pp.decode(b"%!PS-Adobe-3.0 EPSF-3.0\n")  # no Ghostscript behind an upload
    with pytest.raises(ImageError, match="empty"):
        pp.decode(b"")
    with pytest.raises(ImageError, match="truncated"):
        pp.decode(encoded(noise(64, 64), "PNG")[:-200])
    with pytest.raises(ImageError, match=r"image .*missing.png: file not found"):
        pp.decode_file(tmp_path / "missing.png")


# -- the predictor ---------------------------------------------------------------------------------

def digits_checkpoint(path, input_shape=None):
    torch.manual_seed(0)
    cfg = load_config(None, DIGITS)
    state = {"step": 0} if input_shape is None else {"step": 0, "input_shape": input_shape}
    return save_checkpoint(path, cfg=cfg, model=build_model(cfg), losses=torch.nn.ModuleList(), optimizers={},
                           state=state)


def test_a_size_free_preset_is_resized_to_the_recorded_training_shape(tmp_path):
    """The quickstart's case: 'tensor' never resizes, so the trainer's state.json input_shape says 8x8."""
    predictor = Predictor.from_checkpoint(digits_checkpoint(tmp_path / "ckpt", [1, 8, 8]))
    assert predictor.input_shape == (1, 8, 8) and predictor.pixel_limit() == MIN_MAX_PIXELS
    model = predictor._run
    seen = []
    predictor._run = lambda x: (seen.append(x.shape), model(x))[1]
    out = predictor.embed_images([noise(32, 32), noise(640, 480).convert("L"), noise(5, 7)])
    assert out.shape == (3, 16) and seen == [(3, 1, 8, 8)]  # one batch: every image at 8x8, one channel
    onnx = Predictor.from_checkpoint(tmp_path / "ckpt", runtime="onnx")
    assert onnx.input_shape == (1, 8, 8)
    np.testing.assert_allclose(onnx.embed_images([noise(32, 32)]), out[:1], atol=1e-4)


def test_without_a_recorded_size_images_are_bounded(tmp_path):
    predictor = Predictor.from_checkpoint(digits_checkpoint(tmp_path / "ckpt"))
    assert predictor.input_shape is None and predictor.pixel_limit() == UNSIZED_MAX_PIXELS
    assert predictor.embed_images([noise(12, 9), noise(30, 40)]).shape == (2, 16)  # each at its own size
    path = tmp_path / "big.png"
    Image.new("L", (1500, 1000)).save(path)
    with pytest.raises(ImageTooLargeError, match="big.png: image is 1500x1000"):
        predictor.embed_images([str(path)])


def test_onnx_file_predictor_matches_pytorch(checkpoint_dir, tmp_path):
    from deepmetric.inference.export import export_checkpoint

    path = tmp_path / "m.onnx"
    export_checkpoint(checkpoint_dir, "onnx", path)
    torch_p, onnx_p = Predictor.from_checkpoint(checkpoint_dir), Predictor.from_onnx(path)
    assert onnx_p.runtime == "onnx" and onnx_p.input_shape == (3, 32, 32) == torch_p.input_shape
    assert onnx_p.embedding_dim == 16 and onnx_p.normalized
    images = [noise(40, 40, s) for s in range(3)] + [noise(500, 300)]
    np.testing.assert_allclose(onnx_p.embed_images(images), torch_p.embed_images(images), atol=1e-4)
    data = encoded(noise(50, 70), "PNG")
    np.testing.assert_allclose(onnx_p.embed_images([onnx_p.decode(data)]),
                               torch_p.embed_images([torch_p.decode(data)]), atol=1e-4)
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(UserError, match="bad.onnx: not a readable ONNX model"):
        Predictor.from_onnx(tmp_path / "bad.onnx")


def test_onnx_metadata_input_shape_gives_the_size_of_a_size_free_export(tmp_path):
    """A size-free export (``input_size`` null) whose metadata records ``input_shape`` is fed that size."""
    from deepmetric.engine.build import load_for_inference
    from deepmetric.inference.export import export_onnx, preprocessing_metadata

    model, cfg, ckpt = load_for_inference(digits_checkpoint(tmp_path / "ckpt"))
    meta = preprocessing_metadata(cfg, model, ckpt)
    assert meta["input_size"] is None
    export_onnx(model, tmp_path / "free.onnx", meta)
    export_onnx(model, tmp_path / "shaped.onnx", dict(meta, input_shape=[1, 8, 8]))
    assert Predictor.from_onnx(tmp_path / "free.onnx").input_shape is None
    shaped = Predictor.from_onnx(tmp_path / "shaped.onnx")
    assert shaped.input_shape == (1, 8, 8) and shaped.embed_images([noise(64, 64)]).shape == (1, 16)


def test_export_writes_the_recorded_training_shape(tmp_path):
    """``deepmetric export`` of a checkpoint whose state.json records input_shape: the ONNX metadata
    carries it, so the exported model is fed the size it was trained at."""
    from deepmetric.inference.export import export_checkpoint, read_onnx_metadata

    export_checkpoint(digits_checkpoint(tmp_path / "ckpt", [1, 8, 8]), "onnx", tmp_path / "m.onnx")
    meta = read_onnx_metadata(tmp_path / "m.onnx")
    assert meta["input_shape"] == [1, 8, 8] and meta["input_size"] is None
    assert Predictor.from_onnx(tmp_path / "m.onnx").input_shape == (1, 8, 8)
    export_checkpoint(digits_checkpoint(tmp_path / "plain", None), "onnx", tmp_path / "plain.onnx")
    assert "input_shape" not in read_onnx_metadata(tmp_path / "plain.onnx")
