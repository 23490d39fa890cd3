"""Predictor and the features file: inputs from folders and list files, embeddings equal to the model's
own forward pass, chunked writing that resumes after an interruption."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from deepmetric.data.transforms import build_transform
from deepmetric.engine.build import load_for_inference
from deepmetric.core.errors import UserError
from deepmetric.inference.predictor import (EmbeddingsFileError, InputError, Predictor, list_inputs,
                                            load_embeddings, write_embeddings)


def test_list_inputs_folder_labels_from_class_folders(image_folder, tmp_path):
    inputs = list_inputs(image_folder)
    assert len(inputs.paths) == 20 and inputs.class_names == [f"class_{i:02d}" for i in range(4)]
    assert inputs.labels.tolist() == sorted(inputs.labels.tolist()) and set(inputs.labels.tolist()) == {0, 1, 2, 3}
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    loose = list_inputs(flat)
    assert loose.labels.tolist() == [-1] and loose.class_names == []


def test_list_inputs_list_files(image_folder, tmp_path):
    paths = sorted(image_folder.rglob("*.jpg"))[:3]
    (tmp_path / "list.txt").write_text(f"# gallery\n{paths[0]} 7\n\n{paths[1]}\n{paths[2].relative_to(image_folder)} 3\n")
    (tmp_path / "class_00").symlink_to(image_folder / "class_00")  # relative paths resolve beside the list
    got = list_inputs(tmp_path / "list.txt")
    assert got.labels.tolist() == [7, -1, 3] and got.paths[2] == str(tmp_path / paths[2].relative_to(image_folder))
    (tmp_path / "list.csv").write_text(f"path,label\n{paths[0]},4\n{paths[1]},\n")
    got = list_inputs(tmp_path / "list.csv")
    assert got.labels.tolist() == [4, -1]
    (tmp_path / "bad.csv").write_text(f"path,label\n{paths[0]},cat\n")
    with pytest.raises(InputError, match="bad.csv line 2: label should be an integer"):
        list_inputs(tmp_path / "bad.csv")
    with pytest.raises(InputError, match="input not found"):
        list_inputs(tmp_path / "missing")


def test_embeddings_equal_the_model_forward(checkpoint_dir, image_folder):
    predictor = Predictor.from_checkpoint(checkpoint_dir)
    paths = sorted(str(p) for p in image_folder.rglob("*.jpg"))
    model, cfg, _ = load_for_inference(checkpoint_dir)
    tf = build_transform("imagenet", train=False, image_size=(32, 32))
    with torch.no_grad():
        ref = model(torch.stack([tf(Image.open(p).convert("RGB")) for p in paths])).numpy()
    from_paths = predictor.embed_images(paths, batch_size=6)
    from_pil = predictor.embed_images([Image.open(p) for p in paths[:4]])
    assert from_paths.dtype == np.float32 and from_paths.shape == (20, 16)
    np.testing.assert_allclose(from_paths, ref, atol=1e-5)
    np.testing.assert_allclose(from_pil, ref[:4], atol=1e-5)
    es = predictor.embed_folder(image_folder, batch_size=7, progress=False)
    np.testing.assert_allclose(es.vectors.numpy(), ref, atol=1e-5)
    assert es.paths == paths and len(set(es.labels.tolist())) == 4


def test_bad_image_is_a_user_error(checkpoint_dir, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match="bad.jpg"):
        Predictor.from_checkpoint(checkpoint_dir).embed_images([str(bad)])


class Interrupt(Exception):
    pass


def test_embed_resumes_after_interruption(checkpoint_dir, image_folder, tmp_path):
    inputs = list_inputs(image_folder)
    reference = write_embeddings(Predictor.from_checkpoint(checkpoint_dir), inputs, tmp_path / "ref.npz",
                                 chunk_size=6, batch_size=4, progress=False)

    predictor = Predictor.from_checkpoint(checkpoint_dir)
    calls = {"n": 0}
    real_run = predictor._run

    def flaky(batch):
        calls["n"] += 1
        if calls["n"] == 4:  # chunk 0 is two batches (4 + 2 images); fail inside chunk 1
            raise Interrupt()
        return real_run(batch)

    predictor._run = flaky
    out = tmp_path / "features.npz"
    with pytest.raises(Interrupt):
        write_embeddings(predictor, inputs, out, chunk_size=6, batch_size=4, progress=False)
    parts = tmp_path / "features.npz.parts"
    assert not out.exists() and sorted(p.name for p in parts.glob("chunk_*.npy")) == ["chunk_000000.npy"]
    assert json.loads((parts / "manifest.json").read_text())["chunk_size"] == 6

    calls["n"] = 0
    predictor._run = lambda batch: (calls.__setitem__("n", calls["n"] + 1), real_run(batch))[1]
    write_embeddings(predictor, inputs, out, chunk_size=6, batch_size=4, progress=False)
    assert calls["n"] == 5  # chunks 1..3 only: 6, 6 and 2 images in 2 + 2 + 1 batches
    assert not parts.exists()
    a, b = load_embeddings(reference), load_embeddings(out)
    np.testing.assert_array_equal(a.embeddings.vectors.numpy(), b.embeddings.vectors.numpy())
    np.testing.assert_array_equal(a.embeddings.labels, b.embeddings.labels)
    assert a.embeddings.paths == b.embeddings.paths and b.class_names == inputs.class_names
    assert b.meta["model"] == predictor.fingerprint and b.meta["count"] == 20


def test_stale_parts_from_other_inputs_are_discarded(checkpoint_dir, image_folder, tmp_path, caplog):
    predictor = Predictor.from_checkpoint(checkpoint_dir)
    inputs = list_inputs(image_folder)
    parts = tmp_path / "f.npz.parts"
    parts.mkdir()
    (parts / "manifest.json").write_text(json.dumps({"inputs_sha256": "other"}))
    np.save(parts / "chunk_000000.npy", np.zeros((6, 16), np.float32))
    write_embeddings(predictor, inputs, tmp_path / "f.npz", chunk_size=6, progress=False)
    assert "starting over" in caplog.text
    assert np.abs(load_embeddings(tmp_path / "f.npz").embeddings.vectors.numpy()).sum() > 0


def test_float16_output(checkpoint_dir, image_folder, tmp_path):
    out = write_embeddings(Predictor.from_checkpoint(checkpoint_dir), list_inputs(image_folder), tmp_path / "h.npz",
                           dtype="float16", progress=False)
    with np.load(out) as z:
        assert z["vectors"].dtype == np.float16 and z["vectors"].shape == (20, 16)
        assert z["labels"].dtype == np.int64 and z["paths"].dtype.kind == "U"
    assert load_embeddings(out).embeddings.vectors.dtype == torch.float32


def test_load_embeddings_errors(tmp_path):
    with pytest.raises(EmbeddingsFileError, match="not found"):
        load_embeddings(tmp_path / "none.npz")
    (tmp_path / "x.index").write_bytes(b"DMINDEX\0" + b"\0" * 40)
    with pytest.raises(EmbeddingsFileError, match="x.index: not an .npz"):
        load_embeddings(tmp_path / "x.index")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(EmbeddingsFileError, match="other.npz: no vectors, labels, paths"):
        load_embeddings(tmp_path / "other.npz")
