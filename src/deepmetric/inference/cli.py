"""``deepmetric embed | index | search | export``: thin handlers over predictor, index and export.

``register(subparsers)`` adds the commands to the main parser (``deepmetric.cli``); each handler
returns an exit code and raises :class:`~deepmetric.core.errors.UserError` for bad input. An output
that cannot be written (a file where a folder should be, a read-only folder, a full disk) is checked
before the work starts and is one line too. On a terminal ``embed`` shows a progress bar; elsewhere (a
log file, a job scheduler) it logs ``embed: 2048/10000 images  85 img/s  ETA 1m34s`` every
:data:`PROGRESS_EVERY_S` seconds instead.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from ..core.errors import UserError
from ..core.files import check_writable, writing

log = logging.getLogger("deepmetric")

#: seconds between progress lines off a terminal
PROGRESS_EVERY_S = 10.0
#: how long a rank of a sharded embed waits for the others at the end (a resumed rank may have nothing to do)
EMBED_WAIT_S = 7 * 24 * 3600.0
#: images per resumable chunk by default: a ``.npz``'s parts, and Parquet chunk files
CHUNK_SIZE = {"npz": 4096, "parquet": 16384}


class EmbedProgress:
    """Progress of ``write_embeddings`` as log lines: a stand-in for the predictor that counts what
    ``iter_embeddings`` yields. Chunks come in order (``chunk_size`` images each, as the input list), so
    a resumed run starts counting at the first chunk it embeds."""

    def __init__(self, predictor: Any, paths: List[str], chunk_size: int, every_s: float) -> None:
        self._predictor, self._paths, self._chunk = predictor, paths, chunk_size
        self.total, self.done, self.every_s = len(paths), 0, every_s
        self._start = self._last = time.monotonic()
        self._embedded = 0  # by this process: the rate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._predictor, name)

    def _position(self, paths: List[str]) -> int:
        """Where the chunk ``paths`` starts in the input list (at or after what is done)."""
        for start in range(self.done - self.done % self._chunk, self.total, self._chunk):
            if self._paths[start:start + len(paths)] == list(paths):
                return start
        return self.done

    def iter_embeddings(self, paths: List[str], *args: Any, **kwargs: Any) -> Iterator[Any]:
        self.done = self._position(paths)
        for emb in self._predictor.iter_embeddings(paths, *args, **kwargs):
            self.done += len(emb)
            self._embedded += len(emb)
            now = time.monotonic()
            if now - self._last >= self.every_s or self.done == self.total:
                self._last = now
                self.report(now)
            yield emb

    def report(self, now: Optional[float] = None) -> None:
        from ..engine.callbacks import format_duration

        elapsed = max((now or time.monotonic()) - self._start, 1e-9)
        rate = self._embedded / elapsed
        eta = format_duration((self.total - self.done) / rate) if rate > 0 else "?"
        log.info("embed: %d/%d images  %.0f img/s  ETA %s", self.done, self.total, rate, eta)


def _params(items: List[str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--param {item!r}: expected KEY=VALUE (e.g. nprobe=32)")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _embed_format(args: argparse.Namespace) -> str:
    """``parquet`` for an output folder (existing, ending in ``/``, or ``--format parquet``), else ``npz``;
    more than one process (torchrun) needs a folder."""
    folder = args.output.endswith(("/", os.sep)) or Path(args.output).is_dir()
    fmt = args.format or ("parquet" if folder else "npz")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if fmt == "npz" and folder:
        raise UserError(f"--output {args.output}: a folder, but --format npz writes one file; name a .npz file")
    if fmt == "npz" and world > 1:
        raise UserError(f"--output {args.output}: {world} processes (torchrun) write Parquet chunks into a folder; "
                        "name a folder (--output DIR/)")
    return fmt


def cmd_embed(args: argparse.Namespace) -> int:
    from .predictor import Predictor, list_inputs, write_embeddings

    from ..data.loading import loader_settings

    fmt = _embed_format(args)
    if args.chunk_size is None:
        args.chunk_size = CHUNK_SIZE[fmt]
    if fmt == "parquet":
        return _embed_shards(args)
    output = Path(args.output)
    check_writable(output, "--output")
    inputs = list_inputs(args.input)
    predictor = Predictor.load(args.checkpoint, device=args.device, runtime=args.runtime)
    model_device = args.device if args.runtime == "torch" else "cpu"
    workers = loader_settings(args.workers, False, model_device).num_workers  # auto: CUDA -> CPUs - 1
    show = not (args.no_progress or getattr(args, "quiet", False))
    bar = show and sys.stderr.isatty()
    if show and not bar:
        predictor = EmbedProgress(predictor, list(inputs.paths), args.chunk_size, PROGRESS_EVERY_S)
    with writing(output, "--output"):
        out = write_embeddings(predictor, inputs, output, batch_size=args.batch_size, dtype=args.dtype,
                               chunk_size=args.chunk_size, num_workers=workers, progress=bar)
    labelled = int((inputs.labels >= 0).sum())
    print(f"wrote {out}: {len(inputs.paths)} x {predictor.embedding_dim} {args.dtype} embeddings "
          f"({labelled} labelled, {len(inputs.class_names)} classes)")
    return 0


def _embed_shards(args: argparse.Namespace) -> int:
    """``embed`` into a folder of Parquet chunks, sharded over the processes torchrun started (or one)."""
    from ..data.loading import loader_settings
    from .predictor import Predictor, list_inputs
    from .shards import chunk_spans, embed_shards, remove_stale_manifest, require_pyarrow, write_manifest

    require_pyarrow()
    from ..core.distributed import gather_to_main, launch_info, rank_device

    info = launch_info()  # the ranks share no tensors: one gather at the end, through torchrun's store
    rank, world = info.rank, info.world_size
    device = args.device
    if world > 1 and args.runtime == "torch":
        device = str(rank_device(args.device, info))
    folder = Path(args.output)
    check_writable(folder, "--output", folder=True)
    inputs = list_inputs(args.input)
    predictor = Predictor.load(args.checkpoint, device=device, runtime=args.runtime)
    workers = loader_settings(args.workers, False, device if args.runtime == "torch" else "cpu").num_workers
    show = not (args.no_progress or getattr(args, "quiet", False))
    bar = show and sys.stderr.isatty()
    with writing(folder, "--output"):
        if rank == 0:
            remove_stale_manifest(folder, predictor, inputs, args.chunk_size, args.dtype)
        if show and not bar:
            mine = [p for i, s, e in chunk_spans(len(inputs.paths), args.chunk_size) if i % world == rank
                    for p in inputs.paths[s:e]]
            predictor = EmbedProgress(predictor, mine, args.chunk_size, PROGRESS_EVERY_S)
        run = embed_shards(predictor, inputs, folder, rank=rank, world_size=world, chunk_size=args.chunk_size,
                           batch_size=args.batch_size, dtype=args.dtype, num_workers=workers, progress=bar)
        runs = gather_to_main(run, "embed", EMBED_WAIT_S)  # on rank 0, every rank is done when it returns
        if rank == 0:
            manifest = write_manifest(folder, predictor, inputs, args.chunk_size, args.dtype)
    if rank == 0:
        embedded, skipped = sum(len(r.embedded) for r in runs), sum(len(r.skipped) for r in runs)
        labelled = int((inputs.labels >= 0).sum())
        print(f"wrote {folder}: {len(inputs.paths)} x {predictor.embedding_dim} {args.dtype} embeddings in "
              f"{embedded + skipped} Parquet chunks by {world} process(es), {embedded} embedded now and {skipped} "
              f"found done ({labelled} labelled, {len(inputs.class_names)} classes); manifest {manifest}")
    return 0


def cmd_index_build(args: argparse.Namespace) -> int:
    from . import index_lock, index_log, streaming
    from .embeddings_io import open_embeddings
    from .stores import STORES

    if args.backend in STORES or args.uri:
        return build_in_store(args)
    if not args.output:
        raise UserError(f"--output: name the index file to write (--backend {args.backend} writes a file; "
                        "--backend milvus --uri gallery.db writes a Milvus collection)")
    params = _params(args.param)
    output = Path(args.output)
    check_writable(output, "--output")
    index_lock.check_not_served(output)
    src = open_embeddings(args.embeddings)  # streamed a block at a time (streaming's docstring)
    source = {"embeddings": str(args.embeddings), "model": src.meta.get("model"), "checkpoint": src.meta.get("source")}
    start, big = time.monotonic(), src.count >= 100_000
    if big:
        log.info("index build: %d vectors into a %s index...", src.count, args.backend)
    with writing(output, "--output"):
        index = streaming.build_index(src, output, backend=args.backend, metric=args.metric, centroids=args.centroids,
                                      params=params, train_size=args.train_size, on_disk=args.on_disk,
                                      class_names=src.class_names or None, source_info=source)
        streaming.save(index, output)
        index_log.discard(output)  # the change log of an index that stood here before is void
    if big:
        log.info("index build: done in %.0f s", time.monotonic() - start)
    what = f"{len(index)} centroids of {src.count} vectors" if args.centroids else f"{len(index)} vectors"
    sidecar = getattr(index.backend, "sidecar", None)
    where = f", lists on disk in {sidecar.name}" if sidecar is not None else ""
    print(f"wrote {args.output}: {args.backend} {index.metric} index of {what}, params {index.info()['params']}{where}")
    return 0


def build_in_store(args: argparse.Namespace) -> int:
    """``index build --backend milvus --uri ...``: the embeddings into a database collection."""
    from .stores import STORES, store_class
    from .predictor import load_embeddings

    if args.backend not in STORES:
        raise UserError(f"--uri is for --backend {' or '.join(STORES)}; --backend {args.backend} writes a file "
                        "named by --output")
    if not args.uri or args.output:
        raise UserError(f"--backend {args.backend} writes to a collection named by --uri (gallery.db, or "
                        "http://host:19530), not to --output")
    if args.centroids:
        raise UserError(f"--centroids: a {args.backend} index keeps items; build a centroid index as a file "
                        "(--backend exact or faiss-*)")
    params = _params(args.param)
    f = load_embeddings(args.embeddings)
    source = {"embeddings": str(args.embeddings), "model": f.meta.get("model"), "checkpoint": f.meta.get("source")}
    start = time.monotonic()
    log.info("index build: %d vectors into %s...", len(f.embeddings), args.uri)
    index = store_class(args.backend).build(f.embeddings, args.uri, collection=args.collection,
                                            class_names=f.class_names or None, camids=_camids(args.embeddings,
                                            len(f.embeddings)), metric=args.metric, source=source,
                                            replace=args.replace, **params)
    try:
        print(f"wrote {index.location}: {args.backend} {index.metric} index of {len(index)} vectors, params "
              f"{index.info()['params']}, in {time.monotonic() - start:.1f} s; serve it with --index {index.location.spec}")
    finally:
        index.close()
    return 0


def _camids(path: str, n: int) -> Any:
    """The ``camids`` array of a features file, where it has one (camera ids, -1 unknown)."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as z:
            if "camids" not in z.files:
                return None
            camids = np.asarray(z["camids"], np.int64).reshape(-1)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"{path}: its camids array is not readable as integers ({e})") from None
    if len(camids) != n:
        raise UserError(f"{path}: {len(camids)} camera ids (camids) for {n} vectors")
    return camids


@contextmanager
def opened(spec: str) -> Iterator[Any]:
    """The index ``spec`` names (a file, or ``milvus://...``), closed afterwards."""
    from .stores import open_index

    index = open_index(spec)
    try:
        yield index
    finally:
        index.close()


@contextmanager
def editing(spec: str) -> Iterator[Any]:
    """The index ``spec`` names, to change: a file under its lock, saved when the block ends; a
    database collection as it is (each change is kept when made)."""
    from .index import edit_index
    from .stores import store_of

    if store_of(spec) is None:
        with writing(Path(spec), "--index"), edit_index(spec) as index:
            yield index
    else:
        with opened(spec) as index:
            yield index


def cmd_index_info(args: argparse.Namespace) -> int:
    with opened(args.index) as index:
        print(json.dumps(index.info(), indent=1))
    return 0


def _id_span(ids) -> str:
    ids = [int(i) for i in ids]
    if len(ids) > 1 and ids == list(range(ids[0], ids[-1] + 1)):
        return f"ids {ids[0]}..{ids[-1]}"
    return ("id " if len(ids) == 1 else "ids ") + ", ".join(map(str, ids[:10])) + \
        (f", ... ({len(ids) - 10} more)" if len(ids) > 10 else "")


def cmd_index_add(args: argparse.Namespace) -> int:
    from .predictor import load_embeddings
    from .stores import store_of

    f = load_embeddings(args.embeddings)
    camids = _camids(args.embeddings, len(f.embeddings)) if store_of(args.index) else None  # a file keeps none
    with editing(args.index) as index:
        theirs, ours = f.meta.get("model"), index.source.get("model")
        if theirs and ours and theirs != ours and not args.allow_other_model:
            raise UserError(f"{args.embeddings} was embedded by model {theirs}, but {args.index} holds embeddings of "
                            f"model {ours}; their vectors are not comparable (embed with that model, or pass "
                            "--allow-other-model)")
        before = set(index.labels.tolist()) if index.mode == "centroids" else set()
        es = f.embeddings
        ids = index.add(es.vectors, es.labels, es.paths, class_names=f.class_names or None,
                        **({} if camids is None else {"camids": camids}))
        count = len(index)
        if index.mode == "centroids":
            updated = len(before & set(index.labels[count - len(ids):].tolist()))  # new ids are the last rows
    if index.mode == "centroids":
        print(f"added {len(es)} vectors to {args.index}: {updated} centroids updated, {len(ids) - updated} new "
              f"({_id_span(ids)}); now {count} centroids")
    else:
        print(f"added {len(ids)} items to {args.index} ({_id_span(ids)}); now {count} items")
    return 0


def cmd_index_remove(args: argparse.Namespace) -> int:
    with editing(args.index) as index:
        removed = index.remove(ids=args.ids, paths=args.paths, labels=args.labels)
        count = len(index)
    noun = "centroids" if index.mode == "centroids" else "items"
    print(f"removed {len(removed)} {noun} from {args.index} ({_id_span(removed)}); now {count} {noun}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from .predictor import Predictor

    with opened(args.index) as index:
        if args.param:
            index.set_search_params(**_params(args.param))
        predictor = Predictor.load(args.checkpoint, device=args.device, runtime=args.runtime)
        predictor.check_index(index)
        results = index.search(predictor.embed_images(args.query), k=args.top_k, filter=args.filter)
    if args.json:
        print(json.dumps([{"query": q, "metric": index.metric, "hits": [h.to_dict() for h in hits]}
                          for q, hits in zip(args.query, results)], indent=1))
        return 0
    score = "similarity" if index.metric == "cosine" else "sq. L2 dist"
    if index.mode == "centroids":
        print("class centroids: one vector per label; path = the label's first image")
    for q, hits in zip(args.query, results):
        print(f"query {q}")
        print(f"  {'rank':>4}  {score:>11}  {'label':<16} path")
        for rank, h in enumerate(hits, start=1):
            label = h.label_name or str(h.label)
            print(f"  {rank:>4}  {h.score:>11.4f}  {label:<16} {h.path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export import export_checkpoint

    report = export_checkpoint(args.checkpoint, args.format, args.output, normalization_in_graph=args.normalize_in_graph,
                               atol=args.atol, **({"opset": args.opset} if args.format == "onnx" else {}))
    print(report.summary())
    meta = report.metadata
    size = "x".join(map(str, meta["input_size"])) if meta["input_size"] else "HxW"
    pixels = (f"0-255 {meta['color']} pixels" if meta["normalization_in_graph"]
              else f"(pixel/255 - mean {meta['mean']}) / std {meta['std']}, {meta['color']}")
    print(f"input '{meta['input_name']}': N x {meta['channels']} x {size} float32, {pixels}; "
          f"output '{meta['output_name']}': N x {meta['embedding_dim']}")
    return 0


def _workers(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a number of processes >= 0 or 'auto', got {value!r}")
    return n


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="run directory, checkpoint directory or exported .onnx file")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1)")
    p.add_argument("--runtime", choices=["torch", "onnx"], default="torch",
                   help="run a checkpoint with PyTorch or (exported in memory) onnxruntime")


def _streaming_args(b: argparse.ArgumentParser) -> None:
    """``index build``'s options of a streaming build (:mod:`deepmetric.inference.streaming`)."""
    from .streaming import ON_DISK_CHOICES, TRAIN_SIZE

    b.add_argument("--train-size", type=int, default=TRAIN_SIZE, metavar="N",
                   help=f"vectors the IVF quantisers train on, drawn evenly across the collection (default {TRAIN_SIZE})")
    b.add_argument("--on-disk", nargs="?", const="yes", default="auto", choices=ON_DISK_CHOICES,
                   help="faiss-ivfpq: inverted lists in a file beside the index, mapped, not in memory (auto: when "
                        "they would take over a quarter of this machine's memory)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``embed``, ``index build|info|add|remove``, ``search`` and ``export`` to the ``deepmetric`` parser."""
    from .index import BACKENDS, METRIC_ALIASES, METRICS
    from .stores import STORES

    e = subparsers.add_parser("embed", help="embed a folder or list of images into features.npz or Parquet chunks "
                              "(resumable; under torchrun, sharded across the processes)")
    _model_args(e)
    e.add_argument("--input", required=True, help="image folder (class subfolders give labels) or list file "
                   "('path[ label]' per line, or CSV with header path,label)")
    e.add_argument("--output", required=True, help="features .npz to write, or a folder (DIR/) for Parquet chunks "
                   "and their manifest.json")
    e.add_argument("--format", choices=["npz", "parquet"], default=None,
                   help="npz (one file) or parquet (a folder of chunks); default: parquet for a folder")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    e.add_argument("--chunk-size", type=int, default=None,
                   help="images per resumable chunk (default 4096 for .npz, 16384 per Parquet file)")
    e.add_argument("--workers", type=_workers, default="auto",
                   help="image-decoding processes, or auto (on a GPU its CPUs less one, at most 16; on a CPU 0)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_embed)

    ix = subparsers.add_parser("index", help="build, inspect or change a search index")
    isub = ix.add_subparsers(dest="index_command", metavar="ACTION")
    b = isub.add_parser("build", help="index a features.npz or a folder of Parquet chunks for search (streamed)")
    b.add_argument("--embeddings", required=True, help="features .npz or Parquet folder from 'deepmetric embed'")
    b.add_argument("--output", help="index file to write")
    b.add_argument("--backend", choices=[*BACKENDS, *STORES], default="exact")
    b.add_argument("--metric", choices=[*METRICS, *METRIC_ALIASES], default="cosine",
                   help="cosine, or squared_euclidean (l2 is its old name)")
    b.add_argument("--centroids", action="store_true", help="one vector per label (Centroids-ReID gallery)")
    b.add_argument("--param", action="append", metavar="KEY=VALUE",
                   help="backend parameter: nlist, nprobe (faiss-ivf/ivfpq), m, nbits (faiss-ivfpq), "
                        "M, ef_construction, ef_search (faiss-hnsw); index_type (AUTOINDEX, FLAT, HNSW, IVF_FLAT...), "
                        "M, ef_construction, nlist, ef_search, nprobe (milvus)")
    _streaming_args(b)
    b.add_argument("--uri", help="--backend milvus: a Milvus Lite file (gallery.db) or a Milvus server "
                   "(http://host:19530; credentials in MILVUS_TOKEN)")
    b.add_argument("--collection", default=None, help="--backend milvus: the collection (default gallery)")
    b.add_argument("--replace", action="store_true", help="--backend milvus: drop the collection if it exists")
    b.set_defaults(func=cmd_index_build)
    inf = isub.add_parser("info", help="print an index's backend, metric, size and parameters")
    inf.add_argument("index")
    inf.set_defaults(func=cmd_index_info)
    a = isub.add_parser("add", help="add the vectors of a features.npz to an index (in place, atomically)")
    a.add_argument("--index", required=True, help="index file to change")
    a.add_argument("--embeddings", required=True, help="features .npz from 'deepmetric embed' (same model)")
    a.add_argument("--allow-other-model", action="store_true",
                   help="add embeddings made by another model than the index's (their vectors are not comparable)")
    a.set_defaults(func=cmd_index_add)
    r = isub.add_parser("remove", help="remove items by id, path or label (in place, atomically)")
    r.add_argument("--index", required=True, help="index file to change")
    r.add_argument("--ids", nargs="+", type=int, metavar="ID", help="item ids (as search hits report them)")
    r.add_argument("--paths", nargs="+", metavar="PATH", help="image paths as embedded")
    r.add_argument("--labels", nargs="+", metavar="LABEL", help="labels, by class name or number")
    r.set_defaults(func=cmd_index_remove)
    ix.set_defaults(func=lambda args: (ix.print_help(), 2)[1])

    s = subparsers.add_parser("search", help="the nearest gallery images of query images")
    s.add_argument("--index", required=True, help="index file, or milvus://gallery.db, milvus://host:19530/collection")
    _model_args(s)
    s.add_argument("--query", required=True, nargs="+", help="query image file(s)")
    s.add_argument("--top-k", type=int, default=10)
    s.add_argument("--param", action="append", metavar="KEY=VALUE", help="search parameter: nprobe or ef_search")
    s.add_argument("--json", action="store_true", help="print hits as JSON")
    s.add_argument("--filter", default=None, metavar="EXPR",
                   help="a Milvus index: only items this Milvus expression passes ('label in [3, 5]', 'camera != 2')")
    s.set_defaults(func=cmd_search)

    x = subparsers.add_parser("export", help="export a checkpoint to ONNX or TorchScript (checks parity)")
    x.add_argument("--checkpoint", required=True, help="run or checkpoint directory")
    x.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    x.add_argument("--output", required=True, type=Path)
    x.add_argument("--normalize-in-graph", action="store_true",
                   help="the graph takes 0-255 pixels (RGB, or L for one-channel models) and normalises "
                        "itself (FastReID's convention)")
    x.add_argument("--opset", type=int, default=17, help="ONNX opset")
    x.add_argument("--atol", type=float, default=1e-4, help="largest allowed abs difference vs PyTorch")
    x.set_defaults(func=cmd_export)
