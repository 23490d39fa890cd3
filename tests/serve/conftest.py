"""A gallery index of the shared tiny checkpoint (tests/conftest.py) and a real uvicorn server on a
free loopback port."""
from __future__ import annotations

import socket
import struct
import threading
import time
import zlib
from contextlib import contextmanager

import pytest

from deepmetric.inference.index import SearchIndex
from deepmetric.inference.predictor import Predictor


@pytest.fixture(scope="session")
def predictor_and_index(checkpoint_dir, image_folder):
    predictor = Predictor.from_checkpoint(checkpoint_dir)
    es = predictor.embed_folder(image_folder, progress=False)
    from deepmetric.inference.predictor import list_inputs

    index = SearchIndex.build(es, backend="faiss-flat", class_names=list_inputs(image_folder).class_names,
                              source={"model": predictor.fingerprint})
    return predictor, index


@pytest.fixture(scope="session")
def bomb_png():
    """Issue 13's decompression bomb: an all-black 9000 x 9000 RGB PNG, about 236 KB."""
    side = 9000

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z, row = zlib.compressobj(9), b"\0" * (1 + 3 * side)  # row by row: never 243 MB in memory
    idat = b"".join([*(z.compress(row) for _ in range(side)), z.flush()])
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.fixture(scope="session")
def onnx_gallery(checkpoint_dir, image_folder, tmp_path_factory):
    """``(model.onnx, gallery.index)``: the tiny checkpoint exported, and an exact index of its gallery."""
    from deepmetric.inference.export import export_checkpoint
    from deepmetric.inference.predictor import list_inputs

    work = tmp_path_factory.mktemp("onnx_gallery")
    export_checkpoint(checkpoint_dir, "onnx", work / "model.onnx")
    predictor = Predictor.from_onnx(work / "model.onnx")
    inputs = list_inputs(image_folder)
    es = predictor.embed_list(inputs.paths, inputs.labels, progress=False)
    SearchIndex.build(es, backend="exact", class_names=inputs.class_names,
                      source={"model": predictor.fingerprint}).save(work / "gallery.index")
    return work / "model.onnx", work / "gallery.index"


@contextmanager
def serving(app, address: str = "127.0.0.1"):
    """``http://<address>:<free port>`` served by uvicorn in a thread; stopped (and joined) afterwards.

    The socket is bound before the server starts, so there is no race for the port."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield f"http://{address}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@pytest.fixture(scope="session")
def serve():
    """:func:`serving`, for tests that start a server of their own."""
    return serving


@pytest.fixture(scope="module")
def live_server(predictor_and_index):
    """The tiny gallery's app (1 MB uploads) on a free loopback port."""
    from deepmetric.serve import create_app

    with serving(create_app(*predictor_and_index, max_upload_mb=1)) as url:
        yield url

