"""Train-side bad input is one line (exit 2), never a traceback, and a full disk loses nothing:
issue 23 items 11 and 12 (run folders that cannot be written, recipes of defaults only, a disk that
fills during training, pair losses without pairs)."""
from __future__ import annotations

import errno

import pytest

from deepmetric.cli import main

QUICK = ["data.format=digits", "data.options={}", "data.train_classes=[0,1,2,3,4]", "data.val_classes=null",
         "data.classes_per_batch=5", "model.backbone_options={width: 8, grid: 2}", "model.embedding_dim=8",
         "train.max_steps=6", "train.eval_every=2", "train.log_every=2", "train.progress=false"]


def test_a_run_folder_that_cannot_be_written_is_one_line(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "F"
    a_file.write_text("x")
    for where, message in ((a_file, "run directory .*F: a file, not a folder"),
                           (a_file / "sub", "run directory .*sub: .*F is a file, not a folder")):
        assert main(["-q", "train", "quickstart", "--run-dir", str(where), *QUICK]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        import re

        assert re.search(message, err), err
    # a read-only disk (root passes permission checks, so the disk refuses the folder itself)
    from pathlib import Path

    real_mkdir = Path.mkdir

    def refuse(self, *args, **kwargs):
        if self.name == "ro":
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", refuse)
    assert main(["-q", "train", "quickstart", "--run-dir", str(tmp_path / "ro"), *QUICK]) == 2
    assert "Read-only file system" in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["name: minimal\n", ""])
def test_a_recipe_of_defaults_only_trains(tmp_path, recipe):
    """The defaults are digits (one-channel arrays) and a three-channel model: the grey arrays are
    repeated into three channels, as grey image files are."""
    path = tmp_path / "r.yaml"
    path.write_text(recipe)
    assert main(["-q", "train", str(path), "--run-dir", str(tmp_path / "run"), "train.max_steps=2",
                 "model.backbone_options={width: 8}", "train.progress=false"]) == 0


def test_pairs_without_a_positive_are_refused(tmp_path, capsys):
    assert main(["-q", "train", "quickstart", "--run-dir", str(tmp_path / "r"), *QUICK,
                 "data.samples_per_class=1"]) == 2
    assert "data.samples_per_class=1: a batch holds one image per class" in capsys.readouterr().err


def test_a_full_disk_stops_in_one_line_and_resume_continues_exactly(tmp_path, capsys, monkeypatch):
    import deepmetric.engine.trainer as trainer_module

    assert main(["-q", "train", "quickstart", "--run-dir", str(tmp_path / "whole"), *QUICK]) == 0
    real = trainer_module.save_checkpoint
    calls = {"n": 0}

    def fill_up(path, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # the disk fills at the second evaluation's 'last' checkpoint
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, **kwargs)

    monkeypatch.setattr(trainer_module, "save_checkpoint", fill_up)
    cut = tmp_path / "cut"
    assert main(["-q", "train", "quickstart", "--run-dir", str(cut), *QUICK]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and f"--resume {cut}" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(trainer_module, "save_checkpoint", real)  # space freed
    assert main(["-q", "train", "--resume", str(cut)]) == 0
    for name in ("last", "best"):
        assert ((cut / "checkpoints" / name / "model.safetensors").read_bytes()
                == (tmp_path / "whole" / "checkpoints" / name / "model.safetensors").read_bytes())
