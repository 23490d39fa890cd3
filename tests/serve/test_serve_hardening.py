"""The server under hostile input (issue 13): decompression bombs refused fast without slowing other
queries, a bounded queue answering 503, one file per request, Host and API-key checks, limits that
agree between messages and /health, and one-line errors when the web stack is missing."""
from __future__ import annotations

import asyncio
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient

from deepmetric.serve import create_app
from deepmetric.serve.app import default_allowed_hosts


@pytest.fixture(scope="module")
def query(image_folder):
    return sorted(image_folder.glob("class_01/*.jpg"))[0].read_bytes()


def upload(data: bytes, name: str = "q.jpg", mime: str = "image/jpeg"):
    return {"file": (name, data, mime)}


# -- decompression bombs ---------------------------------------------------------------------------------

def test_bomb_is_refused_within_100ms_and_normal_queries_keep_their_latency(live_server, bomb_png, query):
    """Four bombs in flight at once leave a normal query's latency within 2x (plus 25 ms of scheduling
    slack on a shared machine); before the fix each bomb took 11.5 s of decoding."""
    assert len(bomb_png) < 300_000

    def timed(http: httpx.Client, data: bytes, name: str):
        start = time.perf_counter()
        r = http.post("/search?top_k=3", files=upload(data, name, "image/png" if name.endswith(".png") else "image/jpeg"))
        return r, time.perf_counter() - start

    with httpx.Client(base_url=live_server, timeout=60) as http:
        for _ in range(3):
            assert timed(http, query, "q.jpg")[0].status_code == 200  # warm-up
        baseline = statistics.median(timed(http, query, "q.jpg")[1] for _ in range(9))
        bombs = [timed(http, bomb_png, "bomb.png") for _ in range(5)]
        for r, _ in bombs:
            assert r.status_code == 413 and "9000x9000" in r.json()["detail"], r.text
        assert statistics.median(t for _, t in bombs) < 0.1, [t for _, t in bombs]

    def round_trip() -> float:
        with ThreadPoolExecutor(5) as pool, httpx.Client(base_url=live_server, timeout=60) as http:
            sent = [pool.submit(timed, http, bomb_png, "bomb.png") for _ in range(4)]
            normal = pool.submit(timed, http, query, "q.jpg")
            assert all(f.result()[0].status_code == 413 for f in sent)
            r, t = normal.result()
            assert r.status_code == 200
            return t

    loaded = statistics.median(round_trip() for _ in range(7))
    assert loaded <= 2 * baseline + 0.025, f"normal query {loaded * 1000:.1f} ms with bombs, {baseline * 1000:.1f} ms alone"


def test_pixel_limit_defaults_to_the_model_input_and_health_agrees(predictor_and_index, query):
    predictor, index = predictor_and_index
    with TestClient(create_app(predictor, index)) as c:
        h = c.get("/health").json()
        assert h["input_shape"] == [3, 32, 32] and h["max_pixels"] == predictor.pixel_limit() == 4096 * 4096
        assert h["max_request_bytes"] == h["max_upload_bytes"] + 4 * h["max_pixels"]
    with TestClient(create_app(predictor, index, max_pixels=1000)) as c:
        assert c.get("/health").json()["max_pixels"] == 1000
        r = c.post("/embed", files=upload(query))
        assert r.status_code == 413 and "40x40 = 1600 pixels, above the limit of 1000" in r.json()["detail"]


# -- the queue ---------------------------------------------------------------------------------------------

class BlockingPredictor:
    """The real predictor, whose embedding waits until ``release`` is set."""

    def __init__(self, real) -> None:
        self.real, self.release, self.entered = real, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.real, name)

    def embed_images(self, images):
        self.entered.set()
        self.release.wait(30)
        return self.real.embed_images(images)


def test_full_queue_answers_503_with_retry_after(predictor_and_index, query):
    predictor, index = predictor_and_index
    slow = BlockingPredictor(predictor)
    app = create_app(slow, index, workers=1, queue=1)

    async def scenario():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            first = asyncio.create_task(client.post("/search", files=upload(query)))
            second = asyncio.create_task(client.post("/search", files=upload(query)))  # waits in the queue
            await asyncio.to_thread(slow.entered.wait, 30)
            await asyncio.sleep(0.05)
            third = await client.post("/embed", files=upload(query))
            health = await client.get("/health")  # not an upload: never queued
            slow.release.set()
            return await first, await second, third, health

    first, second, third, health = asyncio.run(scenario())
    assert first.status_code == second.status_code == 200
    assert third.status_code == 503 and third.headers["retry-after"] == "1", third.text
    assert "2 image requests are in progress" in third.json()["detail"]
    assert health.status_code == 200 and health.json()["workers"] == 1 and health.json()["queue"] == 1


# -- one file, agreed limits -------------------------------------------------------------------------------

def test_two_files_are_refused(predictor_and_index, query, image_folder):
    predictor, index = predictor_and_index
    other = sorted(image_folder.glob("class_02/*.jpg"))[0].read_bytes()
    with TestClient(create_app(predictor, index)) as c:
        for route in ("/search", "/embed"):
            r = c.post(route, files=[("file", ("a.jpg", query, "image/jpeg")), ("file", ("b.jpg", other, "image/jpeg"))])
            assert r.status_code == 400 and "one image per request" in r.json()["detail"], r.text


def test_413_messages_quote_the_limit_health_reports(predictor_and_index):
    predictor, index = predictor_and_index
    with TestClient(create_app(predictor, index, max_upload_mb=0.05)) as c:
        limit = c.get("/health").json()["max_upload_bytes"]
        body_refused = c.post("/search", files=upload(b"\xff" * (200 * 1024)))  # by Content-Length
        file_refused = c.post("/embed", files=upload(b"\xff" * (60 * 1024)))  # within the framing allowance
    for r in (body_refused, file_refused):
        assert r.status_code == 413
        assert re.search(r"above the limit of (\d+) bytes", r.json()["detail"]).group(1) == str(limit), r.text


# -- Host header and API key ---------------------------------------------------------------------------------

def test_default_allowed_hosts():
    assert default_allowed_hosts("127.0.0.1") == ["localhost", "127.0.0.1", "::1"]
    assert default_allowed_hosts("::1") == ["localhost", "127.0.0.1", "::1"]
    assert default_allowed_hosts("127.0.0.2")[-1] == "127.0.0.2"
    assert default_allowed_hosts("0.0.0.0") is None and default_allowed_hosts("192.168.1.5") is None


def test_foreign_host_header_is_refused(predictor_and_index):
    """A DNS-rebinding page reaches 127.0.0.1 with its own name in Host: refused."""
    predictor, index = predictor_and_index
    app = create_app(predictor, index, allowed_hosts=default_allowed_hosts("127.0.0.1"))
    with TestClient(app, base_url="http://127.0.0.1:8000") as c:
        assert c.get("/health").status_code == 200
        for host in ("localhost:8000", "[::1]:8000", "127.0.0.1"):
            assert c.get("/health", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example:8000", "127.0.0.1.evil.example", ""):
            r = c.get("/health", headers={"Host": host})
            assert r.status_code == 400 and "is not served here" in r.json()["detail"], host
        assert c.get("/", headers={"Host": "evil.example"}).status_code == 400
    wild = create_app(predictor, index, allowed_hosts=["*.example.org"])
    with TestClient(wild, base_url="http://search.example.org") as c:
        assert c.get("/health").status_code == 200
        assert c.get("/health", headers={"Host": "example.com"}).status_code == 400


def test_api_key_is_required_from_every_client_by_default(predictor_and_index, query):
    """Issue 23's design risk: behind a same-host relay (ssh -L, a proxy adding no X-Forwarded-For) every
    client looks local, so loopback needs the key too unless the server opts out."""
    predictor, index = predictor_and_index
    app = create_app(predictor, index, api_key="s3cret")
    with TestClient(app) as remote:  # TestClient's client address is "testclient": not loopback
        r = remote.get("/health")
        assert r.status_code == 401 and "X-API-Key" in r.json()["detail"]
        assert remote.post("/search", files=upload(query), headers={"X-API-Key": "wrong"}).status_code == 401
        assert remote.get("/health", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert remote.post("/search", files=upload(query), headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert remote.get("/").status_code == 200 and remote.get("/static/app.js").status_code == 200  # page shell
        assert remote.get("/images/0").status_code == 401

    async def local(app, path):
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await client.get(path)

    for path in ("/health", "/images/0", "/openapi.json"):
        assert asyncio.run(local(app, path)).status_code == 401, path  # a relayed client looks local
    opted_out = create_app(predictor, index, api_key="s3cret", loopback_without_key=True)
    assert asyncio.run(local(opted_out, "/health")).status_code == 200
    schema = TestClient(app).get("/openapi.json", headers={"X-API-Key": "s3cret"}).json()
    assert "401" in schema["paths"]["/search"]["post"]["responses"]


# -- the contract in the schema -----------------------------------------------------------------------------

def test_openapi_documents_every_error_body(predictor_and_index):
    predictor, index = predictor_and_index
    with TestClient(create_app(predictor, index, allowed_hosts=["testserver"])) as c:
        schema = c.get("/openapi.json").json()
    for route in ("/search", "/embed"):
        responses = schema["paths"][route]["post"]["responses"]
        assert {"200", "400", "413", "415", "422", "503"} <= set(responses), route
        assert "Retry-After" in responses["503"]["headers"]
    assert schema["paths"]["/health"]["get"]["responses"].keys() >= {"200", "400"}
    models = schema["components"]["schemas"]
    assert models["ValidationErrorOut"]["properties"]["detail"]["type"] == "string"
    assert models["ErrorOut"]["properties"]["detail"]["type"] == "string"
    assert "HTTPValidationError" not in models  # FastAPI's default, whose detail is an array


# -- missing dependencies --------------------------------------------------------------------------------

BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"No module named {{name!r}} (blocked by the test)", name=name)
sys.meta_path.insert(0, Block())
"""


def test_serve_without_the_web_stack_names_the_extra(tmp_path):
    code = BLOCK.format(blocked={"fastapi", "uvicorn"}) + (
        "from deepmetric.cli import main\n"
        f"sys.exit(main(['serve', '--checkpoint', {str(tmp_path / 'm.onnx')!r}, '--index', 'x.index']))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "fastapi, uvicorn" in lines[0] and "pip install 'deepmetric[onnx]'" in lines[0], r.stderr
