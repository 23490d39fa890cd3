"""Every packaged recipe trains end to end on its miniature dataset, and bad data gives one-line errors.

Recipes are discovered by glob, so a new recipe is smoke-tested without touching this file. Each
data layout is generated once per session with :mod:`deepmetric.data.synthetic` (the official on-disk
layout, tiny JPEGs), then ``deepmetric train RECIPE`` runs 2 steps on the CPU (tiny images, a 2 x 2
batch, an evaluation at step 2, the report), followed by ``deepmetric eval RUN_DIR``; both in-process. Recipes with a ``model.init_from`` (SOP stage
two) fine-tune from the stage-one recipe whose run name they point at, trained once per session.
``quickstart`` is left out (the lead's recipe, tested on its own).

To stay inside the suite's time budget, every ResNet recipe except ``KEEP_BACKBONE`` runs with
``model.backbone=resnet18`` (same head, losses, optimizers and schedules; only the trunk is smaller).
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np
import pytest
import torch

from deepmetric.cli import main
from deepmetric.config import RECIPES, list_recipes
from deepmetric.config import Config, load_config
from deepmetric.data import synthetic

# quickstart is the lead's and has its own test; its 896 digit queries make the report's t-SNE slow.
ALL_RECIPES = [r for r in list_recipes() if r != "quickstart"]
# The one recipe that keeps its ResNet50 in the smoke test: the re-ID trunk is the most specific
# (last stride 1, no stem ReLU, BNNeck, four losses and two optimizers).
KEEP_BACKBONE = "reid/ctl_resnet50_market"

# train.amp is quoted: a bare `off` is YAML 1.1 for False, which the config rejects.
SMOKE = [
    "train.max_steps=2", "train.eval_every=2", "train.log_every=1", "train.progress=false",
    'train.amp="off"', "train.device=cpu", "data.classes_per_batch=2", "data.samples_per_class=2",
    "data.batch_size=4",  # random-batch recipes; equal to 2 x 2, so P x K recipes accept it too
    "data.eval_batch_size=16", "data.num_workers=0", "data.pin_memory=false",
]
IMAGE_SIZE = {"reid": "[64,32]"}  # by eval.protocol; everything else 32 x 32
HEADLINE = {  # metrics each protocol must report (besides the recipe's own eval.metric)
    "retrieval": ["recall@1", "map"],
    "reid": ["rank1", "map", "centroid_rank1", "centroid_map"],
    "verification": ["accuracy"],
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny batches gain nothing from a second intra-op thread, and on a busy 2-core machine the
    second thread's spin-waiting made this module several times slower (CPU 50 s -> wall 8 min)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def recipe_config(name: str) -> Config:
    return load_config(RECIPES / f"{name}.yaml")


# -- miniature layouts --------------------------------------------------------------------------------

def make_fashion_mnist_idx(dst: Path, per_class: int = 3) -> Path:
    """The four Fashion-MNIST IDX files with ``per_class`` 28x28 images of each of the 10 classes."""
    rng = np.random.default_rng(0)
    dst.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
        images = np.stack([synthetic.class_image(int(c), rng, 28).mean(axis=2).astype(np.uint8) for c in labels])
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            head = bytes([0, 0, 8, arr.ndim]) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
            (dst / f"{prefix}-{kind}-ubyte").write_bytes(head + arr.tobytes())
    return dst


# Enough training classes for the recipes' validation split (2 classes) beside a 2-class batch.
MAKERS: Dict[str, Callable[[Path], Path]] = {
    "sop": lambda d: synthetic.make_sop(d, n_classes=10, per_class=3),
    "cub": lambda d: synthetic.make_cub(d, n_classes=8, per_class=3),
    "cars": lambda d: synthetic.make_cars(d, n_classes=8, per_class=3),
    "inshop": lambda d: synthetic.make_inshop(d, n_items=10, per_item=3),
    "market1501": lambda d: synthetic.make_market(d, n_ids=10, style="market"),
    "dukemtmc": lambda d: synthetic.make_market(d, n_ids=10, style="duke"),
    "identity_folder": lambda d: synthetic.make_image_folder(d, n_classes=6, per_class=3),
    "lfw": lambda d: synthetic.make_lfw(d),
    "fashion_mnist": make_fashion_mnist_idx,
    "digits": lambda d: d,  # scikit-learn's digits: no files
}


@pytest.fixture(scope="session")
def layout(tmp_path_factory) -> Callable[[str], Path]:
    """``layout(format)``: the miniature dataset of that format, generated once per session."""
    made: Dict[str, Path] = {}

    def get(fmt: str) -> Path:
        if fmt not in made:
            if fmt not in MAKERS:
                pytest.fail(f"no miniature layout for data.format '{fmt}': add a generator to MAKERS")
            made[fmt] = Path(MAKERS[fmt](tmp_path_factory.mktemp(fmt)))
        return made[fmt]

    return get


def smoke_overrides(name: str, layout: Callable[[str], Path]) -> List[str]:
    cfg = recipe_config(name)
    out = list(SMOKE)
    if cfg.data.format != "digits":
        out.append(f"data.root={layout(cfg.data.format)}")
    if cfg.data.transform != "tensor":
        out += ["model.pretrained=null", f"data.image_size={IMAGE_SIZE.get(cfg.eval.protocol, '[32,32]')}"]
    if cfg.model.backbone.startswith("resnet") and name != KEEP_BACKBONE:
        out.append("model.backbone=resnet18")
    if cfg.eval.protocol == "verification" and cfg.data.format != "lfw":
        out.append(f"eval.lfw_root={layout('lfw')}")
    for i, term in enumerate(cfg.losses):
        if term.memory is not None:  # a small memory that is already in use at step 2
            out += [f"losses.{i}.memory.size=64", f"losses.{i}.memory.start_step=1"]
    return out


def stage_one_recipe(cfg: Config) -> str:
    """The packaged recipe whose default run directory is ``cfg.model.init_from``."""
    wanted = Path(cfg.model.init_from).name
    found = [r for r in ALL_RECIPES if recipe_config(r).name == wanted]
    assert found, f"model.init_from={cfg.model.init_from}: no packaged recipe is named '{wanted}'"
    return found[0]


@pytest.fixture(scope="session")
def trained(tmp_path_factory, layout) -> Callable[[str], Path]:
    """``trained(recipe)``: the run directory of a 2-step smoke run, trained once per session
    (stage-one runs serve both their own test and the fine-tune recipes that start from them)."""
    runs: Dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in runs:
            cfg = recipe_config(name)
            overrides = smoke_overrides(name, layout)
            if cfg.model.init_from:
                overrides.append(f"model.init_from={get(stage_one_recipe(cfg))}")
            run = tmp_path_factory.mktemp("runs") / name.replace("/", "_")
            assert main(["train", name, *overrides, "--run-dir", str(run)]) == 0, name
            runs[name] = run
        return runs[name]

    return get


# -- every recipe, end to end -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_RECIPES)
def test_recipe_trains_and_evaluates(name, trained):
    cfg = recipe_config(name)
    run = trained(name)
    expected = [cfg.eval.metric, *HEADLINE[cfg.eval.protocol]]

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
    evals = [r["eval"] for r in records if "eval" in r]
    assert evals, "no evaluation record in metrics.jsonl"
    for key in expected:
        assert key in evals[-1], f"{key} missing from {sorted(evals[-1])}"
    assert (run / "checkpoints" / "last" / "model.safetensors").is_file()
    assert (run / "report.html").is_file()
    assert load_config(run).model.init_from == (str(trained(stage_one_recipe(cfg))) if cfg.model.init_from else None)

    assert main(["eval", str(run)]) == 0
    written = json.loads((run / "metrics.json").read_text())
    for key in expected:
        assert key in written, f"{key} missing from metrics.json"


def test_every_recipe_is_covered():
    """Each recipe's format has a miniature layout and each protocol a headline check."""
    for name in ALL_RECIPES:
        cfg = recipe_config(name)
        assert cfg.data.format in MAKERS, f"{name}: data.format '{cfg.data.format}' has no miniature layout"
        assert cfg.eval.protocol in HEADLINE, name
    assert KEEP_BACKBONE in ALL_RECIPES


# -- bad data: one line naming the problem, exit code 2, no run left behind ---------------------------

def copy_layout(layout, fmt: str, tmp_path: Path) -> Path:
    dst = tmp_path / fmt
    shutil.copytree(layout(fmt), dst)
    return dst


def run_bad(capsys, tmp_path, recipe: str, *overrides: str) -> str:
    run = tmp_path / "run"
    code = main(["train", recipe, *SMOKE, "model.pretrained=null", "model.backbone=resnet18",
                 "data.image_size=[32,32]", *overrides, "--run-dir", str(run)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("deepmetric: error: ")
    assert not run.exists(), "a failed run must not leave a run directory"
    return err


@pytest.mark.parametrize("fmt, recipe, file, line", [
    ("sop", "sop/softmax_resnet50", "Ebay_train.txt", 3),
    ("cub", "cub/proxy_anchor_resnet50", "images.txt", 2),
    ("inshop", "inshop/proxy_anchor_resnet50", "Eval/list_eval_partition.txt", 4),
])
def test_malformed_list_file_is_named(fmt, recipe, file, line, layout, tmp_path, capsys):
    root = copy_layout(layout, fmt, tmp_path)
    path = root / file
    lines = path.read_text().splitlines()
    lines[line - 1] = "this line has no valid fields at all"
    path.write_text("\n".join(lines) + "\n")
    err = run_bad(capsys, tmp_path, recipe, f"data.root={root}")
    assert f"{path} line {line}" in err


def test_missing_image_is_named(layout, tmp_path, capsys):
    """A test image that vanished: found when the evaluation reads it, after two training steps."""
    root = copy_layout(layout, "sop", tmp_path)
    rel = (root / "Ebay_test.txt").read_text().splitlines()[1].split()[3]
    (root / rel).unlink()
    err = run_bad(capsys, tmp_path, "sop/arcmargin_resnet50", f"data.root={root}")
    assert str(root / rel) in err and "not found" in err


def test_missing_lfw_image_is_named_before_training(layout, tmp_path, capsys):
    lfw = copy_layout(layout, "lfw", tmp_path)  # the images folder; pairs.txt lives beside it
    shutil.copy(layout("lfw").parent / "pairs.txt", tmp_path / "pairs.txt")
    name, i = (tmp_path / "pairs.txt").read_text().splitlines()[1].split()[:2]  # the first matched pair
    gone = lfw / name / f"{name}_{int(i):04d}.jpg"
    gone.unlink()
    err = run_bad(capsys, tmp_path, "face/circle_resnet", f"data.root={layout('identity_folder')}",
                  f"eval.lfw_root={lfw}")
    assert "missing image" in err and gone.name in err and "pairs.txt line" in err


@pytest.mark.parametrize("recipe, wrong_fmt, message", [
    ("sop/xbm_contrastive_resnet50", "cub", "missing Ebay_train.txt"),
    ("reid/ctl_resnet50_market", "sop", "missing bounding_box_train/"),
    ("cars/proxy_anchor_resnet50", "market1501", "missing cars_annos.mat"),
])
def test_wrong_folder_is_named(recipe, wrong_fmt, message, layout, tmp_path, capsys):
    root = layout(wrong_fmt)
    err = run_bad(capsys, tmp_path, recipe, f"data.root={root}")
    assert str(root) in err and message in err
