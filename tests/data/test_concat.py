"""The ``concat`` format: digits and a generated image folder in one run, class ids offset per part,
names prefixed by the part, the zero-shot protocol applied to the union, and a short training run."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from deepmetric.config import ConfigError, load_config
from deepmetric.data.base import DataError
from deepmetric.data.formats import DATASETS
from deepmetric.data.transforms import build_transform
from deepmetric.engine.build import build_data

# one transform for both parts: greyscale 8 x 8 tensors (digits' size; the folder's images are resized)
ONE_SIZE = ["data.transform=tensor", "data.image_size=[8,8]", "model.in_chans=1"]


def parts(folder, **extra):
    return [{"format": "digits"}, {"format": "image_folder", "root": str(folder), "name": "shapes", **extra}]


def test_union_has_disjoint_offset_labels_and_prefixed_names(mini):
    tf = build_transform("tensor", train=False, image_size=(8, 8), channels=1)
    s = DATASETS.get("concat")(None, train_transform=tf, test_transform=tf, parts=parts(mini["image_folder"]))
    n_digits = 1797
    assert len(s.train) == len(s.query) == n_digits + 24 and s.gallery is None
    assert s.query.labels[:n_digits].max() == 9 and set(s.query.labels[n_digits:]) == set(range(10, 16))
    assert s.class_names[3] == "digits/3" and s.class_names[10] == "shapes/class_00"
    assert len(set(s.class_names.values())) == 16
    np.testing.assert_array_equal(s.train_class_ids[s.train.labels], s.query.labels)
    x0, y0, _ = s.query[0]
    x1, y1, _ = s.query[n_digits + 5]
    assert x0.shape == x1.shape == (1, 8, 8) and x0.dtype == x1.dtype == torch.float32
    assert (y0, y1) == (int(s.query.labels[0]), int(s.query.labels[n_digits + 5]))
    assert s.query.paths is None, "digits have no files, so the union has no paths"


def test_zero_shot_protocol_on_the_union(mini):
    cfg = load_config(None, [*ONE_SIZE, "data.format=concat", f"data.options={{parts: {parts(mini['image_folder'])}}}",
                             "data.train_classes=[digits/0, digits/1, digits/2, shapes/class_00, shapes/class_01]",
                             "data.val_classes=null"])
    s = build_data(cfg)
    train = set(s.train_class_ids[np.unique(s.train.labels)].tolist())
    test = set(np.unique(s.query.labels).tolist())
    assert train == {0, 1, 2, 10, 11} and not train & test and test == {3, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15}
    assert {s.class_names[c] for c in train} == {"digits/0", "digits/1", "digits/2", "shapes/class_00",
                                                 "shapes/class_01"}


def test_a_part_splits_its_own_classes(mini):
    tf = build_transform("tensor", train=False, image_size=(8, 8), channels=1)
    s = DATASETS.get("concat")(None, train_transform=tf, test_transform=tf,
                               parts=[{"format": "digits", "train_classes": [0, 1, 2, 3, 4]},
                                      {"format": "image_folder", "root": str(mini["image_folder"]), "name": "shapes",
                                       "test_classes": ["class_04", "class_05"]}])
    assert set(s.train_class_ids.tolist()) == {0, 1, 2, 3, 10, 11, 12, 13} | {4}
    assert set(np.unique(s.query.labels).tolist()) == {5, 6, 7, 8, 9, 14, 15}


@pytest.mark.parametrize("bad,words", [
    ([{"format": "digitz"}], ["data.options.parts[0].format: ", "digits"]),
    ([{"format": "digits", "options": {"size": 3}}], ["data.options.parts[0].options.size: ", "has no option"]),
    ([{"format": "digits"}, {"format": "digits"}], ["data.options.parts[1]: ", "distinct 'name'"]),
    ([{"format": "digits", "colour": 1}], ["data.options.parts[0]: ", "unknown key 'colour'"]),
    ([{"format": "image_folder", "root": "/no/such/folder"}], ["data.options.parts[0] (image_folder)", "/no/such/folder: folder not found"]),
    ([], ["data.options.parts: ", "a list of parts"]),
])
def test_bad_parts_are_named(bad, words):
    cfg = load_config(None, [*ONE_SIZE, "data.format=concat", "data.val_classes=null"])
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"options": {"parts": bad}})})
    with pytest.raises((ConfigError, DataError)) as e:
        build_data(cfg)
    for w in words:
        assert w in str(e.value), str(e.value)
    assert str(e.value).startswith("data.options.parts"), "named by its key, not as data.options (concat)"


def test_mixed_test_layouts_are_refused(mini):
    with pytest.raises(DataError, match="leave-one-out"):
        DATASETS.get("concat")(None, parts=[{"format": "digits"}, {"format": "inshop", "root": str(mini["inshop"])}])


def test_two_step_training_run(tmp_path, tiny_overrides, mini):
    from deepmetric.engine.trainer import Trainer

    cfg = load_config(None, [*tiny_overrides, *ONE_SIZE, "data.format=concat", "train.max_steps=2",
                             f"data.options={{parts: {parts(mini['image_folder'])}}}",
                             "data.train_classes=[digits/0, digits/1, digits/2, shapes/class_00, shapes/class_01]",
                             "train.eval_every=2"])
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.fit()
    assert [h["step"] for h in trainer.history if "loss" in h] == [1, 2]
    assert 0.0 <= trainer.last_result.metrics["recall@1"] <= 1.0
    assert len(trainer.last_result.query) == len(trainer.splits.query)
