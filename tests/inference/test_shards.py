"""``deepmetric embed`` into Parquet chunks: two processes under torchrun give bit for bit the output of
one process, an interrupted run resumes chunk by chunk, and a folder that does not hang together (a
chunk of another model, of another dimension or dtype, a chunk the manifest lists but that is missing)
is one line with exit code 2."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from deepmetric.cli import main
from deepmetric.inference.embeddings_io import load_embeddings
from deepmetric.inference.predictor import Predictor
from deepmetric.inference.shards import META_KEY, ShardSet, write_chunk, write_folder


def embed(checkpoint_dir, image_folder, output, *extra):
    return main(["embed", "--checkpoint", str(checkpoint_dir), "--input", str(image_folder), "--output", str(output),
                 "--chunk-size", "6", "--batch-size", "4", "--no-progress", *extra])


def chunk_metadata(path):
    import pyarrow.parquet as pq

    return json.loads(pq.read_schema(path).metadata[META_KEY])


def test_two_ranks_equal_one_process(checkpoint_dir, image_folder, tmp_path, capsys):
    """Issue 25: the union of the shards of ``torchrun --nproc-per-node 2 -m deepmetric embed`` is, in
    manifest order, bit for bit the ``.npz`` (and the Parquet folder) that one process writes."""
    assert embed(checkpoint_dir, image_folder, tmp_path / "one.npz") == 0
    assert embed(checkpoint_dir, image_folder, f"{tmp_path / 'one'}/") == 0  # a trailing slash: a folder
    assert "in 4 Parquet chunks by 1 process(es)" in capsys.readouterr().out
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "deepmetric",
           "embed", "--checkpoint", str(checkpoint_dir), "--input", str(image_folder), "--output", "two/",
           "--chunk-size", "6", "--batch-size", "4", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("wrote ") == 1 and "4 embedded now" in run.stdout, "rank 0 alone reports"
    two = tmp_path / "two"
    manifest = json.loads((two / "manifest.json").read_text())
    assert [c["file"] for c in manifest["chunks"]] == [
        "part-00000-000000.parquet", "part-00001-000001.parquet", "part-00000-000002.parquet",
        "part-00001-000003.parquet"], "chunk i by rank i % 2, listed in input order"
    assert [c["rows"] for c in manifest["chunks"]] == [6, 6, 6, 2] and manifest["count"] == 20
    reference = load_embeddings(tmp_path / "one.npz")
    for folder in (tmp_path / "one", two):
        got = load_embeddings(folder)
        assert np.array_equal(got.embeddings.vectors.numpy(), reference.embeddings.vectors.numpy())  # bit for bit
        assert np.array_equal(got.embeddings.labels, reference.embeddings.labels)
        assert got.embeddings.paths == reference.embeddings.paths and got.class_names == reference.class_names
        assert got.meta == {k: reference.meta[k] for k in got.meta}
    meta = chunk_metadata(two / "part-00001-000003.parquet")
    fingerprint = Predictor.from_checkpoint(checkpoint_dir).fingerprint
    assert (meta["model"], meta["dim"], meta["dtype"], meta["l2_normalized"], meta["rank"], meta["chunk"]) == \
        (fingerprint, 16, "float32", True, 1, 3) and meta["deepmetric_version"]
    import pyarrow.parquet as pq

    table = pq.read_table(two / "part-00000-000000.parquet")
    assert str(table.schema.field("vector").type) == "fixed_size_list<element: float>[16]"
    assert table.column("class_name").to_pylist()[0] == "class_00" and table.column("label").type == "int64"


def test_interrupted_sharded_embed_resumes(checkpoint_dir, image_folder, tmp_path, capsys, monkeypatch):
    """A run that died after some chunks (here: its manifest and one chunk deleted, and one chunk cut short
    as a writer without atomic renames would leave it) embeds only the chunks that are not whole."""
    out = tmp_path / "feats"
    assert embed(checkpoint_dir, image_folder, f"{out}/") == 0
    before = load_embeddings(out)
    (out / "manifest.json").unlink()
    (out / "part-00000-000002.parquet").unlink()
    cut = out / "part-00000-000001.parquet"
    cut.write_bytes(cut.read_bytes()[:200])
    capsys.readouterr()
    with pytest.raises(Exception, match="no manifest.json beside its 3 chunk files"):
        load_embeddings(out)
    embedded = []
    real = Predictor.iter_embeddings
    monkeypatch.setattr(Predictor, "iter_embeddings",
                        lambda self, paths, *a, **k: (embedded.append(len(paths)), real(self, paths, *a, **k))[1])
    assert embed(checkpoint_dir, image_folder, f"{out}/") == 0
    assert embedded == [6, 6], "chunks 1 (cut short) and 2 (missing) only"
    assert "2 embedded now and 2 found done" in capsys.readouterr().out
    after = load_embeddings(out)
    assert np.array_equal(after.embeddings.vectors.numpy(), before.embeddings.vectors.numpy())
    assert after.embeddings.paths == before.embeddings.paths
    embedded.clear()
    assert embed(checkpoint_dir, image_folder, f"{out}/") == 0, "a finished run reruns as a no-op"
    assert embedded == [] and sorted(p.name for p in out.iterdir()) == \
        ["manifest.json", *(f"part-00000-00000{i}.parquet" for i in range(4))], "no temporary file left"


def test_another_chunk_size_or_dtype_starts_over(checkpoint_dir, image_folder, tmp_path, capsys):
    out = tmp_path / "f"
    assert embed(checkpoint_dir, image_folder, f"{out}/") == 0
    assert main(["embed", "--checkpoint", str(checkpoint_dir), "--input", str(image_folder), "--output", str(out),
                 "--format", "parquet", "--chunk-size", "8", "--dtype", "float16", "--no-progress"]) == 0
    assert "3 embedded now and 0 found done" in capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.parquet")) == [f"part-00000-00000{i}.parquet" for i in range(3)]
    shards = ShardSet(out)
    assert (shards.dtype, shards.count, [c.rows for c in shards.chunks]) == ("float16", 20, [8, 8, 4])


def test_output_and_format_must_agree(checkpoint_dir, image_folder, tmp_path, capsys, monkeypatch):
    (tmp_path / "d").mkdir()
    assert embed(checkpoint_dir, image_folder, tmp_path / "d", "--format", "npz") == 2
    assert "a folder, but --format npz writes one file" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert embed(checkpoint_dir, image_folder, tmp_path / "x.npz") == 2
    err = capsys.readouterr().err
    assert "2 processes (torchrun) write Parquet chunks into a folder" in err and "\n" not in err.strip()


# -- a folder that does not hang together --------------------------------------------------------------

def synthetic(folder, n=12, dim=8, per=4, model="model-a", dtype="float32"):
    rng = np.random.default_rng(0)
    blocks = [(rng.standard_normal((min(per, n - s), dim)).astype(np.float32), np.arange(s, min(s + per, n)) % 3,
               [f"/photos/{i}.jpg" for i in range(s, min(s + per, n))]) for s in range(0, n, per)]
    write_folder(folder, blocks, model=model, dtype=dtype, class_names=["mug", "cup", "pot"])
    return blocks


def replace_chunk(folder, chunk, dim=8, model="model-a", dtype="float32"):
    path = folder / f"part-00000-{chunk:06d}.parquet"
    meta = chunk_metadata(path)
    write_chunk(path, np.ones((4, dim), dtype), np.zeros(4, np.int64), [f"/other/{i}.jpg" for i in range(4)], [],
                {**meta, "model": model, "dim": dim, "dtype": dtype})


@pytest.mark.parametrize("case", ["other_model", "dim_mismatch", "missing_chunk", "mixed_dtypes", "no_manifest",
                                  "rows_differ"])
def test_bad_folder_is_one_line_and_exit_2(tmp_path, capsys, case):
    folder = tmp_path / "emb"
    synthetic(folder)
    if case == "other_model":
        replace_chunk(folder, 1, model="model-b")
    elif case == "dim_mismatch":
        replace_chunk(folder, 2, dim=12)
    elif case == "missing_chunk":
        (folder / "part-00000-000001.parquet").unlink()
    elif case == "mixed_dtypes":
        replace_chunk(folder, 1, dtype="float16")
    elif case == "no_manifest":
        (folder / "manifest.json").unlink()
    elif case == "rows_differ":
        write_chunk(folder / "part-00000-000000.parquet", np.ones((3, 8), np.float32), np.zeros(3), ["a", "b", "c"],
                    [], chunk_metadata(folder / "part-00000-000000.parquet"))
    assert main(["index", "build", "--embeddings", str(folder), "--output", str(tmp_path / "g.index")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("deepmetric: error: ") and "\n" not in err
    expect = {"other_model": "part-00000-000001.parquet: embedded by model model-b, but the manifest (and "
                             "part-00000-000000.parquet) by model model-a",
              "dim_mismatch": "part-00000-000002.parquet: 12-d vectors, the manifest says 8-d",
              "missing_chunk": "lists part-00000-000001.parquet, which is missing (1 of 3 chunks missing)",
              "mixed_dtypes": "part-00000-000001.parquet: float16 vectors among float32 ones (mixed dtypes",
              "no_manifest": "no manifest.json beside its 3 chunk files: the embed did not finish",
              "rows_differ": "part-00000-000000.parquet: 3 rows, the manifest says 4"}[case]
    assert expect in err
    assert not (tmp_path / "g.index").exists()


def test_folder_reads_back_and_builds(tmp_path, capsys):
    folder = tmp_path / "emb"
    blocks = synthetic(folder, n=10, per=4, dtype="float16")
    f = load_embeddings(folder)
    assert np.array_equal(f.embeddings.vectors.numpy(), np.concatenate([b[0] for b in blocks]).astype(np.float16).astype(np.float32))
    assert f.embeddings.paths == [p for b in blocks for p in b[2]] and f.class_names == ["mug", "cup", "pot"]
    assert f.meta["model"] == "model-a" and f.meta["dtype"] == "float16"
    index = tmp_path / "g.index"
    assert main(["index", "build", "--embeddings", str(folder), "--output", str(index), "--backend", "faiss-flat"]) == 0
    assert "faiss-flat cosine index of 10 vectors" in capsys.readouterr().out
    from deepmetric.inference.index import SearchIndex

    loaded = SearchIndex.load(index)
    hit = loaded.search(f.embeddings.vectors[7].numpy(), k=1)[0][0]
    assert (hit.id, hit.path, hit.label_name) == (7, "/photos/7.jpg", "cup")
    assert loaded.source["model"] == "model-a"
