"""Serving an ONNX model without PyTorch (issue 15): in a subprocess where ``import torch`` fails, the
ONNX predictor embeds, the exact index searches and the app answers, and ``torch`` is never in
``sys.modules``."""
from __future__ import annotations

import json

import pytest


def test_onnx_serving_path_never_imports_torch(onnx_gallery, image_folder, run_python):
    model, index = onnx_gallery
    query = sorted(image_folder.glob("class_01/*.jpg"))[0]
    r = run_python(f"""
        import argparse, json
        from fastapi.testclient import TestClient
        from deepmetric.inference.index import SearchIndex
        from deepmetric.inference.predictor import Predictor
        from deepmetric.serve.cli import build_app, register

        predictor = Predictor.from_onnx({str(model)!r})
        hits = SearchIndex.load({str(index)!r}).search(predictor.embed_images([{str(query)!r}]), k=3)[0]
        parser = argparse.ArgumentParser()
        register(parser.add_subparsers())
        args = parser.parse_args(["serve", "--model", {str(model)!r}, "--index", {str(index)!r}])
        with TestClient(build_app(args), base_url="http://127.0.0.1:8000") as c:
            data = open({str(query)!r}, "rb").read()
            health = c.get("/health").json()
            found = c.post("/search?top_k=3", files={{"file": ("q.jpg", data, "image/jpeg")}}).json()
            embedded = c.post("/embed", files={{"file": ("q.jpg", data, "image/jpeg")}}).json()
            image = c.get(found["hits"][0]["image_url"])
        print(json.dumps({{"torch": [m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision")],
                          "runtime": health["runtime"], "backend": health["index"]["backend"],
                          "cli_hits": [h.id for h in hits], "hits": [h["id"] for h in found["hits"]],
                          "score": found["hits"][0]["score"], "dim": embedded["dim"], "image": image.status_code}}))
    """, block_torch=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["torch"] == []
    assert out["runtime"] == "onnx" and out["backend"] == "exact" and out["dim"] == 16 and out["image"] == 200
    assert out["hits"] == out["cli_hits"] and out["score"] == pytest.approx(1.0, abs=1e-5)


def test_predictor_and_app_never_import_torch(onnx_gallery, image_folder, run_python):
    """This side of the path on its own: the ONNX predictor and the app serve a numpy-only index
    (``deepmetric.inference``'s package ``__init__`` is bypassed, so only predictor.py, preprocess.py
    and serve/ are imported), with torch blocked."""
    model, _ = onnx_gallery
    query = sorted(image_folder.glob("class_01/*.jpg"))[0]
    r = run_python(f"""
        import json, types
        import numpy as np
        import deepmetric
        pkg = types.ModuleType("deepmetric.inference")
        pkg.__path__ = [deepmetric.__path__[0] + "/inference"]
        sys.modules["deepmetric.inference"] = pkg
        from fastapi.testclient import TestClient
        from deepmetric.inference.predictor import Predictor
        from deepmetric.serve import create_app

        class Hit:
            def __init__(self, i, s):
                self.id, self.score, self.label, self.path, self.label_name = i, s, 0, None, None

        class NumpyIndex:
            dim, metric, mode, backend_name, source, paths = 16, "cosine", "items", "numpy", {{}}, [None, None]
            vectors = np.eye(2, 16, dtype=np.float32)
            def __len__(self):
                return 2
            def info(self):
                return {{"backend": "numpy", "metric": "cosine", "dim": 16, "count": 2, "mode": "items", "params": {{}}}}
            def search(self, q, k):
                s = q @ self.vectors.T / np.linalg.norm(q)
                return [[Hit(int(i), float(row[i])) for i in np.argsort(-row)[:k]] for row in s]

        predictor = Predictor.from_onnx({str(model)!r})
        with TestClient(create_app(predictor, NumpyIndex())) as c:
            data = open({str(query)!r}, "rb").read()
            found = c.post("/search?top_k=2", files={{"file": ("q.jpg", data, "image/jpeg")}})
            embedded = c.post("/embed", files={{"file": ("q.jpg", data, "image/jpeg")}})
        print(json.dumps({{"torch": [m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision")],
                          "search": found.status_code, "hits": len(found.json()["hits"]),
                          "embedding": embedded.json()["embedding"]}}))
    """, block_torch=True)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["torch"] == [] and out["search"] == 200 and out["hits"] == 2
    from deepmetric.inference.predictor import Predictor

    expected = Predictor.from_onnx(model).embed_images([str(query)])[0]
    assert out["embedding"] == pytest.approx(expected.tolist(), abs=1e-6)
