"""Checkpoints: refusing weights that do not fit (shape, NaN, missing state), permissions, and
surviving a kill at every filesystem step of one save or of two saves in a row."""
import json
import os
import shutil
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepmetric.cli import main
from deepmetric.config import load_config, save_config
from deepmetric.engine import checkpoint as ckpt_mod
from deepmetric.engine.build import build_model, load_for_inference
from deepmetric.engine.checkpoint import (CheckpointError, load_model_weights, load_train_state, read_checkpoint,
                                          save_checkpoint)
from deepmetric.data.synthetic import make_image_folder
from deepmetric.models import WeightsError


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """Overrides of a tiny recipe on a generated image folder (a trainer run takes well under a second)."""
    root = make_image_folder(tmp_path_factory.mktemp("imgs") / "folder", n_classes=4, per_class=4, size=12)
    return ["data.format=image_folder", f"data.root={root}", "data.transform=tensor", "model.backbone=small_cnn",
            "model.embedding_dim=4", "data.classes_per_batch=2", "data.samples_per_class=2", "optimizer.name=sgd",
            "optimizer.lr=0.1", "train.progress=false", "train.log_every=1", "eval.ks=[1]"]


def _cfg(recipe, width, *extra):
    return load_config(None, [*recipe, f"model.backbone_options={{width: {width}, grid: 2}}", *extra])


def _run(root, recipe, width):
    """A run directory (config.yaml + checkpoints/best) of a small CNN of ``width``."""
    cfg = _cfg(recipe, width)
    torch.manual_seed(width)
    root.mkdir(parents=True)
    save_config(cfg, root / "config.yaml")
    save_checkpoint(root / "checkpoints" / "best", cfg=cfg, model=build_model(cfg), losses=torch.nn.ModuleList(),
                    optimizers={}, state={"step": 1})
    return cfg


# -- weights that do not fit ----------------------------------------------------------------------

def test_weights_of_another_shape_name_the_tensor_and_both_shapes(tmp_path, recipe):
    cfg = _run(tmp_path / "a", recipe, 16)
    _run(tmp_path / "b", recipe, 8)
    model = build_model(cfg, load_weights=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = read_checkpoint(tmp_path / "b")[0]
    with pytest.raises(CheckpointError, match=r"model.safetensors holds another architecture .*: tensor "
                                              r"backbone.body.0.weight has shape \(8, 3, 3, 3\) in the file, "
                                              r"\(16, 3, 3, 3\) in the model \(\d+ differences\)"):
        load_model_weights(model, ckpt)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "nothing half-loaded"


def test_eval_with_a_checkpoint_of_another_model_is_one_line(tmp_path, recipe, capsys):
    _run(tmp_path / "quickstart", recipe, 16)
    _run(tmp_path / "my_model", recipe, 8)
    assert main(["eval", str(tmp_path / "quickstart"), "--checkpoint", str(tmp_path / "my_model")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "backbone.body.0.weight has shape (8, 3, 3, 3) in the file, (16, 3, 3, 3) in the model" in err


def test_resume_with_another_model_is_refused(tmp_path, recipe):
    from deepmetric.engine.trainer import Trainer

    Trainer(_cfg(recipe, 8, "train.max_steps=1"), tmp_path / "run").fit()
    other = _cfg(recipe, 4, "train.max_steps=2")
    with pytest.raises(CheckpointError, match=r"tensor backbone.body.0.weight has shape \(8, 3, 3, 3\) in the file"):
        Trainer(other, tmp_path / "run", resume=True)


def test_swapped_weights_in_a_checkpoint_folder(tmp_path, recipe):
    """search/embed/export load a checkpoint with its own config: weights from elsewhere are named too."""
    _run(tmp_path / "a", recipe, 16)
    _run(tmp_path / "b", recipe, 8)
    a, b = read_checkpoint(tmp_path / "a")[0], read_checkpoint(tmp_path / "b")[0]
    shutil.copy(b / "model.safetensors", a / "model.safetensors")
    with pytest.raises(CheckpointError, match="has shape .* in the file, .* in the model"):
        load_for_inference(tmp_path / "a")


def test_nan_weights_are_refused_at_load(tmp_path, recipe, capsys):
    _run(tmp_path / "run", recipe, 8)
    ckpt = read_checkpoint(tmp_path / "run")[0]
    weights = load_file(str(ckpt / "model.safetensors"))
    weights["backbone.body.3.weight"][0, 0, 0, 0] = float("nan")
    weights["backbone.body.3.weight"][1, 0, 0, 0] = float("inf")
    save_file(weights, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor backbone.body.3.weight holds 2 NaN/infinite"):
        load_for_inference(tmp_path / "run")
    assert main(["eval", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(ckpt / "model.safetensors") in err


def test_init_from_another_architecture_is_refused(tmp_path, recipe, caplog):
    _run(tmp_path / "stage1", recipe, 8)
    with pytest.raises(WeightsError, match=r"model.init_from=.*stage1.*another architecture than this model "
                                           r"\(tensor backbone.body.0.weight has shape \(8, 3, 3, 3\) in the file, "
                                           r"\(16, 3, 3, 3\) in the model"):
        build_model(_cfg(recipe, 16, f"model.init_from={tmp_path / 'stage1'}"))
    # the same trunk with another head (embedding size) is stage two's normal case: the head keeps its init
    cfg = _cfg(recipe, 8, "model.embedding_dim=6", f"model.init_from={tmp_path / 'stage1'}")
    model = build_model(cfg)
    stage1 = load_file(str(read_checkpoint(tmp_path / "stage1")[0] / "model.safetensors"))
    for k, v in model.state_dict().items():
        if k.startswith("backbone."):
            assert torch.equal(v, stage1[k]), k


def test_init_from_nan_weights_is_refused(tmp_path, recipe):
    _run(tmp_path / "stage1", recipe, 8)
    f = read_checkpoint(tmp_path / "stage1")[0] / "model.safetensors"
    weights = load_file(str(f))
    weights["head.proj.weight"].fill_(float("nan"))
    save_file(weights, str(f))
    with pytest.raises(WeightsError, match="tensor head.proj.weight holds 256 NaN/infinite values"):
        build_model(_cfg(recipe, 8, f"model.init_from={tmp_path / 'stage1'}"))


@pytest.mark.parametrize("state", [{}, {"step": 3}, [1, 2]])
def test_a_state_json_without_what_resuming_needs(tmp_path, recipe, state):
    from deepmetric.engine.trainer import Trainer

    Trainer(_cfg(recipe, 8, "train.max_steps=1"), tmp_path / "run").fit()
    (tmp_path / "run" / "checkpoints" / "last" / "state.json").write_text(json.dumps(state))
    match = "state.json lacks .*epoch.*: not a training checkpoint" if isinstance(state, dict) else \
        "state.json: expected a JSON object, got list"
    with pytest.raises(CheckpointError, match=match):
        Trainer(_cfg(recipe, 8, "train.max_steps=2"), tmp_path / "run", resume=True)


def test_load_train_state_refuses_missing_keys_without_a_key_error(tmp_path, recipe):
    _run(tmp_path / "run", recipe, 8)
    ckpt = read_checkpoint(tmp_path / "run")[0]
    with pytest.raises(CheckpointError, match=r"lacks step, epoch, position, scheduler, loader_generator, optimizers"):
        load_train_state(ckpt, torch.nn.ModuleList(), {}, {})


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoints_honour_the_umask(tmp_path, recipe, umask):
    previous = os.umask(umask)
    try:
        _run(tmp_path / "run", recipe, 8)
    finally:
        os.umask(previous)
    ckpt = tmp_path / "run" / "checkpoints" / "best"
    assert ckpt.stat().st_mode & 0o777 == 0o777 & ~umask
    for f in ckpt.iterdir():
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f.name


# -- a kill at any filesystem step ------------------------------------------------------------------

class Killed(BaseException):
    """The process died (kill -9): no handler runs and nothing after it reaches the disk."""


STEPS = ("_make_dir", "_write_file", "_rename", "_unlink", "_rmdir")


@contextmanager
def kill_at(monkeypatch, k):
    """Die at the ``k``-th filesystem step of checkpoint writing (0-based): a file write leaves half its
    bytes, every later step (and fsync) fails. Yields a record: ``steps`` taken, ``states`` (paths of
    state.json files written whole), ``died``."""
    record = {"steps": 0, "states": [], "died": False}
    real = {name: getattr(ckpt_mod, name) for name in (*STEPS, "_fsync_dir")}

    def wrap(name):
        def step(*args):
            if record["died"]:
                raise Killed
            if name == "_fsync_dir":
                return real[name](*args)
            i = record["steps"]
            record["steps"] += 1
            if i == k:
                record["died"] = True
                if name == "_write_file":
                    path, data = args
                    real[name](path, data[: len(data) // 2])
                raise Killed
            out = real[name](*args)
            if name == "_write_file" and args[0].name == "state.json":
                record["states"].append(args[0])
            return out
        return step

    with monkeypatch.context() as m:
        for name in real:
            m.setattr(ckpt_mod, name, wrap(name))
        yield record


def _tiny_save(folder, step):
    """Save a checkpoint whose weights encode ``step``; returns the weights saved."""
    torch.manual_seed(step)
    model = torch.nn.Linear(3, 2)
    save_checkpoint(folder, cfg=load_config(None, []), model=model, losses=torch.nn.ModuleList(), optimizers={},
                    state={"step": step})
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _saved(step):
    torch.manual_seed(step)
    return {k: v.detach().clone() for k, v in torch.nn.Linear(3, 2).state_dict().items()}


def _crashed_save(monkeypatch, folder, step, k):
    """Save ``step`` killed at step ``k``; returns whether its state.json got written whole and whether
    the kill happened at all (False: ``k`` is past the save's last step)."""
    with kill_at(monkeypatch, k) as record:
        try:
            _tiny_save(folder, step)
        except Killed:
            pass
    return bool(record["states"]), record["died"]


def _assert_resumes(folder, step):
    found, state = read_checkpoint(folder, prefer="last")
    assert state["step"] == step, (found, state["step"], step)
    weights = load_file(str(found / "model.safetensors"))
    expected = _saved(step)
    assert weights.keys() == expected.keys()
    for key in weights:
        assert torch.equal(weights[key], expected[key]), key


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_a_kill_at_any_step_of_a_save_leaves_the_newest_complete_checkpoint(tmp_path, monkeypatch):
    k = 0
    while True:
        folder = tmp_path / str(k) / "last"
        _tiny_save(folder, 1)
        written, died = _crashed_save(monkeypatch, folder, 2, k)
        if not died:
            break
        _assert_resumes(folder, 2 if written else 1)
        # the next save puts itself in place and removes whatever the killed one left
        _tiny_save(folder, 3)
        _assert_resumes(folder, 3)
        assert _leftovers(folder.parent) == [], k
        k += 1
    assert k >= 10, "mkdir, four files, two renames, the old folder's removal"


def test_two_kills_in_a_row_at_every_pair_of_steps(tmp_path, monkeypatch):
    """Any kill during a save, then any kill during the save of the resumed run: the newest checkpoint
    whose state.json was written whole is found, bitwise equal to what was saved. (fsync is skipped
    here: what it guarantees shows only after a power cut; the order of the steps is what is checked.)"""
    monkeypatch.setattr(ckpt_mod.os, "fsync", lambda fd: None)
    pairs = 0
    k = 0
    while True:
        j, died_first = 0, True
        while True:
            folder = tmp_path / f"{k}-{j}" / "last"
            _tiny_save(folder, 1)
            written2, died_first = _crashed_save(monkeypatch, folder, 2, k)
            written3, died = _crashed_save(monkeypatch, folder, 3, j)
            _assert_resumes(folder, 3 if written3 else 2 if written2 else 1)
            pairs += 1
            if not died:
                break
            j += 1
        if not died_first:
            break
        k += 1
    assert pairs > 100


def test_the_issue_sequence_kill_between_renames_then_during_old_removal(tmp_path, monkeypatch):
    """A crash between the two renames, then a kill -9 of the resume while it removes .last.old, used to
    leave a complete .last.tmp-* that --resume ignored ("no complete checkpoint")."""
    folder = tmp_path / "checkpoints" / "last"
    _tiny_save(tmp_path / "checkpoints" / "best", 1)
    _tiny_save(folder, 1)
    _crashed_save(monkeypatch, folder, 2, 6)  # mkdir, 4 files, rename last -> .last.old; dies renaming tmp -> last
    assert not folder.exists() and (tmp_path / "checkpoints" / ".last.old").is_dir()
    _crashed_save(monkeypatch, folder, 3, 6)  # dies in .last.old after its state.json went
    names = _leftovers(folder.parent)
    assert len([n for n in names if n.startswith(".last.tmp-")]) == 2 and ".last.old" in names
    _assert_resumes(tmp_path, 3)
    _tiny_save(folder, 4)
    assert sorted(p.name for p in folder.parent.iterdir()) == ["best", "last"]
    _assert_resumes(tmp_path, 4)


def test_the_issue_layout_on_disk_resumes_from_the_complete_tmp_folder(tmp_path):
    """The folders the two faults leave, made by hand: a complete .last.tmp-*, a .last.old whose removal
    was cut short (state.json gone), no last, and best."""
    checkpoints = tmp_path / "checkpoints"
    _tiny_save(checkpoints / "best", 1)
    _tiny_save(checkpoints / "old", 2)
    (checkpoints / "old").rename(checkpoints / ".last.old")
    (checkpoints / ".last.old" / "state.json").unlink()
    _tiny_save(checkpoints / "new", 3)
    (checkpoints / "new").rename(checkpoints / ".last.tmp-1a2b3c4d")
    _tiny_save(checkpoints / "torn", 4)
    (checkpoints / "torn").rename(checkpoints / ".last.tmp-99999999")
    (checkpoints / ".last.tmp-99999999" / "state.json").write_text('{"step": 4, "epo')  # killed mid-write
    _assert_resumes(tmp_path, 3)
    assert read_checkpoint(tmp_path, "best")[1]["step"] == 1


def test_an_error_while_writing_leaves_nothing_behind(tmp_path, monkeypatch):
    """A failed write (disk full) is not a kill: the half-written folder is removed, the old one stays."""
    folder = tmp_path / "last"
    _tiny_save(folder, 1)

    def full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt_mod, "_write_file", full)
    with pytest.raises(OSError, match="No space"):
        _tiny_save(folder, 2)
    monkeypatch.undo()
    assert _leftovers(tmp_path) == []
    _assert_resumes(folder, 1)


def test_resume_after_a_kill_at_every_step_equals_an_uninterrupted_run(tmp_path, recipe, monkeypatch):
    """Train 2 steps, resume to 4 and die at step k of the checkpoint writes at step 4, resume again:
    the final weights are bitwise those of a run that was never interrupted."""
    from deepmetric.engine.trainer import Trainer

    base = [*recipe, "model.backbone_options={width: 4}", "train.eval_every=2"]
    Trainer(load_config(None, [*base, "train.max_steps=4"]), tmp_path / "straight").fit()
    expected = load_file(str(read_checkpoint(tmp_path / "straight", "last")[0] / "model.safetensors"))
    Trainer(load_config(None, [*base, "train.max_steps=2"]), tmp_path / "first").fit()
    k = 0
    while True:
        run = tmp_path / f"run{k}"
        shutil.copytree(tmp_path / "first", run)
        with kill_at(monkeypatch, k) as record:
            try:
                Trainer(load_config(None, [*base, "train.max_steps=4"]), run, resume=True).fit()
            except Killed:
                pass
        if not record["died"]:
            break
        Trainer(load_config(None, [*base, "train.max_steps=4"]), run, resume=True).fit()
        ckpt, state = read_checkpoint(run, "last")
        assert state["step"] == 4
        got = load_file(str(ckpt / "model.safetensors"))
        for key in expected:
            assert torch.equal(got[key], expected[key]), (k, key)
        k += 1
    assert k >= 10
