"""The index file (format 2, a safetensors container): a standard file, written with the umask's mode, and a
loader that meets every malformed file (truncated, flipped, crafted header or arrays, issue 13's
reproductions, format 1) with IndexFileError, never allocating more than the file's size (tracemalloc)."""
from __future__ import annotations

import json
import os
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from deepmetric.inference import EmbeddingSet
from deepmetric.inference.index import IndexFileError, SearchIndex

N, D = 48, 8
SLACK = 128 * 1024  # a failed load's own objects: exception, traceback, JSON parser state, CRC buffers


def make(kind: str) -> SearchIndex:
    rng = np.random.default_rng(1)
    x = rng.standard_normal((N, D)).astype(np.float32)
    labels = rng.integers(0, 6, N)
    es = EmbeddingSet(torch.from_numpy(x), labels, paths=[f"/g/ü{i}.jpg" for i in range(N)])
    backend, params = {"exact": ("exact", {}), "centroids": ("exact", {}), "hnsw": ("faiss-hnsw", {"M": 4}),
                       "ivfpq": ("faiss-ivfpq", {"nlist": 2, "m": 2, "nbits": 2, "refine": 4}),
                       "ivf": ("faiss-ivf", {"nlist": 3})}[kind]
    index = SearchIndex.build(es, backend=backend, centroids=kind == "centroids",
                              class_names=[f"c{i}" for i in range(6)], **params)
    index.remove(ids=[3, 4])  # ids with a gap: next_id is not the count
    return index


KINDS = ("exact", "centroids", "hnsw", "ivfpq", "ivf")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("files")
    return {kind: make(kind).save(folder / f"{kind}.index") for kind in KINDS}


def load_measured(path):
    """(the loaded index or the IndexFileError, peak bytes traced during the load)."""
    tracemalloc.start()
    try:
        return SearchIndex.load(path), tracemalloc.get_traced_memory()[1]
    except IndexFileError as e:
        return e, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def same_index(a: SearchIndex, b: SearchIndex) -> bool:
    aa, bb = a.arrays(), b.arrays()
    return a.info() == b.info() and a.class_names == b.class_names and aa.keys() == bb.keys() and \
        all(np.array_equal(aa[k], bb[k]) for k in aa)


def read(path):
    with safe_open(str(path), "numpy") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def rewrite(path, out, edit_header=None, edit_arrays=None):
    """A crafted file: the header and arrays changed as an attacker would, every checksum recomputed."""
    meta, arrays = read(path)
    if edit_arrays:
        edit_arrays(arrays)
    h = json.loads(meta["header"])
    h["crc32"] = {k: zlib.crc32(np.ascontiguousarray(v).tobytes()) for k, v in arrays.items()}
    if edit_header:
        edit_header(h)
    text = h if isinstance(h, str) else json.dumps(h)
    save_file(arrays, str(out), metadata={**meta, "header": text, "header_crc32": str(zlib.crc32(text.encode()))})
    return out


def raw_file(out, header: dict, data: bytes = b"", length=None):
    head = json.dumps(header).encode()
    out.write_bytes(struct.pack("<Q", len(head) if length is None else length) + head + data)
    return out


def assert_refused(path, match=None):
    result, peak = load_measured(path)
    assert isinstance(result, IndexFileError), f"{path.name} loaded"
    message = str(result)
    assert message.startswith(str(path)) and "\n" not in message
    assert peak <= os.path.getsize(path) + SLACK, f"{peak} bytes traced for a {os.path.getsize(path)}-byte file"
    if match:
        assert match in message, message
    return message


# -- the format ------------------------------------------------------------------------------------

def test_file_is_plain_safetensors_with_a_checked_header(saved):
    arrays = load_file(str(saved["hnsw"]))  # any safetensors reader
    meta, _ = read(saved["hnsw"])
    header = json.loads(meta["header"])
    assert meta["format"] == "deepmetric-index" and meta["version"] == "2"
    assert meta["header_crc32"] == str(zlib.crc32(meta["header"].encode()))
    assert header["count"] == N - 2 and header["next_id"] == N and header["backend"] == "faiss-hnsw"
    assert arrays["ids"].tolist() == [i for i in range(N) if i not in (3, 4)]
    assert {"vectors", "hnsw_levels", "hnsw_offsets", "hnsw_neighbors", "hnsw_entry"} <= set(arrays)
    assert set(header["crc32"]) == set(arrays)


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_keeps_everything(saved, kind):
    loaded = SearchIndex.load(saved[kind])
    assert same_index(loaded, SearchIndex.load(loaded.save(saved[kind].with_suffix(".again"))))
    assert loaded.paths[0] == "/g/ü0.jpg" and loaded.class_names == [f"c{i}" for i in range(6)]


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_written_files_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = make("exact").save(tmp_path / "g.index")
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_format_1_is_refused_with_the_rebuild_command(tmp_path):
    header = json.dumps({"source": {"embeddings": "runs/features.npz"}, "sections": []}).encode()
    old = tmp_path / "old.index"
    old.write_bytes(b"DMINDEX\0" + struct.pack("<IQ", 1, len(header)) + header)
    message = assert_refused(old, "format 1")
    assert "deepmetric index build --embeddings runs/features.npz --output" in message
    # issue 13's crafted format-1 headers: refused by the magic, before their sizes are read
    old.write_bytes(b"DMINDEX\0" + struct.pack("<IQ", 1, 1 << 62) + b"{}")
    assert "FEATURES.npz" in assert_refused(old, "format 1")


# -- issue 13, item 3: the reproductions, in format 2 ---------------------------------------------

def test_issue_13_reproductions(saved, tmp_path):
    f = tmp_path / "crafted.index"
    meta, _ = read(saved["exact"])
    # a negative size, and two sections of +4e9 / -4e9 bytes (once allocated 4 GB before a checksum)
    assert_refused(raw_file(f, {"__metadata__": meta, "ids": {"dtype": "I64", "shape": [1], "data_offsets": [0, -8]}},
                            b"\0" * 8))
    assert_refused(raw_file(f, {"__metadata__": meta,
                                "a": {"dtype": "U8", "shape": [4_000_000_000], "data_offsets": [0, 4_000_000_000]},
                                "b": {"dtype": "U8", "shape": [4_000_000_000], "data_offsets": [4_000_000_000, 0]}}))
    assert_refused(raw_file(f, {"__metadata__": meta,
                                "a": {"dtype": "F32", "shape": [1 << 61, 1 << 61], "data_offsets": [0, 16]}},
                            b"\0" * 16))
    # a header length of 2^62
    assert_refused(raw_file(f, {"__metadata__": meta}, length=1 << 62), "truncated")
    # an array without a checksum
    assert_refused(rewrite(saved["exact"], f, lambda h: h["crc32"].pop("labels")), "checksum table")


# -- crafted headers and arrays (checksums recomputed, as an attacker would) ----------------------

def _set(key, value):
    return lambda h: h.__setitem__(key, value)


def _param(key, value):
    return lambda h: h["params"].__setitem__(key, value)


HEADER_EDITS = {
    "dim zero": _set("dim", 0), "dim huge": _set("dim", 1 << 62), "dim text": _set("dim", "8"),
    "dim bool": _set("dim", True), "dim float": _set("dim", 8.0), "dim other": _set("dim", 9),
    "count huge": _set("count", 1 << 50), "count negative": _set("count", -1), "count off": _set("count", N - 1),
    "count missing": lambda h: h.pop("count"), "next_id low": _set("next_id", 3), "next_id huge": _set("next_id", 1 << 70),
    "backend unknown": _set("backend", "annoy"), "backend number": _set("backend", 3),
    "backend other": lambda h: h.update(backend="exact" if h["backend"] == "faiss-hnsw" else "faiss-hnsw"), "metric unknown": _set("metric", "dot"),
    "mode unknown": _set("mode", "both"),
    "mode other": lambda h: h.update(mode="items" if h["mode"] == "centroids" else "centroids"),
    "params list": _set("params", []), "param unknown": _param("bogus", 1), "param clash": _param("dim", 3),
    "param negative": _param("query_chunk", -4), "param huge": _param("query_chunk", 1 << 60),
    "param text": _param("query_chunk", "many"),
    "class count text": _set("class_count", "6"), "class count off": _set("class_count", 5),
    "class count huge": _set("class_count", 1 << 60),
    "crc table text": _set("crc32", "x"), "crc negative": lambda h: h["crc32"].update(ids=-1),
    "crc huge": lambda h: h["crc32"].update(ids=1 << 40), "crc extra": lambda h: h["crc32"].update(extra=1),
    "source text": _set("source", "x"), "header emptied": lambda h: h.clear() or h.update(x=[1]),
}
FAISS_HEADER_EDITS = {
    "hnsw": {"M huge": _param("M", 10**6), "M other": _param("M", 5), "ef_search huge": _param("ef_search", 1 << 60)},
    "ivfpq": {"nlist other": _param("nlist", 7), "nlist huge": _param("nlist", 1 << 40), "m zero": _param("m", 0),
              "m other": _param("m", 3), "nbits huge": _param("nbits", 40), "refine off": _param("refine", 0),
              "nprobe bool": _param("nprobe", True)},
}


def _arr(name, fn):
    def edit(arrays):
        arrays[name] = fn(arrays[name].copy())
    return edit


def _poke(name, pos, value):
    def fn(a):
        a.reshape(-1)[pos] = value
        return a
    return _arr(name, fn)


ARRAY_EDITS = {
    "ids descending": _arr("ids", lambda a: a[::-1].copy()), "ids repeated": _poke("ids", 1, 0),
    "ids negative": _poke("ids", 0, -7), "ids past next_id": _poke("ids", -1, 10**9),
    "labels below -1": _poke("labels", 0, -5), "offsets backwards": _poke("path_offsets", 2, 0),
    "offsets past blob": _poke("path_offsets", -1, 1 << 60), "offsets not from 0": _poke("path_offsets", 0, 1),
    "class offsets backwards": _poke("class_offsets", 3, 0), "class offsets past": _poke("class_offsets", -1, 99),
    "ids float": _arr("ids", lambda a: a.astype(np.float32)), "vectors wider": _arr("vectors", lambda a: np.pad(a, ((0, 0), (0, 1)))),
    "vectors shorter": _arr("vectors", lambda a: a[:-1].copy()), "labels 2-d": _arr("labels", lambda a: a[:, None].copy()),
    "array missing": lambda arrays: arrays.pop("labels"), "array extra": lambda arrays: arrays.update(extra=np.zeros(3)),
}
FAISS_ARRAY_EDITS = {
    "centroids": {"labels repeated": _poke("labels", 1, 0), "no members": _poke("counts", 0, 0),
                  "negative label": _poke("labels", 0, -1)},
    "hnsw": {"level zero": _poke("hnsw_levels", 0, 0), "level deep": _poke("hnsw_levels", 0, 99),
             "link past the end": _poke("hnsw_neighbors", 0, N), "link below -1": _poke("hnsw_neighbors", 0, -2),
             "offsets shifted": _poke("hnsw_offsets", 1, 3), "entry outside": _poke("hnsw_entry", 0, N),
             "top level wrong": _poke("hnsw_entry", 1, 7), "offsets past links": _poke("hnsw_offsets", -1, 1 << 40),
             "link to a missing level": None},
    "ivfpq": {"list outside": _poke("ivf_lists", 0, 2), "list negative": _poke("ivf_lists", 0, -1),
              "codes wider": _arr("pq_codes", lambda a: np.pad(a, ((0, 0), (0, 1)))),
              "codebook short": _arr("pq_centroids", lambda a: a[:, :2].copy())},
    "ivf": {"list huge": _poke("ivf_lists", 5, 1 << 40)},
}


def _link_to_missing_level(arrays):
    """A level-1 link of the entry point to a node that has only level 0 (FAISS would read past its links)."""
    levels, offsets, links = arrays["hnsw_levels"], arrays["hnsw_offsets"], arrays["hnsw_neighbors"].copy()
    entry = int(arrays["hnsw_entry"][0])
    low = int(np.flatnonzero(levels == 1)[0])
    links[offsets[entry] + 8] = low  # M=4: level 0 holds 8 links, level 1 starts at slot 8
    arrays["hnsw_neighbors"] = links


FAISS_ARRAY_EDITS["hnsw"]["link to a missing level"] = _link_to_missing_level


def crafted_cases():
    for kind in KINDS:
        for name, edit in HEADER_EDITS.items():
            yield kind, name, edit, None
        for name, edit in FAISS_HEADER_EDITS.get(kind, {}).items():
            yield kind, name, edit, None
        for name, edit in {**ARRAY_EDITS, **FAISS_ARRAY_EDITS.get(kind, {})}.items():
            yield kind, name, None, edit


def test_crafted_files_are_refused(saved, tmp_path):
    cases = list(crafted_cases())
    assert len(cases) > 200
    start = time.perf_counter()
    for kind, name, edit_header, edit_arrays in cases:
        out = rewrite(saved[kind], tmp_path / f"{kind}-{name.replace(' ', '_')}.index", edit_header, edit_arrays)
        try:
            assert_refused(out)
        except AssertionError as e:
            raise AssertionError(f"{kind} / {name}: {e}") from None
    assert time.perf_counter() - start < 15


def test_crafted_metadata_is_refused(saved, tmp_path):
    meta, arrays = read(saved["exact"])
    deep = '{"source": ' + "[" * 100_000 + "]" * 100_000 + "}"  # json.loads: RecursionError
    edits = {"format": {"format": "other"}, "version newer": {"version": "3"}, "version text": {"version": "two"},
             "no header": {"header": ""}, "header crc": {"header_crc32": "1"},
             "header not json": {"header": "{not json"}, "header a list": {"header": "[1, 2]"}, "header deep": {"header": deep}}
    for name, edit in edits.items():
        meta2 = {**meta, **edit}
        if "header" in edit:
            meta2["header_crc32"] = str(zlib.crc32(edit["header"].encode()))
        out = tmp_path / f"{name.replace(' ', '_')}.index"
        save_file(arrays, str(out), metadata=meta2)
        message = assert_refused(out)
        assert {"format": "not a deepmetric index", "version newer": "newer than this deepmetric reads",
                "header crc": "header fails its checksum"}.get(name, "") in message, (name, message)
    save_file(arrays, str(tmp_path / "plain.safetensors"))  # a model's weights, say: no metadata at all
    assert_refused(tmp_path / "plain.safetensors", "not a deepmetric index")


def test_the_crafting_helper_alone_keeps_a_valid_file(saved, tmp_path):
    """The crafted cases above are refused for their edit, not for the rewriting."""
    for kind in KINDS:
        out = rewrite(saved[kind], tmp_path / f"{kind}.index")
        assert same_index(SearchIndex.load(out), SearchIndex.load(saved[kind]))


# -- fuzz: truncations and byte flips --------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_fuzz_truncations_and_byte_flips(saved, tmp_path, kind):
    rng = np.random.default_rng(zlib.crc32(kind.encode()))  # seeded per file: the same cases every run
    blob = saved[kind].read_bytes()
    original = SearchIndex.load(saved[kind])
    out = tmp_path / "fuzzed.index"
    cases = [blob[:int(n)] for n in rng.integers(0, len(blob), 40)]
    head_len = 8 + struct.unpack("<Q", blob[:8])[0]
    for _ in range(160):  # half in the header (where parsing happens), half anywhere
        b = bytearray(blob)
        pos = int(rng.integers(0, head_len if len(cases) % 2 else len(blob)))
        b[pos] ^= int(rng.integers(1, 256))
        cases.append(bytes(b))
    benign = 0
    for case in cases:
        out.write_bytes(case)
        result, peak = load_measured(out)
        assert peak <= len(case) + SLACK, f"{peak} bytes traced for a {len(case)}-byte file"
        if isinstance(result, SearchIndex):  # only a flip that JSON ignores (padding space -> tab) may load
            assert same_index(result, original)
            benign += 1
        else:
            assert str(result).startswith(str(out)) and "\n" not in str(result)
    assert benign <= 4
