"""Bad protocol settings are caught before the first training step: one line, exit code 2, no run left."""
import os

import pytest

from deepmetric.cli import main
from deepmetric.data import synthetic

TINY = ["train.max_steps=2", "train.progress=false", "model.backbone_options={width: 8, grid: 2}",
        "model.embedding_dim=8"]
# the quickstart recipe on digits (no glyphs to render): 0-4 train, 3 and 4 of them validate, 5-9 test
DIGITS = ["data.format=digits", "data.options={}", "data.train_classes=[0, 1, 2, 3, 4]", "data.val_classes=[3, 4]",
          "data.classes_per_batch=3"]


@pytest.mark.parametrize("overrides, message", [
    (["eval.ks=[0]"], "config key 'eval.ks.0': input should be greater than 0"),
    (["eval.metric=recal@1"], "eval.metric: 'recal@1' is not a metric of eval.protocol=retrieval; did you mean 'recall@1'"),
    (["eval.metric=centroid_map"], "eval.metric: 'centroid_map' is not a metric of eval.protocol=retrieval"),
    (["eval.protocol=reid", "eval.metric=map"], "data.val_classes: the re-ID protocol needs camera ids"),
    (["eval.protocol=reid", "eval.metric=map", "data.val_classes=null"],
     "eval.protocol=reid needs query and gallery splits with camera ids"),
    (["eval.protocol=verification", "eval.metric=accuracy"], "eval.protocol=verification needs pairs"),
    (["data.val_classes=0.5", "data.classes_per_batch=4"], "data.val_classes: 2 of the 5 training classes would "
                                                           "leave 3 to train on (needs >= 4) and 2 to validate on (needs >= 2)"),
    (["data.val_classes=['7']"], "data.val_classes: '7' not among the training classes"),
    (["data.train_classes=[12]"], "data.train_classes: 12 not in the data (class names such as '0', '1', '2', or ids in 0..9)"),
    (["data.train_classes=1.5"], "config key 'data.train_classes': expected a fraction in (0, 1) or a list of classes"),
    (["data.test_classes=[0]", "data.train_classes=[0, 1]"], "data.test_classes: classes [0] are in both"),
    (["data.val_classes=null", "scheduler.name=plateau"], "scheduler.name=plateau follows the validation metric"),
    (["data.val_classes=null", "train.early_stopping=2"], "train.early_stopping follows the validation metric"),
])
def test_protocol_errors_before_training(tmp_path, capsys, overrides, message):
    run = tmp_path / "run"
    code = main(["train", "quickstart", *TINY, *DIGITS, *overrides, "--run-dir", str(run)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("deepmetric: error: ") and len(err.splitlines()) == 1, err
    assert message in err, err
    assert not run.exists(), "nothing is written before the settings are known to work"


def test_a_format_option_with_a_bad_value_is_one_line(tmp_path, capsys):
    code = main(["train", "quickstart", *TINY, "data.options={size: 3}", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "deepmetric: error: data.options.size must be in 8..256 pixels, got 3"
    root = synthetic.make_sop(tmp_path / "sop", n_classes=6, per_class=2, size=8)
    code = main(["train", "sop/arcmargin_resnet50", f"data.root={root}", "data.options={list_format: nope}",
                 "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "sop: data.options.list_format must be 'auto', 'ebay' or 'paddleclas', got 'nope'" in err


def test_resume_from_another_folder_with_a_relative_root(tmp_path, monkeypatch, capsys):
    """The saved config keeps data.root resolved, so a run resumes (and evaluates) from anywhere."""
    monkeypatch.chdir(tmp_path)
    synthetic.make_image_folder("imgs", n_classes=8, per_class=4, size=12)
    common = ["data.format=image_folder", "data.root=imgs", "data.options={}", "data.train_classes=0.75",
              "data.transform=imagenet", "data.image_size=[12,12]", "model.in_chans=3", "data.classes_per_batch=2",
              "data.samples_per_class=2", "train.eval_every=1"]
    assert main(["train", "quickstart", *TINY, *common, "--run-dir", "run"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["train", "--resume", str(tmp_path / "run"), "train.max_steps=3"]) == 0, capsys.readouterr().err
    assert main(["eval", str(tmp_path / "run")]) == 0
    assert os.path.isabs(__import__("yaml").safe_load((tmp_path / "run" / "config.yaml").read_text())["data"]["root"])
