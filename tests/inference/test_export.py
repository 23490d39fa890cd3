"""ONNX and TorchScript export: parity with PyTorch (<= 1e-4), metadata, and the refusal path."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from deepmetric.engine.build import load_for_inference
from deepmetric.inference.export import (ExportParityError, export_checkpoint, onnx_session,
                                         read_onnx_metadata, read_torchscript_metadata)
from deepmetric.inference.predictor import Predictor


def test_onnx_parity_and_metadata(checkpoint_dir, tmp_path):
    out = tmp_path / "model.onnx"
    report = export_checkpoint(checkpoint_dir, "onnx", out)
    assert report.max_abs_diff <= 1e-4 and report.path == out
    meta = read_onnx_metadata(out)
    assert meta["input_size"] == [32, 32] and meta["channels"] == 3 and meta["color"] == "RGB"
    assert meta["mean"] == pytest.approx([0.485, 0.456, 0.406]) and meta["std"] == pytest.approx([0.229, 0.224, 0.225])
    assert meta["l2_normalized"] is True and meta["embedding_dim"] == 16
    assert meta["normalization_in_graph"] is False and meta["preset"] == "imagenet"
    assert meta["deepmetric_version"] and len(meta["source_fingerprint"]) == 16
    # independent check: dynamic batch axis, outputs against the eager model on a batch of 5
    proto = onnx.load(str(out))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    model, _, _ = load_for_inference(checkpoint_dir)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    got = onnx_session(out).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    assert got.shape == (5, 16)
    assert np.abs(got - ref).max() <= 1e-4
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_onnx_normalization_in_graph(checkpoint_dir, tmp_path, image_folder):
    out = tmp_path / "raw.onnx"
    report = export_checkpoint(checkpoint_dir, "onnx", out, normalization_in_graph=True)
    assert report.max_abs_diff <= 1e-4
    assert read_onnx_metadata(out)["normalization_in_graph"] is True
    # a predictor feeding 0-255 pixels to this graph agrees with the PyTorch predictor
    images = sorted(str(p) for p in image_folder.rglob("*.jpg"))[:6]
    a = Predictor.from_checkpoint(checkpoint_dir).embed_images(images)
    b = Predictor.from_onnx(out).embed_images(images)
    assert np.abs(a - b).max() <= 1e-4


def test_onnx_predictor_matches_torch(checkpoint_dir, tmp_path, image_folder):
    out = tmp_path / "model.onnx"
    export_checkpoint(checkpoint_dir, "onnx", out)
    images = sorted(str(p) for p in image_folder.rglob("*.jpg"))
    torch_pred = Predictor.from_checkpoint(checkpoint_dir)
    a = torch_pred.embed_images(images)
    assert np.abs(a - Predictor.from_onnx(out).embed_images(images)).max() <= 1e-4
    in_memory = Predictor.from_checkpoint(checkpoint_dir, runtime="onnx")
    assert in_memory.runtime == "onnx" and in_memory.fingerprint == torch_pred.fingerprint
    assert np.abs(a - in_memory.embed_images(images)).max() <= 1e-4


def test_torchscript_parity_and_metadata(checkpoint_dir, tmp_path):
    out = tmp_path / "model.pt"
    report = export_checkpoint(checkpoint_dir, "torchscript", out)
    assert report.max_abs_diff <= 1e-4
    assert read_torchscript_metadata(out)["input_size"] == [32, 32]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.load(str(out))
    model, _, _ = load_for_inference(checkpoint_dir)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert (scripted(x) - model(x)).abs().max().item() <= 1e-4


def test_parity_failure_refuses_and_removes_the_file(checkpoint_dir, tmp_path):
    out = tmp_path / "model.onnx"
    with pytest.raises(ExportParityError, match=r"differs from PyTorch by .* > ") as e:
        export_checkpoint(checkpoint_dir, "onnx", out, atol=-1.0)  # no difference can pass
    assert str(out) in str(e.value)
    assert not out.exists()


def test_unknown_format(checkpoint_dir, tmp_path):
    from deepmetric.inference.export import ExportError

    with pytest.raises(ExportError, match="unknown export format 'tflite'"):
        export_checkpoint(checkpoint_dir, "tflite", tmp_path / "m")


@pytest.mark.parametrize("pooling", ["max", "gem", "avgmax"])
def test_onnx_export_of_every_pooling(pooling, tmp_path):
    """The default checkpoint pools by average; the other poolings export with the same parity."""
    from deepmetric.config import load_config
    from deepmetric.engine.build import build_model
    from deepmetric.engine.checkpoint import save_checkpoint

    torch.manual_seed(0)
    cfg = load_config(None, ["model.backbone=small_cnn", "model.in_chans=3", "model.embedding_dim=16",
                             "data.transform=imagenet", "data.image_size=[32,32]", f"model.pooling={pooling}"])
    ckpt = save_checkpoint(tmp_path / "best", cfg=cfg, model=build_model(cfg), losses=torch.nn.ModuleList(),
                           optimizers={}, state={"step": 0})
    report = export_checkpoint(ckpt, "onnx", tmp_path / "model.onnx")
    assert report.max_abs_diff <= 1e-4


def test_onnx_export_of_the_pooled_retrieval(tmp_path, image_folder):
    """``model.retrieval: pooled`` (what ``train.fold_retrieval`` may choose): the export gives the
    pooled features the checkpoint's evaluation scored, with their width in the metadata, and the ONNX
    predictor agrees with the PyTorch one."""
    from deepmetric.config import load_config
    from deepmetric.engine.build import build_model
    from deepmetric.engine.checkpoint import save_checkpoint

    torch.manual_seed(0)
    cfg = load_config(None, ["model.backbone=small_cnn", "model.in_chans=3", "model.embedding_dim=16",
                             "model.backbone_options={width: 8, grid: 2}", "model.retrieval=pooled",
                             "data.transform=imagenet", "data.image_size=[32,32]"])
    ckpt = save_checkpoint(tmp_path / "best", cfg=cfg, model=build_model(cfg), losses=torch.nn.ModuleList(),
                           optimizers={}, state={"step": 0})
    report = export_checkpoint(ckpt, "onnx", tmp_path / "model.onnx")
    assert report.max_abs_diff <= 1e-4 and read_onnx_metadata(tmp_path / "model.onnx")["embedding_dim"] == 64
    images = sorted(str(p) for p in image_folder.rglob("*.jpg"))[:6]
    a = Predictor.from_checkpoint(ckpt).embed_images(images)
    assert a.shape == (6, 64) and np.abs(a - Predictor.from_onnx(tmp_path / "model.onnx").embed_images(images)).max() <= 1e-4
