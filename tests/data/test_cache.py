"""``data.cache``: inputs decoded once and kept in memory give the run without the cache, bit for bit;
only the deterministic steps are kept, the memory limit holds, and the time budget plans the
decoding as a one-off cost."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deepmetric.config import ConfigError, load_config
from deepmetric.data.cache import AUTO_LIMIT_GB, CachedDataset, InputCache, cache_limit, deterministic_prefix
from deepmetric.data.loading import affine_on_batch
from deepmetric.data.transforms import AffineDraw, build_transform
from deepmetric.engine.build import build_data
from deepmetric.engine.budget import plan_steps
from deepmetric.engine.trainer import Trainer


def folder(root, n_classes=6, per_class=6, size=20):
    rng = np.random.default_rng(0)
    for c in range(n_classes):
        d = root / f"k{c}"
        d.mkdir(parents=True)
        base = rng.integers(0, 256, (5, 5))
        for i in range(per_class):
            img = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).resize((size, size), Image.Resampling.BILINEAR).save(d / f"{i}.png")
    return root


RECIPE = ["data.format=image_folder", "data.options={}", "data.transform=tensor", "data.image_size=[16,16]",
          "model.in_chans=1", "model.backbone_options={width: 8, grid: 2}", "model.embedding_dim=16",
          "data.classes_per_batch=3", "data.samples_per_class=3", "data.val_classes=null",
          "data.train_classes=[k0,k1,k2,k3]", "losses=[{name: multi_similarity, params: {miner_epsilon: 0.1}}]",
          "eval.metric=map@r", "train.max_steps=14", "train.eval_every=7", "train.log_every=7", "train.progress=false"]


def test_only_the_steps_that_draw_nothing_are_kept():
    prefix, rest = deterministic_prefix(build_transform("tensor", train=True, image_size=16, channels=1))
    assert rest is None and len(prefix.transforms) == 4  # channels, to tensor, resize, normalise: all of it
    prefix, rest = deterministic_prefix(build_transform("face", train=False, image_size=16))
    assert rest is None  # every test pipeline (the one test-time definition) is deterministic
    assert deterministic_prefix(build_transform("imagenet", train=True, image_size=16)) is None  # a random crop first
    assert deterministic_prefix(lambda x: x) is None  # a callable of your own may draw
    # tensor_augment, with its affine done on the batch: the resized image is kept, the draw is not
    augment = build_transform("tensor_augment", train=True, image_size=16, channels=1)

    class View:
        transform = augment

        def with_transform(self, t):
            v = View()
            v.transform = t
            return v

    view, _ = affine_on_batch(View())
    prefix, rest = deterministic_prefix(view.transform)
    assert [type(s) for s in rest.transforms] == [AffineDraw]


def test_cached_items_are_the_pipelines_own_and_the_limit_holds(tmp_path):
    cfg = load_config(None, [*RECIPE, f"data.root={folder(tmp_path / 'imgs')}"])
    splits = build_data(cfg)
    plain = splits.query
    cache = InputCache(10 ** 9)
    cached = cache.wrap(plain, "test/query")
    assert isinstance(cached, CachedDataset) and len(cached) == len(plain)
    for _ in range(2):  # computed, then from memory: the same tensors as the files give
        for i in range(len(plain)):
            x, label, index = cached[i]
            y, label_y, _ = plain[i]
            assert torch.equal(x, y) and label == label_y and index == i
    stats = cache.stats("test/query")
    assert stats.misses == len(plain) and stats.hits == len(plain) and stats.miss_s > 0
    assert cache.used == len(plain) * 16 * 16 * 4 and cache.left_to_fill("test/query") == 0
    assert cache.wrap(plain, "test/query").store is cached.store  # one store per split
    small = InputCache(3 * 16 * 16 * 4)  # room for three items: the rest are computed every time
    tight = small.wrap(plain, "q")
    for _ in range(2):
        for i in range(len(plain)):
            assert torch.equal(tight[i][0], plain[i][0])
    assert small.used == 3 * 16 * 16 * 4 and small.left_to_fill("q") == len(plain) - 3 and not small.fits("q")


def test_a_run_with_the_cache_is_the_run_without_it(tmp_path):
    root = folder(tmp_path / "imgs")
    runs = {}
    for setting in ("false", "auto"):
        trainer = Trainer(load_config(None, [*RECIPE, f"data.root={root}", f"data.cache={setting}"]),
                          tmp_path / setting)
        runs[setting] = trainer.fit()
        if setting == "auto":
            stats = trainer.parts.cache.stats("train")
            assert stats.misses == len(trainer.splits.train) and stats.hits > 0  # 14 steps of 9: past one epoch
            assert trainer.parts.cache.stats("test/query").hits > 0
        else:
            assert trainer.parts.cache is None
    assert runs["auto"]["metrics"] == runs["false"]["metrics"]
    a = (tmp_path / "auto" / "checkpoints" / "last" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "false" / "checkpoints" / "last" / "model.safetensors").read_bytes()


def test_the_setting_and_the_budget():
    assert cache_limit(False) == 0 and cache_limit(0.5) == 2 ** 29
    assert 0 < cache_limit("auto") <= AUTO_LIMIT_GB * 2 ** 30
    assert load_config(None, ["data.cache=2"]).data.cache == 2.0
    with pytest.raises(ConfigError, match="data.cache"):
        load_config(None, ["data.cache=lots"])
    # 1,000 images to decode once at 1 ms, 10 a step of 0.1 s: the first 100 steps pay for them
    plain = plan_steps(100.0, 10.0, 0.1, 2.0, 3.0, eval_every=1000)
    filled = plan_steps(100.0, 10.0, 0.1, 2.0, 3.0, eval_every=1000, fill=(1000, 0.001, 10))
    assert filled.fill_s == pytest.approx(1.0) and filled.max_steps == plain.max_steps - 10
    assert "decode the images into memory once" in filled.describe("100s")
    few = plan_steps(100.0, 10.0, 0.1, 2.0, 3.0, eval_every=1000, fill=(10 ** 6, 0.001, 10))  # never all read
    assert few.max_steps == int(85.0 / (0.1 + 2.0 / 1000 + 0.01))
