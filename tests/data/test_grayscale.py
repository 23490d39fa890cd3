"""Images arrive in the model's channel count (``model.in_chans``): greyscale folders train a
one-channel model, with the same pixels from both decoders and in the predictor."""
import numpy as np
import pytest
import torch
from PIL import Image

from deepmetric.config import ConfigError, load_config
from deepmetric.data.io import load_image, read_image_tensor
from deepmetric.data.synthetic import make_image_folder
from deepmetric.data.transforms import ToChannels, build_transform, channel_stats
from deepmetric.engine.build import build_transforms
from deepmetric.engine.trainer import Trainer


def _grey_folder(dst, n_classes=4, per_class=4, size=16):
    """The synthetic class folder, each image saved again as a one-channel PNG."""
    root = make_image_folder(dst, n_classes=n_classes, per_class=per_class, size=size)
    for jpg in sorted(root.rglob("*.jpg")):
        Image.open(jpg).convert("L").save(jpg.with_suffix(".png"))
        jpg.unlink()
    return root


def test_to_one_channel_is_pils_L_on_both_decoders(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (23, 31, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(rgb).save(path)
    expected = np.asarray(Image.fromarray(rgb).convert("L"))
    from_tensor = ToChannels(1)(read_image_tensor(path))
    from_pil = ToChannels(1)(load_image(path))
    assert from_tensor.dtype == torch.uint8 and from_tensor.shape == (1, 23, 31)
    np.testing.assert_array_equal(from_tensor[0].numpy(), expected)
    np.testing.assert_array_equal(np.asarray(from_pil), expected)


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_a_grey_file_keeps_its_pixels(tmp_path, ext):
    grey = np.random.default_rng(1).integers(0, 256, (12, 9), dtype=np.uint8)
    path = tmp_path / f"g.{ext}"
    Image.fromarray(grey).save(path, quality=95)
    pixels = np.asarray(Image.open(path))  # after JPEG's loss, what the file holds
    for decoder in ("torchvision", "pil"):
        tf = build_transform("tensor", train=False, decoder=decoder, channels=1)
        x = read_image_tensor(path) if tf.decoder == "torchvision" else load_image(path)
        out = tf(x)
        assert out.shape == (1, 12, 9), decoder
        np.testing.assert_allclose(out[0].numpy(), (pixels / 255.0 - 0.5) / 0.5, atol=1e-6)


def test_rgb_constants_become_one_for_one_channel():
    assert channel_stats((0.5,), 3) == (0.5,)
    assert channel_stats((0.485, 0.456, 0.406), 3) == (0.485, 0.456, 0.406)
    assert channel_stats((0.3, 0.6, 0.9), 1) == pytest.approx((0.6,))
    tf = build_transform("imagenet", train=True, image_size=16, channels=1)
    assert tuple(tf.transforms[-1].mean) == pytest.approx((np.mean([0.485, 0.456, 0.406]),))
    test = build_transform("imagenet", train=False, image_size=16, channels=1).transforms[0].preprocessing
    assert test.channels == 1 and test.mean == pytest.approx((np.mean([0.485, 0.456, 0.406]),))
    with pytest.raises(ValueError, match="channels=2: the preset normalises 3 channels"):
        channel_stats((0.485, 0.456, 0.406), 2)
    import doctest

    from deepmetric.data import transforms

    assert doctest.testmod(transforms, raise_on_error=False).failed == 0


def test_an_impossible_channel_count_names_both_keys(tmp_path):
    cfg = load_config(None, ["data.format=image_folder", f"data.root={tmp_path}", "data.transform=imagenet",
                             "model.in_chans=2"])
    with pytest.raises(ConfigError, match=r"^data.transform: model.in_chans=2: "):
        build_transforms(cfg)


def _recipe(root, *extra):
    return load_config(None, ["data.format=image_folder", f"data.root={root}", "model.backbone=small_cnn",
                              "model.backbone_options={width: 8, grid: 2}", "model.embedding_dim=8",
                              "data.classes_per_batch=2", "data.samples_per_class=2", "optimizer.name=sgd",
                              "optimizer.lr=0.1", "train.progress=false", "train.log_every=1", "eval.ks=[1]",
                              "train.max_steps=2", "train.eval_every=2", *extra])


@pytest.mark.parametrize("preset", ["tensor", "imagenet"])
def test_a_grey_folder_trains_a_one_channel_model(tmp_path, preset):
    """End to end: used to fail in the first convolution (the loader made every image RGB)."""
    from deepmetric.inference.predictor import Predictor

    root = _grey_folder(tmp_path / "grey")
    # the predictor resizes PIL images: the same decoder here, so that the pixels are equal (tensor and
    # PIL antialiased resizing differ by rounding, see build_transform)
    trainer = Trainer(_recipe(root, "model.in_chans=1", f"data.transform={preset}", "data.image_size=[16,16]",
                              "data.decoder=pil"), tmp_path / "run")
    result = trainer.fit()
    assert result["step"] == 2 and 0.0 <= trainer.last_result.metrics["recall@1"] <= 1.0
    # the predictor (embed, search, serve) feeds the exported model what training fed it
    paths = sorted(str(p) for p in root.rglob("*.png"))[:5]
    predictor = Predictor.from_checkpoint(tmp_path / "run")
    _, test_tf = build_transforms(trainer.cfg)
    batch = torch.stack([test_tf(read_image_tensor(p) if test_tf.decoder == "torchvision" else load_image(p))
                         for p in paths])
    with torch.no_grad():
        expected = trainer.model.eval()(batch).numpy()
    assert np.abs(predictor.embed_images(paths) - expected).max() <= 1e-5


def test_a_colour_folder_trains_a_one_channel_model(tmp_path):
    root = make_image_folder(tmp_path / "colour", n_classes=4, per_class=4, size=16)
    assert Trainer(_recipe(root, "model.in_chans=1", "data.transform=tensor"), tmp_path / "run").fit()["step"] == 2


def test_a_grey_folder_trains_an_rgb_model(tmp_path):
    root = _grey_folder(tmp_path / "grey")
    assert Trainer(_recipe(root, "data.transform=tensor"), tmp_path / "run").fit()["step"] == 2
