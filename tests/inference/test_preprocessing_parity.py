"""One decode and one test-time pipeline: ``deepmetric eval``, ``deepmetric embed``, the Python
:class:`Predictor` and an exported ONNX model give the same vectors for every file format the loader
reads, and 16-bit and EXIF-rotated images decode as what they show (issues 22 and 23)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deepmetric.cli import main
from deepmetric.config import load_config, save_config
from deepmetric.core.images import decode_image, load_image_file
from deepmetric.data.io import load_image, read_image_tensor
from deepmetric.engine.build import build_model
from deepmetric.engine.checkpoint import save_checkpoint
from deepmetric.engine.runs import evaluate
from deepmetric.inference.export import export_checkpoint
from deepmetric.inference.predictor import Predictor, load_embeddings

ORIENTATION = 0x0112


def _noise(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth random picture (so that JPEG and WebP keep most of it) of ``h x w`` RGB pixels."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR))


def write_formats(folder) -> dict:
    """One file per format and mode the loader reads, in two class folders; returns ``{name: path}``."""
    a, b = folder / "a", folder / "b"
    a.mkdir(parents=True)
    b.mkdir()
    rgb = Image.fromarray(_noise(30, 40, 0))
    alpha = Image.fromarray(np.linspace(0, 255, 30 * 40).astype(np.uint8).reshape(30, 40))
    rgba = rgb.copy()
    rgba.putalpha(alpha)
    palette = rgb.quantize(16)
    palette_t = palette.copy()
    palette_t.info["transparency"] = 3
    grey = rgb.convert("L")
    files = {
        "png_grey": (a / "grey.png", grey, {}),
        "png_rgb": (a / "rgb.png", rgb, {}),
        "png_rgba": (a / "rgba.png", rgba, {}),
        "png_palette": (a / "palette.png", palette, {}),
        "png_palette_transparent": (a / "palette_t.png", palette_t, {"transparency": 3}),
        "jpeg": (b / "photo.jpg", Image.fromarray(_noise(36, 28, 1)), {"quality": 90}),
        "jpeg_grey": (b / "grey.jpg", Image.fromarray(_noise(36, 28, 2)).convert("L"), {"quality": 90}),
        "webp": (b / "photo.webp", Image.fromarray(_noise(26, 33, 3)), {"quality": 80}),
        "webp_alpha": (b / "alpha.webp", rgba, {"lossless": True}),
        "bmp": (b / "photo.bmp", Image.fromarray(_noise(20, 24, 4)), {}),
        "gif": (b / "photo.gif", Image.fromarray(_noise(20, 24, 5)).quantize(64), {}),
        "tiff": (b / "photo.tiff", Image.fromarray(_noise(20, 24, 6)), {}),
    }
    for path, img, kw in files.values():
        img.save(path, **kw)
    # 16-bit greyscale: the 8-bit image v stored as 257 v
    (a / "grey16.png").write_bytes(b"")
    Image.fromarray(np.asarray(grey).astype(np.uint16) * 257).save(a / "grey16.png")
    # EXIF orientation 6: the picture stored sideways (90 degrees clockwise to view upright)
    sideways = Image.fromarray(_noise(28, 44, 7))
    exif = sideways.getexif()
    exif[ORIENTATION] = 6
    sideways.save(b / "rotated.jpg", quality=95, exif=exif)
    out = {k: v[0] for k, v in files.items()}
    out.update(png_grey16=a / "grey16.png", jpeg_exif6=b / "rotated.jpg")
    return out


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    return write_formats(tmp_path_factory.mktemp("formats") / "images")


def test_sixteen_bit_and_exif_images_decode_as_they_show(formats):
    grey = np.asarray(load_image_file(formats["png_grey"], mode="L"))
    assert np.array_equal(np.asarray(load_image_file(formats["png_grey16"], mode="L")), grey)
    assert np.array_equal(np.asarray(load_image_file(formats["png_grey16"], mode="RGB"))[..., 1], grey)
    raw = np.asarray(Image.open(formats["jpeg_exif6"]).convert("RGB"))  # as stored: 44 wide, 28 high
    upright = np.asarray(load_image_file(formats["jpeg_exif6"]))
    assert raw.shape == (28, 44, 3) and upright.shape == (44, 28, 3)
    assert np.array_equal(upright, np.rot90(raw, k=-1))  # orientation 6: rotate 90 degrees clockwise
    # transparency shows a white page
    rgba = np.asarray(load_image_file(formats["png_rgba"]))
    src = np.asarray(Image.open(formats["png_rgba"]), dtype=np.int64)
    expected = (src[..., :3] * src[..., 3:] + 255 * (255 - src[..., 3:]) + 127) // 255
    assert np.array_equal(rgba, expected) and rgba[0, 0].tolist() == [255, 255, 255]
    assert np.asarray(load_image_file(formats["png_palette_transparent"])).min() >= 0


@pytest.mark.parametrize("channels", [1, 3])
def test_training_decodes_the_pixels_evaluation_decodes(formats, channels):
    """Both training decoders (the fast torchvision path and PIL) give the one decode's pixels."""
    mode = "L" if channels == 1 else "RGB"
    for name, path in formats.items():
        ref = np.asarray(load_image_file(path, mode=mode))
        ref = ref[None] if ref.ndim == 2 else ref.transpose(2, 0, 1)
        fast = read_image_tensor(path, channels=channels).numpy()
        if channels == 1 and fast.shape[0] == 3:  # the caller converts to grey next (ToChannels)
            from deepmetric.data.transforms import ToChannels

            fast = ToChannels(1)(torch.from_numpy(fast)).numpy()
        assert np.array_equal(fast, ref), name
        slow = np.asarray(load_image(path, channels=channels))
        assert np.array_equal(slow[None] if slow.ndim == 2 else slow.transpose(2, 0, 1), ref), name


def _run_dir(root, tmp_path, preset, size, channels, members=1):
    cfg = load_config(None, ["data.format=image_folder", f"data.root={root}", f"data.transform={preset}",
                             f"data.image_size=[{size[0]}, {size[1]}]", f"model.in_chans={channels}",
                             "model.backbone=small_cnn", "model.backbone_options={width: 8, grid: 2}",
                             "model.embedding_dim=8", "eval.metric=map@r", f"model.members={members}"])
    torch.manual_seed(0)
    run = tmp_path / f"run-{preset}-{channels}-{members}"
    run.mkdir()
    save_config(cfg, run / "config.yaml")
    save_checkpoint(run / "checkpoints" / "best", cfg=cfg, model=build_model(cfg), losses=torch.nn.ModuleList(),
                    optimizers={}, state={"step": 0, "input_shape": [channels, *size]})
    return run


@pytest.mark.parametrize("preset,size,channels,members", [("imagenet", (24, 24), 3, 1), ("tensor", (16, 20), 1, 1),
                                                          ("reid", (24, 12), 3, 1), ("tensor", (16, 20), 1, 3)])
def test_eval_embed_predictor_and_onnx_give_the_same_vectors(formats, tmp_path, preset, size, channels, members):
    """... for one network, and for an ensemble of three (``model.members``: 3 x 8 dimensions)."""
    root = formats["png_rgb"].parent.parent
    run = _run_dir(root, tmp_path, preset, size, channels, members)
    ev = evaluate(str(run), output=str(tmp_path / f"eval-{preset}"))
    q = ev.result.query
    by_path = {p: v for p, v in zip(q.paths, q.vectors.numpy())}
    assert set(by_path) == {str(p) for p in formats.values()}
    names = list(formats)
    paths = [str(formats[n]) for n in names]
    ref = np.stack([by_path[p] for p in paths])
    assert ref.shape[1] == 8 * members

    assert main(["-q", "embed", "--checkpoint", str(run), "--input", str(root), "--output",
                 str(tmp_path / "f.npz")]) == 0
    embedded = load_embeddings(tmp_path / "f.npz").embeddings
    got = dict(zip(embedded.paths, embedded.vectors.numpy()))
    onnx_path = tmp_path / "m.onnx"
    export_checkpoint(run / "checkpoints" / "best", "onnx", onnx_path)
    outputs = {
        "embed": np.stack([got[p] for p in paths]),
        "predictor": Predictor.from_checkpoint(run).embed_images(paths),
        "predictor_bytes": Predictor.from_checkpoint(run).embed_images(
            [Predictor.from_checkpoint(run).decode(open(p, "rb").read()) for p in paths]),
        "onnx": Predictor.from_onnx(onnx_path).embed_images(paths),
    }
    for how, vectors in outputs.items():
        diff = np.abs(vectors - ref).max(axis=1)
        assert diff.max() <= 1e-5, (how, dict(zip(names, diff.round(8))))
    # the 16-bit file is its 8-bit original, everywhere
    assert np.abs(ref[names.index("png_grey16")] - ref[names.index("png_grey")]).max() <= 1e-6
    # the EXIF-rotated photo is embedded upright: as the upright pixels stored plainly
    upright = tmp_path / "upright.png"
    load_image_file(formats["jpeg_exif6"]).save(upright)
    np.testing.assert_allclose(Predictor.from_checkpoint(run).embed_images([str(upright)])[0],
                               ref[names.index("jpeg_exif6")], atol=1e-6)


def test_upload_bytes_decode_like_files(formats):
    for path in formats.values():
        data = open(path, "rb").read()
        assert np.array_equal(np.asarray(decode_image(data)), np.asarray(load_image_file(path)))
