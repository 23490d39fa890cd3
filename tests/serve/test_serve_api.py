"""The HTTP API through FastAPI's TestClient: the happy paths, every kind of bad input (4xx with a
message, never a 500), and concurrent requests against a real uvicorn server."""
from __future__ import annotations

import io
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from deepmetric.serve import create_app

LIMIT_MB = 0.05  # 51,200 bytes: small enough to test cheaply


@pytest.fixture(scope="module")
def client(predictor_and_index):
    predictor, index = predictor_and_index
    with TestClient(create_app(predictor, index, max_upload_mb=LIMIT_MB, max_top_k=20),
                    raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="module")
def query(image_folder):
    path = sorted(image_folder.glob("class_01/*.jpg"))[0]
    return path, path.read_bytes()


def upload(data: bytes, name: str = "q.jpg", mime: str = "image/jpeg"):
    return {"file": (name, data, mime)}


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels (a decompression bomb's signature) with a
    tiny image body: only the header is needed to refuse it."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def assert_error(response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail
    for w in words:
        assert w in detail, detail


# -- happy paths -------------------------------------------------------------------------------------

def test_health(client, predictor_and_index):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["embedding_dim"] == 16 and h["index"]["count"] == 20
    assert h["max_upload_bytes"] == int(LIMIT_MB * 1024 * 1024) and "source" not in h["index"]


def test_search_returns_hits_with_labels_and_urls(client, query, predictor_and_index):
    path, data = query
    r = client.post("/search?top_k=5", files=upload(data))
    assert r.status_code == 200
    body = r.json()
    assert body["metric"] == "cosine" and body["top_k"] == 5 and len(body["hits"]) == 5
    first = body["hits"][0]
    assert first["rank"] == 1 and first["name"] == path.name and first["label_name"] == "class_01"
    assert first["score"] == pytest.approx(1.0, abs=1e-5)
    assert [h["score"] for h in body["hits"]] == sorted((h["score"] for h in body["hits"]), reverse=True)
    img = client.get(first["image_url"])
    assert img.status_code == 200 and img.headers["content-type"] == "image/jpeg" and img.content == data


def test_embed_returns_the_predictor_vector(client, query, predictor_and_index):
    predictor, _ = predictor_and_index
    path, data = query
    r = client.post("/embed", files=upload(data))
    assert r.status_code == 200
    vec = np.asarray(r.json()["embedding"], np.float32)
    assert r.json()["dim"] == 16 and r.json()["l2_normalized"] is True
    np.testing.assert_allclose(vec, predictor.embed_images([str(path)])[0], atol=1e-6)


def test_png_with_alpha_and_grayscale_are_accepted(client):
    for mode in ("RGBA", "L", "P"):
        buf = io.BytesIO()
        Image.new(mode, (20, 30)).save(buf, format="PNG")
        assert client.post("/search", files=upload(buf.getvalue(), "q.png", "image/png")).status_code == 200


def test_page_and_openapi(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="file"' in page.text
    assert "http://" not in page.text and "https://" not in page.text  # no external resources
    js = client.get("/static/app.js").text
    assert "api(`/search" in js and "https://" not in js
    schema = client.get("/openapi.json").json()
    assert {"/health", "/embed", "/search", "/images/{item_id}"} <= set(schema["paths"])


# -- bad input: 4xx with a message ---------------------------------------------------------------------

def test_oversize_body_refused_before_reading(client):
    big = b"\xff" * (200 * 1024)  # above the limit plus multipart allowance
    assert_error(client.post("/search", files=upload(big)), 413, "above the limit")


def test_oversize_file_within_body_allowance(client):
    assert_error(client.post("/embed", files=upload(b"\xff" * (60 * 1024))), 413, "above the limit")


def test_oversize_chunked_body_without_length(client):
    def body():
        for _ in range(40):
            yield b"\0" * 8192
    r = client.post("/search", content=body(), headers={"content-type": "multipart/form-data; boundary=x"})
    assert_error(r, 413, "above the limit")


@pytest.mark.parametrize("data,name,mime", [
    (b"hello, I am text", "notes.txt", "text/plain"),
    (b"hello, I pretend to be a jpeg", "fake.jpg", "image/jpeg"),
    (b"%PDF-1.4 ...", "doc.pdf", "application/pdf"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "x.eps", "image/x-eps"),  # no Ghostscript
])
def test_non_image_is_415(client, data, name, mime):
    assert_error(client.post("/search", files=upload(data, name, mime)), 415, "not an image")


def test_empty_file_is_400(client):
    assert_error(client.post("/search", files=upload(b"")), 400, "empty upload")


def test_truncated_image_is_400(client, query):
    _, data = query
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    assert_error(client.post("/search", files=upload(buf.getvalue()[:-200], "t.png", "image/png")), 400, "truncated")


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [10_000, 40_000])  # above PIL's limit, and above twice it (PIL's own error)
def test_decompression_bomb_is_413(client, side):
    r = client.post("/search", files=upload(png_header_only(side, side), "bomb.png", "image/png"))
    assert_error(r, 413)
    assert "pixels" in r.json()["detail"]


def test_max_pixels_is_configurable(predictor_and_index, query):
    predictor, index = predictor_and_index
    with TestClient(create_app(predictor, index, max_pixels=1000)) as c:
        assert_error(c.post("/embed", files=upload(query[1])), 413, "40x40 = 1600 pixels")


@pytest.mark.parametrize("kwargs", [{}, {"data": {"image": "x"}}, {"files": {"image": ("q.jpg", b"x", "image/jpeg")}}])
def test_missing_file_field_is_422(client, kwargs):
    r = client.post("/search", **kwargs)
    assert_error(r, 422, "file", "Field required")
    assert r.json()["errors"][0]["loc"] == ["body", "file"]


@pytest.mark.parametrize("top_k", ["0", "21", "ten"])
def test_bad_top_k_is_422(client, query, top_k):
    assert_error(client.post(f"/search?top_k={top_k}", files=upload(query[1])), 422, "top_k")


@pytest.mark.parametrize("item", ["20", "-1", "999999999999"])
def test_unknown_image_id_is_404(client, item):
    assert_error(client.get(f"/images/{item}"), 404, "no gallery item")


def test_image_id_must_be_an_integer(client):
    assert client.get("/images/..%2F..%2Fetc%2Fpasswd").status_code in (404, 422)
    assert_error(client.get("/images/abc"), 422, "item_id")


def test_gallery_file_gone_is_404(predictor_and_index, tmp_path):
    from deepmetric.inference.index import SearchIndex

    predictor, _ = predictor_and_index
    index = SearchIndex(16)
    index.add(np.ones((2, 16), np.float32), [0, 1], [str(tmp_path / "deleted.jpg"), None])
    with TestClient(create_app(predictor, index)) as c:
        assert_error(c.get("/images/0"), 404, "no longer on disk")
        assert_error(c.get("/images/1"), 404, "no stored image path")


def test_wrong_method_and_route(client):
    assert client.get("/search").status_code == 405
    assert client.get("/nope").status_code == 404


# -- a real server, concurrent clients -------------------------------------------------------------------

def test_concurrent_requests_on_a_real_server(live_server, image_folder):
    import httpx

    files = sorted(image_folder.rglob("*.jpg"))[::3]  # 7 images over the 4 classes
    with httpx.Client(base_url=live_server, timeout=60) as http:
        expected = {str(f): http.post("/search?top_k=3", files=upload(f.read_bytes())).json()["hits"] for f in files}

        def one(i: int):
            f = files[i % len(files)]
            r = http.post("/search?top_k=3", files=upload(f.read_bytes()))
            return str(f), r.status_code, r.json()["hits"]

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(32)))
    assert all(status == 200 for _, status, _ in results)
    for name, _, hits in results:
        assert [h["id"] for h in hits] == [h["id"] for h in expected[name]]
        assert hits[0]["name"] == name.rsplit("/", 1)[1] and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
