"""A random affine drawn per image and warped per batch gives the per-image pipeline's pixels; grey
PNGs decode as their one channel; the CPU trains convolutions in NHWC order (train.channels_last)."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from deepmetric.config import ConfigError, load_config
from deepmetric.data.io import read_image_tensor
from deepmetric.data.loading import SeededDataset, affine_on_batch
from deepmetric.data.transforms import AffineDraw, Pipeline, ToChannels, build_transform
from deepmetric.engine.build import channels_last
from deepmetric.engine.trainer import Trainer
from deepmetric.quickstart import RECIPE


def _per_image_and_batched(pipeline, images):
    head, warp = pipeline.split_affine()
    ref, items = [], []
    for i, img in enumerate(images):
        torch.manual_seed(i)
        ref.append(pipeline(img))
        torch.manual_seed(i)
        items.append(head(img))
    x, theta = torch.stack([a for a, _ in items]), torch.stack([b for _, b in items])
    return torch.stack(ref), warp(x, theta)


@pytest.mark.parametrize("interpolation, fill, size, dtype", [
    ("nearest", 0, (32, 32), torch.float32),
    ("bilinear", 0.3, (20, 27), torch.float32),
    ("nearest", [1, 2, 3], (17, 16), torch.uint8),
    ("bilinear", 7, (33, 31), torch.uint8),
])
def test_batched_warp_gives_the_per_image_pixels(interpolation, fill, size, dtype):
    g = torch.Generator().manual_seed(0)
    c = 3 if isinstance(fill, list) else 1
    affine = T.RandomAffine(degrees=30, translate=(0.2, 0.1), scale=(0.8, 1.2), shear=(-10, 10, -5, 5),
                            interpolation=T.InterpolationMode(interpolation), fill=fill)
    steps = [affine, T.Normalize([0.5] * c, [0.25] * c)] if dtype == torch.float32 else [affine]
    images = [(torch.rand(c, *size, generator=g) * 255).to(dtype) for _ in range(24)]
    ref, out = _per_image_and_batched(Pipeline(steps, "torchvision"), images)
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    assert not torch.equal(ref[0], ref[1]), "each image drew its own transform"


def test_the_tensor_augment_preset_splits_and_others_do_not():
    head, warp = build_transform("tensor_augment", train=True, channels=1).split_affine()
    assert isinstance(head.transforms[-1], AffineDraw) and head.channels == 1
    assert [type(s).__name__ for s in warp.tail] == ["Normalize"]
    for preset in ("tensor", "imagenet", "reid"):
        assert build_transform(preset, train=True).split_affine() is None, preset
    off_centre = T.RandomAffine(degrees=5, center=[1.0, 2.0])
    assert Pipeline([off_centre], "torchvision").split_affine() is None
    then_crop = [T.RandomAffine(degrees=5), T.RandomCrop(8)]  # a step that cannot run on the batch
    assert Pipeline(then_crop, "torchvision").split_affine() is None


def test_trainer_batches_hold_the_per_image_pipeline_pixels(tmp_path, tiny_overrides):
    cfg = load_config(RECIPE, [*tiny_overrides, "data.transform=tensor_augment"])
    trainer = Trainer(cfg, tmp_path / "run")
    assert trainer.batch_affine is not None
    trainer.batch_plan.set_epoch(0)
    keys = next(iter(trainer.batch_plan))
    reference = torch.stack([SeededDataset(trainer.splits.train)[k][0] for k in keys])
    images, labels, _ = next(trainer._batches())
    assert torch.equal(images, reference)
    assert labels.tolist() == [int(trainer.splits.train.labels[i]) for i, _ in keys]
    plain, none = affine_on_batch(trainer.splits.query)
    assert none is None and plain is trainer.splits.query, "the test pipeline has nothing random to split"


def test_grey_png_decodes_as_its_one_channel(tmp_path):
    rng = np.random.default_rng(0)
    grey, rgb = tmp_path / "grey.png", tmp_path / "rgb.png"
    Image.fromarray(rng.integers(0, 256, (9, 7), dtype=np.uint8), "L").save(grey)
    Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8), "RGB").save(rgb)
    to_grey = ToChannels(1)
    one = read_image_tensor(grey, channels=1)
    assert one.shape == (1, 9, 7) and torch.equal(one, to_grey(read_image_tensor(grey)))
    colour = read_image_tensor(rgb, channels=1)  # an RGB file is still converted by PIL's L formula
    assert colour.shape == (3, 9, 7) and torch.equal(to_grey(colour)[0], torch.from_numpy(
        np.array(Image.open(rgb).convert("L"))))
    assert read_image_tensor(grey).shape == (3, 9, 7), "without channels=1 the contract is RGB"


def test_channels_last_auto_is_on_for_cpu_convolutions():
    conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten())
    linear = torch.nn.Linear(4, 2)
    assert channels_last("auto", "cpu", conv) is True
    assert channels_last("auto", "cpu", linear) is False
    assert channels_last("auto", "cuda", conv) is False
    assert channels_last(False, "cpu", conv) is False and channels_last(True, "cuda", linear) is True
    with pytest.raises(ConfigError, match="train.channels_last"):
        load_config(None, ["train.channels_last=maybe"])
