from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deepmetric.data.transforms import PRESETS, RandomErasing, build_transform, describe


@pytest.fixture(scope="module")
def photo():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (60, 45, 3), dtype=np.uint8))  # W=45, H=60


@pytest.mark.parametrize("preset,shape", [
    ("paddle_sop", (3, 224, 224)), ("xbm", (3, 224, 224)), ("reid", (3, 256, 128)),
    ("face", (3, 112, 112)), ("imagenet", (3, 224, 224)),
])
@pytest.mark.parametrize("train", [True, False])
def test_preset_shapes(photo, preset, shape, train):
    torch.manual_seed(0)
    x = build_transform(preset, train)(photo)
    assert x.dtype == torch.float32 and tuple(x.shape) == shape
    assert describe(preset)["input_size"] == list(shape[1:])


@pytest.mark.parametrize("preset", ["paddle_sop", "xbm", "reid", "face", "imagenet"])
def test_image_size_override(photo, preset):
    for train in (True, False):
        assert tuple(build_transform(preset, train, image_size=(32, 16))(photo).shape) == (3, 32, 16)
    assert tuple(build_transform(preset, False, image_size=24)(photo).shape) == (3, 24, 24)


def test_tensor_preset_accepts_arrays_and_pil():
    t = build_transform("tensor", train=False)
    x = t(np.full((8, 8), 255, dtype=np.uint8))
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and torch.allclose(x, torch.ones(1, 8, 8))
    x = t(np.zeros((8, 8, 3), dtype=np.float64))
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and torch.allclose(x, -torch.ones(3, 8, 8))
    assert t(Image.new("RGB", (5, 7))).shape == (3, 7, 5)
    assert build_transform("tensor", True, image_size=16)(np.zeros((8, 8))).shape == (1, 16, 16)
    assert torch.equal(build_transform("tensor", True)(np.eye(4)), build_transform("tensor", False)(np.eye(4)))
    with pytest.raises(ValueError, match="expected an"):
        t(np.zeros((2, 2, 2, 2)))


def test_normalisation_values():
    white = Image.new("RGB", (112, 112), (255, 255, 255))
    x = build_transform("face", train=False)(white)
    assert torch.allclose(x, torch.ones_like(x))  # ((255/255) - 0.5) / 0.5
    x = build_transform("xbm", train=False)(Image.new("RGB", (300, 300), (0, 0, 0)))
    assert torch.allclose(x[:, 0, 0], torch.tensor([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]))
    x = build_transform("xbm", False, mean=(0, 0, 0), std=(1, 1, 1))(Image.new("RGB", (300, 300), (255, 0, 0)))
    assert torch.allclose(x[:, 5, 5], torch.tensor([1.0, 0.0, 0.0]))
    d = describe("reid", mean=(0.5, 0.5, 0.5))
    assert d["mean"] == [0.5, 0.5, 0.5] and d["std"] == [0.229, 0.224, 0.225] and d["input_size"] == [256, 128]
    assert describe("tensor")["input_size"] is None


def test_train_is_random_test_is_deterministic(photo):
    for preset in ("paddle_sop", "reid"):
        train, test = build_transform(preset, True), build_transform(preset, False)
        torch.manual_seed(1)
        a = train(photo)
        b = train(photo)
        assert not torch.equal(a, b)
        torch.manual_seed(1)
        assert torch.equal(a, train(photo))  # reproducible under a seed
        assert torch.equal(test(photo), test(photo))


def test_random_erasing_fills_a_rectangle_with_value():
    torch.manual_seed(0)
    erase = RandomErasing(p=1.0, value=(0.25, 0.5, 0.75))
    x = erase(torch.full((3, 64, 32), 9.0))
    mask = x[0] != 9.0
    assert mask.any() and (x[0][mask] == 0.25).all() and (x[2][mask] == 0.75).all()
    rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
    h, w = len(rows), len(cols)
    assert mask.sum() == h * w  # one rectangle
    assert 0.02 * 64 * 32 * 0.5 <= h * w <= 0.4 * 64 * 32 * 1.5
    assert torch.equal(RandomErasing(p=0.0)(torch.ones(3, 4, 4)), torch.ones(3, 4, 4))


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError) as e:
        build_transform("resnet", train=True)
    for name in PRESETS:
        assert name in str(e.value)
    with pytest.raises(ValueError):
        describe("nope")
    with pytest.raises(ValueError, match="image_size"):
        build_transform("xbm", True, image_size=(1, 2, 3))
