"""A tiny real checkpoint and gallery index (a copy of the ``tests/inference`` checkpoint fixture), the
app under FastAPI's TestClient, and a real uvicorn server on a free loopback port."""
from __future__ import annotations

import socket
import threading
import time

import pytest
import torch

from deepmetric.config import load_config
from deepmetric.data.synthetic import make_image_folder
from deepmetric.engine.build import build_model
from deepmetric.engine.checkpoint import save_checkpoint
from deepmetric.inference.index import SearchIndex
from deepmetric.inference.predictor import Predictor

TINY = ["model.backbone=small_cnn", "model.in_chans=3", "model.embedding_dim=16",
        "data.transform=imagenet", "data.image_size=[32,32]"]


@pytest.fixture(scope="session")
def serve_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = load_config(None, TINY)
    return save_checkpoint(tmp_path_factory.mktemp("serve_ckpt") / "best", cfg=cfg, model=build_model(cfg),
                           losses=torch.nn.ModuleList(), optimizers={}, state={"step": 0})


@pytest.fixture(scope="session")
def gallery(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("serve_images") / "gallery", n_classes=4, per_class=5, size=40)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny workloads on 2 shared cores: extra intra-op threads only spin. Restored per module."""
    import faiss

    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)


@pytest.fixture(scope="session")
def predictor_and_index(serve_checkpoint, gallery):
    predictor = Predictor.from_checkpoint(serve_checkpoint)
    es = predictor.embed_folder(gallery, progress=False)
    from deepmetric.inference.predictor import list_inputs

    index = SearchIndex.build(es, backend="faiss-flat", class_names=list_inputs(gallery).class_names,
                              source={"model": predictor.fingerprint})
    return predictor, index


@pytest.fixture(scope="module")
def live_server(predictor_and_index):
    """``http://127.0.0.1:<free port>`` served by uvicorn in a thread; stopped (and joined) afterwards.

    The socket is bound before the server starts, so there is no race for the port."""
    import uvicorn

    from deepmetric.serve import create_app

    predictor, index = predictor_and_index
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(predictor, index, max_upload_mb=1), log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
