"""``deepmetric index build`` streamed a block at a time: the same index as an in-memory build, IVF-PQ
lists on disk, an ``.npz`` read in slices, and a build whose memory stays bounded on a collection
several times its memory cap (a subprocess with an RSS check)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

from deepmetric.cli import main
from deepmetric.inference import streaming
from deepmetric.inference.blocks import sample_vectors
from deepmetric.inference.embeddings_io import NpzSource, load_embeddings, open_embeddings
from deepmetric.inference.index import IndexFileError, SearchIndex
from deepmetric.inference.shards import write_folder

D = 16


def features(path, n=3000, dim=D, seed=0, compressed=False):
    rng = np.random.default_rng(seed)
    save = np.savez_compressed if compressed else np.savez
    save(path, vectors=rng.standard_normal((n, dim)).astype(np.float32), labels=rng.integers(0, 5, n),
         paths=np.array([f"/x/{i}.jpg" for i in range(n)]), class_names=np.array(list("abcde")),
         meta=np.array(json.dumps({"model": "m"})))
    return path


def clustered_folder(folder, n, dim, per, seed=0):
    """A Parquet folder as ``embed`` writes it, of ``n`` clustered vectors in chunks of ``per`` (made one chunk
    at a time)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((64, dim)).astype(np.float32)

    def blocks():
        for s in range(0, n, per):
            m = min(per, n - s)
            c = rng.integers(0, 64, m)
            yield centres[c] + 0.3 * rng.standard_normal((m, dim), dtype=np.float32), c, \
                [f"/catalogue/{i:09d}.jpg" for i in range(s, s + m)]

    write_folder(folder, blocks(), model="synthetic", class_names=[f"c{i}" for i in range(64)])
    return folder


@pytest.mark.parametrize("backend", ["exact", "faiss-flat", "faiss-ivf", "faiss-ivfpq", "faiss-hnsw"])
@pytest.mark.parametrize("metric", ["cosine", "squared_euclidean"])
def test_streaming_build_is_the_in_memory_build(tmp_path, backend, metric):
    """In blocks of 1000 rows (and a training sample of every vector) the index is array for array the
    one ``SearchIndex.build`` makes from the whole collection."""
    f = load_embeddings(features(tmp_path / "f.npz"))
    whole = SearchIndex.build(f.embeddings, backend=backend, metric=metric, class_names=f.class_names)
    streamed = streaming.build_index(open_embeddings(tmp_path / "f.npz"), tmp_path / "s.index", backend=backend,
                                     metric=metric, class_names=f.class_names, rows=1000)
    a, b = whole.arrays(), streamed.arrays()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert whole.info()["params"] == streamed.info()["params"] and streamed.changes == 1


def test_npz_is_read_in_slices(tmp_path):
    path = features(tmp_path / "f.npz", n=2500)
    src = NpzSource(path)
    assert src._vectors.offset is not None, "stored uncompressed: read from the file, row slices only"
    blocks = list(src.blocks(1000))
    assert [len(b.vectors) for b in blocks] == [1000, 1000, 500]
    whole = load_embeddings(path)
    assert np.array_equal(np.concatenate([b.vectors for b in blocks]), whole.embeddings.vectors.numpy())
    assert [p for b in blocks for p in b.paths] == whole.embeddings.paths
    packed = NpzSource(features(tmp_path / "c.npz", n=2500, compressed=True))  # compressed: read whole
    assert np.array_equal(np.concatenate([b.vectors for b in packed.blocks(1000, vectors_only=True)]),
                          whole.embeddings.vectors.numpy())
    truncated = tmp_path / "t.npz"
    truncated.write_bytes(path.read_bytes()[:100_000])
    with pytest.raises(Exception, match="t.npz: not a readable embeddings file|t.npz: truncated"):
        NpzSource(truncated)


def test_training_sample_is_drawn_evenly_across_chunks(tmp_path):
    folder = clustered_folder(tmp_path / "c", n=1000, dim=4, per=100)
    src = open_embeddings(folder)
    allv = np.concatenate([b.vectors for b in src.blocks()])
    assert np.array_equal(sample_vectors(src, 10, rows=64), allv[np.arange(0, 1000, 100)])
    assert np.array_equal(sample_vectors(src, 5000), allv), "a sample larger than the collection: all of it, in order"


def test_ivfpq_lists_on_disk(tmp_path, capsys):
    """``--on-disk``: the codes go to a sidecar beside the index, searched through FAISS's on-disk lists,
    with the same hits as the same build in memory; a rebuild replaces the sidecar; the index cannot
    change in place, and a missing or foreign sidecar is one line."""
    folder = clustered_folder(tmp_path / "c", n=6000, dim=D, per=1000)
    common = ["index", "build", "--embeddings", str(folder), "--backend", "faiss-ivfpq", "--train-size", "2000",
              "--param", "nlist=16", "--param", "m=4", "--param", "nbits=8"]
    assert main([*common, "--output", str(tmp_path / "mem.index"), "--on-disk", "no"]) == 0
    assert main([*common, "--output", str(tmp_path / "disk.index"), "--on-disk"]) == 0
    out = capsys.readouterr().out
    sidecars = sorted(tmp_path.glob("disk.index.*.ivfdata"))
    assert len(sidecars) == 1 and f"lists on disk in {sidecars[0].name}" in out
    assert sidecars[0].stat().st_size == 64 + 6000 * (4 + 8)
    mem, disk = SearchIndex.load(tmp_path / "mem.index"), SearchIndex.load(tmp_path / "disk.index")
    assert disk.info()["params"]["on_disk"] == 1 and len(disk) == 6000
    assert (tmp_path / "disk.index").stat().st_size < (tmp_path / "mem.index").stat().st_size - 6000 * 4
    queries = load_embeddings(folder).embeddings.vectors.numpy()[::300]
    for a, b in zip(mem.search_arrays(queries, k=10), disk.search_arrays(queries, k=10)):
        assert np.array_equal(a, b)
    hit = disk.search(queries[0], k=1)[0][0]
    assert hit.path == f"/catalogue/{hit.id:09d}.jpg" and hit.label_name == f"c{hit.label}"

    assert main([*common, "--output", str(tmp_path / "disk.index"), "--on-disk"]) == 0
    again = sorted(tmp_path.glob("disk.index.*.ivfdata"))
    assert len(again) == 1 and again != sidecars, "the rebuild's sidecar replaces the old one"
    np.savez(tmp_path / "more.npz", vectors=np.ones((1, D), np.float32), labels=np.zeros(1, np.int64),
             paths=np.array(["/n.jpg"]), meta=np.array(json.dumps({"model": "synthetic"})))
    capsys.readouterr()
    assert main(["index", "add", "--index", str(tmp_path / "disk.index"), "--embeddings", str(tmp_path / "more.npz")]) == 2
    assert "on-disk lists cannot change in place" in capsys.readouterr().err
    assert main(["index", "remove", "--index", str(tmp_path / "disk.index"), "--ids", "3"]) == 2
    assert "on-disk lists cannot change in place" in capsys.readouterr().err

    again[0].rename(tmp_path / "elsewhere.ivfdata")
    with pytest.raises(IndexFileError, match=r"disk\.index\.[0-9a-f]{32}\.ivfdata: missing; an index built with --on-disk"):
        SearchIndex.load(tmp_path / "disk.index")
    sidecars_of_mem = tmp_path / again[0].name
    (tmp_path / "elsewhere.ivfdata").write_bytes(b"\0" * 100)
    (tmp_path / "elsewhere.ivfdata").rename(sidecars_of_mem)
    with pytest.raises(IndexFileError, match="ivfdata: not the on-disk lists of this index"):
        SearchIndex.load(tmp_path / "disk.index")


def test_on_disk_needs_ivfpq(tmp_path, capsys):
    path = features(tmp_path / "f.npz", n=100)
    assert main(["index", "build", "--embeddings", str(path), "--output", str(tmp_path / "x.index"),
                 "--backend", "faiss-ivf", "--on-disk"]) == 2
    assert "--on-disk lists are for --backend faiss-ivfpq, not faiss-ivf" in capsys.readouterr().err


def test_ivfpq_files_before_on_disk_still_load(tmp_path):
    """A file written before the ``on_disk`` parameter existed (its params lack it) loads as in memory."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    f = load_embeddings(features(tmp_path / "f.npz", n=500))
    index = SearchIndex.build(f.embeddings, backend="faiss-ivfpq", nlist=4, m=4, nbits=4)
    index.save(tmp_path / "new.index")
    with safe_open(str(tmp_path / "new.index"), framework="numpy") as fh:
        meta, arrays = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    header = json.loads(meta["header"])
    del header["params"]["on_disk"]
    text = json.dumps(header)
    save_file(arrays, str(tmp_path / "old.index"), {**meta, "header": text, "header_crc32": str(zlib.crc32(text.encode()))})
    old = SearchIndex.load(tmp_path / "old.index")
    assert old.info()["params"]["on_disk"] == 0
    q = f.embeddings.vectors.numpy()[:5]
    assert np.array_equal(old.search_arrays(q, 5)[1], index.search_arrays(q, 5)[1])


RSS_CHILD = textwrap.dedent("""
    import sys
    from deepmetric.cli import main

    def rss(key):
        return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) * 1024

    small, large, out, args = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    # the same build on a small collection first: the libraries' one-time costs (code, thread pools, caches)
    assert main(["index", "build", "--embeddings", small, "--output", out + ".warm", *args]) == 0
    try:
        open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) starts again from here
    except OSError:
        pass  # then the peak is since the start: an overestimate
    base = rss("VmRSS:")
    assert main(["index", "build", "--embeddings", large, "--output", out, *args]) == 0
    print(rss("VmHWM:") - base)
""")


@pytest.mark.parametrize("on_disk", ["no", "yes"])
def test_streaming_build_memory_is_bounded(tmp_path_factory, on_disk):
    """Issue 25: ``index build`` of 150k x 256 float32 vectors (154 MB, in 1,250-row chunks) peaks under a
    50 MB cap over its starting memory (a third of the vectors), with the lists in memory and on disk, in a
    fresh process that has run the same build on a small collection first (the libraries' one-time
    costs). What grows with the collection is the index: its metadata, ~48 bytes a vector (id, label,
    path), and in memory the lists too (code and row id, 32 bytes a vector here)."""
    n, dim = 150_000, 256
    data = tmp_path_factory.getbasetemp() / "bounded"
    if not (data / "large" / "manifest.json").exists():  # made once for both cases
        clustered_folder(data / "large", n=n, dim=dim, per=1250)
        clustered_folder(data / "small", n=3000, dim=dim, per=250, seed=1)
    out = tmp_path_factory.mktemp("out") / "g.index"
    args = ["--backend", "faiss-ivfpq", "--train-size", "5000", "--param", "nlist=64", "--param", "m=32",
            "--param", "nbits=6", "--on-disk", on_disk]
    run = subprocess.run([sys.executable, "-c", RSS_CHILD, str(data / "small"), str(data / "large"), str(out), *args],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    growth = int(run.stdout.strip().splitlines()[-1])
    collection, cap = n * dim * 4, 50_000_000
    print(f"peak RSS growth, --on-disk {on_disk}: {growth / 1e6:.0f} MB for {collection / 1e6:.0f} MB of vectors")
    assert collection > 3 * cap and growth < cap
    index = SearchIndex.load(out)
    assert len(index) == n and index.info()["params"]["on_disk"] == (on_disk == "yes")
    if on_disk == "yes":
        assert Path(index.backend.sidecar).stat().st_size == 64 + n * (32 * 6 // 8 + 8)  # m x nbits bits, a row id
