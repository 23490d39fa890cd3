"""``deepmetric train DIR``: the data inspection, the recipe written from it (each choice with its
reason), the hash split, the time budget, pretrained weights, and bad input (issue 22)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from deepmetric.cli import main
from deepmetric.config import ConfigError, load_config
from deepmetric.data.base import DataError
from deepmetric.data.inspect import inspect_data
from deepmetric.engine.auto import FEW_CLASSES, auto_config, hash_order, is_data_path, split_classes
from deepmetric.engine.budget import plan_steps
from deepmetric.engine.trainer import Trainer


def folder(root, n_classes=8, per_class=5, size=12, grey=False, seed=0, sizes=None):
    """``root/c00 ...``: ``n_classes`` folders of ``per_class`` small images (colour blobs, or grey)."""
    rng = np.random.default_rng(seed)
    for c in range(n_classes):
        d = root / f"c{c:02d}"
        d.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (4, 4, 3))
        for i in range(per_class):
            s = size if sizes is None else sizes[(c * per_class + i) % len(sizes)]
            img = np.clip(base + rng.normal(0, 25, base.shape), 0, 255).astype(np.uint8)
            pic = Image.fromarray(img).resize((s, s), Image.Resampling.BILINEAR)
            (pic.convert("L") if grey else pic).save(d / f"{i}.png")
    return root


TINY = ["model.backbone_options={width: 8, grid: 2}", "model.embedding_dim=16", "train.progress=false"]


def test_inspection_sees_classes_sizes_and_colour(tmp_path):
    root = folder(tmp_path / "imgs", n_classes=6, per_class=4, sizes=[10, 14, 30])
    Image.new("L", (9, 9)).save(root / "loose.png")  # in no class folder
    p = inspect_data(root)
    assert p.format == "image_folder" and len(p.class_names) == 6 and p.counts.tolist() == [4] * 6
    assert p.checked == 24 and p.grey == 0 and not p.is_grey and p.loose == 1
    assert sorted(set(p.sizes[:, 0].tolist())) == [10, 14, 30] and p.median_side == 14
    grey = inspect_data(folder(tmp_path / "grey", n_classes=5, grey=True))
    assert grey.is_grey and grey.grey == grey.checked == 25


def test_lists_are_data_too(tmp_path):
    root = folder(tmp_path / "imgs", n_classes=5, per_class=3)
    rows = [(str(p.relative_to(tmp_path)), p.parent.name) for p in sorted(root.rglob("*.png"))]
    (tmp_path / "list.csv").write_text("path,label\n" + "".join(f"{p},{c}\n" for p, c in rows))
    (tmp_path / "list.txt").write_text("".join(f"{p} {int(c[1:])}\n" for p, c in rows))
    by_name, by_id = inspect_data(tmp_path / "list.csv"), inspect_data(tmp_path / "list.txt")
    assert by_name.format == "csv" and by_name.class_keys == [f"c{i:02d}" for i in range(5)]
    assert by_id.format == "list" and by_id.class_keys == [0, 1, 2, 3, 4] and by_id.counts.tolist() == [3] * 5
    assert is_data_path(tmp_path / "list.txt") and is_data_path(root) and not is_data_path(tmp_path / "nope")
    for source in ("list.csv", "list.txt"):
        cfg = auto_config(tmp_path / source, [*TINY, "train.max_steps=1"]).config
        from deepmetric.engine.build import build_data

        splits = build_data(cfg)
        assert len(splits.train) + len(splits.query) == 15 - (len(splits.val.query) if splits.val else 0)


def test_the_test_classes_are_drawn_by_a_hash_of_their_names(tmp_path):
    root = folder(tmp_path / "imgs", n_classes=40, per_class=3, size=8)
    p = inspect_data(root)
    train, test, single = split_classes(p)
    assert len(test) == 10 and not single and set(train) | set(test) == set(p.class_keys)
    assert test == sorted(hash_order(p.class_keys)[:10])  # stable: the same on every machine and run
    assert test != p.class_keys[:10] and test != p.class_keys[-10:]  # not a block of the sorted names
    recipe = auto_config(root, TINY)
    assert recipe.config.data.test_classes == test and recipe.config.data.train_classes is None
    (root / "c99").mkdir()
    Image.new("RGB", (8, 8), "red").save(root / "c99" / "only.png")  # a class with one image
    again = auto_config(root, TINY)
    assert again.config.data.test_classes == test + ["c99"]
    assert any("1 class with one image: kept as distractors in the test gallery" in n for n in again.notes)


def test_the_recipe_says_each_choice_and_overrides_win(tmp_path):
    root = folder(tmp_path / "imgs", n_classes=40, per_class=6, size=20, grey=True)
    recipe = auto_config(root, TINY)
    text = recipe.describe()
    cfg = recipe.config
    assert cfg.data.format == "image_folder" and cfg.model.in_chans == 1 and list(cfg.data.image_size) == [20, 20]
    assert cfg.train.time_budget == "5m" and cfg.eval.metric == "map@r" and cfg.data.transform == "tensor"
    assert "data.image_size = [20, 20]: 20 x 20: the median image side is 20" in text
    assert "model.in_chans = 1: 240 of the 240 images opened are grey" in text
    assert "data.samples_per_class = 4: the median class has 6 images" in text
    assert "model.backbone = 'small_cnn': no pretrained weights given or cached" in text
    assert all(len(line) < 260 for line in text.splitlines())
    mine = auto_config(root, [*TINY, "data.image_size=[16,16]", "train.max_steps=30", "optimizer.lr=0.01"])
    assert list(mine.config.data.image_size) == [16, 16] and mine.config.optimizer.lr == 0.01
    assert mine.config.train.max_steps == 30 and mine.config.train.time_budget is None
    assert "data.image_size = [16, 16]: set by you" in mine.describe()
    with pytest.raises(ConfigError, match="train.max_step"):
        auto_config(root, ["train.max_step=3"])


def test_few_classes_say_so_and_keep_the_last_step(tmp_path):
    root = folder(tmp_path / "imgs", n_classes=12, per_class=5)
    recipe = auto_config(root, TINY)
    assert recipe.config.data.val_classes is None
    assert "only 9 training classes: a validation split of 2 would select by noise" in recipe.describe()
    assert recipe.config.losses[0].memory is None  # a memory would hold the same few classes again
    assert "no cross-batch memory: only 9 training classes" in recipe.describe()
    many = auto_config(folder(tmp_path / "many", n_classes=2 * FEW_CLASSES, per_class=3, size=8), TINY)
    assert isinstance(many.config.data.val_classes, float)
    # 45 training classes of 3 images: a memory of every training image's embedding
    assert many.config.losses[0].memory.size == 45 * 3
    assert "a memory of the last 135 embeddings (XBM)" in many.describe()
    assert "no cross-batch memory" not in many.describe()
    assert auto_config(tmp_path / "many", [*TINY, "losses.0.memory=null"]).config.losses[0].memory is None


@pytest.mark.parametrize("case,message", [
    ("empty", "no images found"),
    ("one_class", r"one class \('c00'\)"),
    ("few", "2 classes have two or more images"),
    ("all_broken", "none of its 6 images can be read"),
])
def test_bad_data_gets_one_line(tmp_path, case, message):
    root = tmp_path / "data"
    root.mkdir()
    if case == "one_class":
        folder(root, n_classes=1)
    elif case == "few":
        folder(root, n_classes=2)
        for c in range(2, 6):  # classes of one image each
            (root / f"s{c}").mkdir()
            Image.new("RGB", (8, 8)).save(root / f"s{c}" / "x.png")
    elif case == "all_broken":
        for c in range(3):
            (root / f"c{c}").mkdir()
            for i in range(2):
                (root / f"c{c}" / f"{i}.jpg").write_bytes(b"not an image")
    with pytest.raises(DataError, match=message):
        inspect_data(root)
    assert main(["train", str(root)]) == 2


def test_unreadable_files_and_mixed_images_get_a_note(tmp_path, capsys):
    root = folder(tmp_path / "imgs", n_classes=8, per_class=4, sizes=[12, 16])
    (root / "c00" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    Image.new("L", (16, 16), 128).save(root / "c01" / "grey.png")
    recipe = auto_config(root, TINY)
    assert recipe.config.data.options["exclude"] == ["c00/broken.jpg"]
    notes = " ".join(recipe.notes)
    assert "1 unreadable file left out (data.options.exclude): c00/broken.jpg" in notes
    assert "mixed colour" in notes or "mixed sizes" in notes
    from deepmetric.engine.build import build_data

    splits = build_data(recipe.config)  # the broken file is not in the data
    every = list(splits.train.paths) + list(splits.query.paths)
    assert not any(p.endswith("broken.jpg") for p in every)


def test_plan_steps_and_a_budget_too_short():
    p = plan_steps(100.0, 10.0, 0.1, 2.0, 3.0)
    assert p.max_steps * 0.1 + (p.max_steps // p.eval_every) * 2.0 + 10 + 3 <= 100
    assert plan_steps(100.0, 10.0, 0.1, 2.0, 3.0, eval_every=50).eval_every == 50
    with pytest.raises(ConfigError, match=r"train.time_budget=5s: too short for one evaluation.*give at least \d+s"):
        plan_steps(5.0, 3.0, 0.1, 2.0, 1.0, what="5s")


def test_a_budgeted_run_repeats_exactly_as_its_step_count(tmp_path):
    root = folder(tmp_path / "imgs", n_classes=10, per_class=6, size=8)
    # few classes: without the folds (their share of a budget is tests/engine/test_folds.py's)
    cfg = auto_config(root, [*TINY, "train.time_budget=6s", "train.log_every=5", "train.length_folds=[]"]).config
    summary = Trainer(cfg, tmp_path / "a").fit()
    written = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["train"]
    assert written["time_budget"] is None and written["max_steps"] == summary["max_steps"] >= 10
    assert summary["budget"]["max_steps"] == summary["max_steps"]
    assert any("train.time_budget=6s came to" in n for n in summary["notes"])
    again = Trainer(load_config(tmp_path / "a" / "config.yaml"), tmp_path / "b").fit()
    assert again["max_steps"] == summary["max_steps"] and again["metrics"] == summary["metrics"]
    a = (tmp_path / "a" / "checkpoints" / "last" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "checkpoints" / "last" / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="train.time_budget=0.01s: too short for one evaluation"):
        Trainer(cfg.with_overrides(["train.time_budget=0.01s"]), tmp_path / "c").fit()
    assert not (tmp_path / "c").exists()  # nothing half-made is left


def _busy(monkeypatch, busy: bool) -> None:
    """Make ``_time_steps`` measure a step 50 times slower on torch's threads (``busy``: other work holds
    the cores) or on one thread (an idle machine), the other count as measured."""
    import deepmetric.engine.budget as budget

    real = budget._time_steps

    def timed(trainer, *args, **kwargs):
        cold, warm, each = real(trainer, *args, **kwargs)
        return (cold * 50, warm * 50, each) if busy == (torch.get_num_threads() > 1) else (cold, warm, each)

    monkeypatch.setattr(budget, "_time_steps", timed)


@pytest.mark.parametrize("busy", [True, False])
def test_a_budgeted_run_keeps_the_faster_thread_count(tmp_path, monkeypatch, busy):
    """``train.threads=0``: a time-budget run on the CPU times its steps on one thread too and keeps the
    faster count; ``config.yaml`` records it, so the repeat computes alike, and the threads are torch's
    again after the run."""
    root = folder(tmp_path / "imgs", n_classes=10, per_class=6, size=8)
    cfg = auto_config(root, [*TINY, "train.time_budget=4s", "train.length_folds=[]"]).config
    assert cfg.train.threads == 0
    _busy(monkeypatch, busy)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        summary = Trainer(cfg, tmp_path / "a").fit()
        assert torch.get_num_threads() == 2  # the run's count was the run's only
        written = load_config(tmp_path / "a" / "config.yaml")
        assert written.train.threads == (1 if busy else 2) and summary["budget"]["threads"] == written.train.threads
        notes = " ".join(summary["notes"])
        assert ("train.threads=1: a step took" in notes and "against" in notes and "on torch's 2" in notes) == busy
        again = Trainer(written, tmp_path / "b").fit()  # no budget: no measuring; the recorded count
        assert again["metrics"] == summary["metrics"]
    finally:
        torch.set_num_threads(before)


def test_train_dir_from_the_command_line_and_python(tmp_path, capsys, caplog, monkeypatch):
    import logging

    import deepmetric as dm

    root = folder(tmp_path / "my_images", n_classes=8, per_class=5, size=8)
    with caplog.at_level(logging.INFO, logger="deepmetric"):
        assert main(["train", str(root), "--run-dir", str(tmp_path / "run"), *TINY, "train.max_steps=6"]) == 0
    assert "a recipe from the data" in caplog.text and "data.samples_per_class = 4: the median class has 5" in caplog.text
    # 6 training classes: no validation split, a length chosen on three folds of them in the 6 steps
    assert "a length chosen on 3 folds of the training classes" in capsys.readouterr().out
    cfg = load_config(tmp_path / "run")
    assert cfg.name == "my_images" and cfg.data.root == str(root) and cfg.train.max_steps == 1
    assert cfg.scheduler.total_steps == 1 and cfg.train.length_folds == []
    summary = dm.Trainer(dm.auto_config(root, [*TINY, "train.max_steps=20"]).config, tmp_path / "py").fit()
    # 3 folds x 2 candidates (the recipe, and it with an instance term) take 0.6 of the 20 steps (2
    # each), and the run's 8 hold 4 networks of the length they choose (train.fold_members)
    assert summary["length_folds"]["schedule_steps"] == 2 and summary["max_steps"] in (1, 2)
    assert summary["length_folds"]["members"] == 4 == load_config(tmp_path / "py").model.members
    trainer = dm.Trainer(str(root), tmp_path / "py2")  # a path: the automatic recipe, defaults and all
    assert trainer.cfg.data.format == "image_folder" and trainer.cfg.train.time_budget == "5m"
    # the run folder as a key, like any other choice (it was ignored for a folder, and the run went to runs/)
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(root), f"run_dir={tmp_path / 'keyed'}", *TINY, "train.max_steps=2"]) == 0
    assert (tmp_path / "keyed" / "config.yaml").is_file() and not (tmp_path / "runs").exists()


def test_pretrained_weights_given_or_cached_choose_the_backbone(tmp_path, monkeypatch):
    import torchvision

    root = folder(tmp_path / "imgs", n_classes=8, per_class=4, size=12)
    weights = tmp_path / "resnet18-f37072fd.pth"
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    given = auto_config(root, [f"model.pretrained={weights}"]).config
    assert given.model.backbone == "resnet18" and list(given.data.image_size) == [224, 224]
    assert given.model.pretrained == str(weights) and given.model.in_chans == 3
    # few classes, but no ensemble on pretrained weights: the members would start alike
    assert given.train.length_folds and given.train.fold_members == 1 and given.train.fold_share is None
    cache = tmp_path / "torch_home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / weights.name).write_bytes(weights.read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    found = auto_config(root)
    assert found.config.model.backbone == "resnet18"
    assert "pretrained weights found in the download cache" in found.describe()
    off = auto_config(root, ["model.pretrained=null"]).config
    assert off.model.backbone == "small_cnn" and off.train.fold_members == 4 and off.train.fold_share == 0.6
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(Exception, match="junk.pth"):
        auto_config(root, [f"model.pretrained={tmp_path / 'junk.pth'}"])
