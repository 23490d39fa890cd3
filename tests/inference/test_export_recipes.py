"""Every model the packaged recipes train exports to ONNX and TorchScript with PyTorch parity; a missing
optional package is one line naming the extra; exported files honour the umask."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deepmetric.cli import main
from deepmetric.config import load_config
from deepmetric.engine.build import build_model
from deepmetric.engine.checkpoint import save_checkpoint
from deepmetric.inference.export import (ONNX_EXTRA, RUNTIME_EXTRA, export_checkpoint, onnx_session,
                                         read_onnx_metadata)
from deepmetric.models.backbones import _bin_matrix, grid_pool
from deepmetric.quickstart import RECIPE

RECIPES = Path(RECIPE).parent
#: ResNet-50/101/34 export like ResNet-18 with the same head, options and pooling, 20x faster
SMALL_RESNET = {"resnet34": "resnet18", "resnet50": "resnet18", "resnet101": "resnet18"}
IGNORED = ("pretrained", "init_from", "freeze_bn", "freeze_bn_affine")  # no effect on the exported graph


def _model_key(cfg):
    m = {k: v for k, v in cfg.model.model_dump().items() if k not in IGNORED}
    m["backbone"] = SMALL_RESNET.get(m["backbone"], m["backbone"])
    return repr(sorted(m.items())), cfg.data.transform, cfg.data.image_size is None


def _distinct_recipes():
    """The first recipe of each distinct model configuration (architecture, head, preprocessing kind)."""
    seen = {}
    for path in sorted(RECIPES.rglob("*.yaml")):
        try:
            cfg = load_config(path)
        except Exception:  # a recipe that does not load is the recipe tests' business
            continue
        seen.setdefault(_model_key(cfg), path)
    return sorted(seen.values())


def _tiny(cfg_path):
    """The recipe's model with a small ResNet and a tiny input (ReID keeps its 2:1 aspect)."""
    cfg = load_config(cfg_path)
    overrides = [f"model.backbone={SMALL_RESNET.get(cfg.model.backbone, cfg.model.backbone)}",
                 "model.pretrained=null", "model.init_from=null"]
    if cfg.data.image_size is not None:
        h, w = cfg.data.image_size
        overrides.append(f"data.image_size=[{64 if h > w else 32},32]")
    return load_config(cfg_path, overrides)


def _checkpoint(cfg, folder):
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # eval-mode statistics that are not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return save_checkpoint(folder, cfg=cfg, model=model, losses=torch.nn.ModuleList(), optimizers={},
                           state={"step": 0})


@pytest.mark.timeout(60)
@pytest.mark.parametrize("recipe", _distinct_recipes(), ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_recipe_model_exports_with_parity(recipe, tmp_path):
    cfg = _tiny(recipe)
    ckpt = _checkpoint(cfg, tmp_path / "best")
    onnx = export_checkpoint(ckpt, "onnx", tmp_path / "model.onnx")
    script = export_checkpoint(ckpt, "torchscript", tmp_path / "model.pt")
    assert onnx.max_abs_diff <= 1e-4 and script.max_abs_diff <= 1e-4
    meta = read_onnx_metadata(tmp_path / "model.onnx")
    assert meta["channels"] == cfg.model.in_chans and meta["embedding_dim"] == build_model(cfg).embedding_dim


def test_the_recipes_cover_the_model_kinds():
    """The parametrisation above really meets grids, poolings, BNNecks and both embedding kinds."""
    cfgs = [load_config(p) for p in _distinct_recipes()]
    kinds = {(c.model.backbone.startswith("resnet"), c.model.pooling, c.model.bnneck, c.model.embedding_dim > 0,
              bool(c.model.backbone_options.get("grid"))) for c in cfgs}
    assert {k[1] for k in kinds} >= {"avg", "max", "avgmax"}
    assert any(k[2] for k in kinds) and any(k[3] for k in kinds) and any(not k[3] for k in kinds)
    assert any(k[4] for k in kinds), "a small CNN with a grid (the quickstart's)"


@pytest.mark.parametrize("image_size, embedding_dim", [(None, 0), (None, 16), ([8, 8], 0), ([32, 32], 16)])
def test_the_quickstart_model_exports(image_size, embedding_dim, tmp_path, capsys):
    """small_cnn with grid 2 and one channel: its adaptive pooling to 2x2 used to stop torch.onnx
    ("input size not accessible") when the input size is free, as with the quickstart's preset; the
    8x8 digits and the 32x32 glyphs are checked, and other sizes where the size is free."""
    size = "null" if image_size is None else f"[{image_size[0]},{image_size[1]}]"
    cfg = load_config(RECIPE, ["model.backbone=small_cnn", "model.backbone_options={width: 32, grid: 2}",
                               "model.in_chans=1", f"model.embedding_dim={embedding_dim}", "data.transform=tensor",
                               f"data.image_size={size}"])
    ckpt = _checkpoint(cfg, tmp_path / "checkpoints" / "best")
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--output", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "max abs diff" in out and "N x 1 x" in out and ", L;" in out
    session = onnx_session(tmp_path / "m.onnx")
    model = build_model(cfg).eval()
    from deepmetric.engine.checkpoint import load_model_weights

    load_model_weights(model, ckpt)
    for hw in ([image_size] if image_size else [(8, 8), (32, 32), (13, 11)]):
        x = torch.randn(3, 1, *hw, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            ref = model(x).numpy()
        got = session.run(None, {"images": x.numpy()})[0]
        assert got.shape == ref.shape and np.abs(got - ref).max() <= 1e-4, hw


@pytest.mark.parametrize("hw", [(8, 8), (32, 32), (7, 5), (1, 3), (29, 37)])
def test_the_exportable_grid_pooling_is_pytorchs(hw):
    x = torch.randn(2, 3, *hw, dtype=torch.float64)
    pooled = _bin_matrix(hw[0], 2, x.dtype) @ x @ _bin_matrix(hw[1], 2, x.dtype).T
    torch.testing.assert_close(pooled, torch.nn.functional.adaptive_avg_pool2d(x, 2), rtol=0, atol=1e-12)
    assert torch.equal(grid_pool(x, 2), torch.nn.functional.adaptive_avg_pool2d(x, 2)), "eager keeps the kernel"


@pytest.mark.parametrize("hidden", ["onnx", "onnxruntime"])
def test_export_without_onnx_says_which_extra(hidden, checkpoint_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, hidden, None)  # import fails as if it were not installed
    out = tmp_path / "m.onnx"
    assert main(["export", "--checkpoint", str(checkpoint_dir), "--format", "onnx", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert f"'{hidden}' package, which is not installed: pip install 'deepmetric[{ONNX_EXTRA}]'" in err
    assert not out.exists()
    # TorchScript needs neither
    assert main(["export", "--checkpoint", str(checkpoint_dir), "--format", "torchscript", "--output",
                 str(tmp_path / "m.pt")]) == 0


def test_the_extras_named_provide_the_packages():
    """The messages' extras are the ones pyproject.toml gives the packages to (extras may include others)."""
    import re
    import tomllib

    extras = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def packages(extra):
        out = set()
        for dep in extras[extra]:
            name = re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0]
            inner = re.match(r"deepmetric\[(.*)\]", dep)
            out |= set().union(*(packages(e.strip()) for e in inner.group(1).split(","))) if inner else {name}
        return out

    assert {"onnx", "onnxruntime", "torch"} <= packages(ONNX_EXTRA)
    assert "onnxruntime" in packages(RUNTIME_EXTRA)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_honour_the_umask(umask, checkpoint_dir, tmp_path):
    previous = os.umask(umask)
    try:
        export_checkpoint(checkpoint_dir, "onnx", tmp_path / "m.onnx")
        export_checkpoint(checkpoint_dir, "torchscript", tmp_path / "m.pt")
    finally:
        os.umask(previous)
    for name in ("m.onnx", "m.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.pt"], "no temporary file left"
