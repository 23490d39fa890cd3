"""The FAISS backends of the search index: flat, IVF and IVF-PQ here, HNSW in
:mod:`deepmetric.inference.hnsw` (the interface is in :mod:`deepmetric.inference.backends`; what each
costs, in :mod:`deepmetric.inference.index`).

The FAISS index is created (and trained, for IVF) on the first ``add``. Its state for the file is
FAISS's own arrays (coarse centroids, inverted lists, PQ codebooks, HNSW links), and it is rebuilt from
them after they are checked, never through FAISS's deserialiser, which trusts its input.
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .backends import FaissMissingError, SearchIndexError, checked_params, no_tombstones



def _import_faiss(backend: str) -> Any:
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # its CPU-feature probing is INFO noise
    try:
        import faiss
    except ImportError:
        raise FaissMissingError(f"backend {backend} needs FAISS, which is not installed: "
                                "pip install 'deepmetric[serve]'") from None
    return faiss


def flat_vectors(faiss: Any, flat: Any, dim: int) -> np.ndarray:
    """The ``(N, D)`` vectors of an ``IndexFlat`` (a view of FAISS's memory: copy before changing it)."""
    flat = faiss.downcast_index(flat)
    if flat.ntotal == 0:
        return np.zeros((0, dim), np.float32)
    return faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * dim).reshape(-1, dim)


class FaissBackend:
    """What the FAISS backends share: the index is created (and trained, for IVF) on the first ``add``."""

    name = ""
    defaults: Dict[str, Any] = {}
    knobs: Tuple[str, ...] = ()
    row_arrays: Tuple[str, ...] = ("vectors",)

    def __init__(self, dim: int, metric: str, params: Dict[str, Any]) -> None:
        self.faiss = _import_faiss(self.name)
        self.dim, self.metric = dim, metric
        self.params = {**self.defaults, **checked_params(self.name, params, self.defaults)}
        self._mt = self.faiss.METRIC_INNER_PRODUCT if metric == "cosine" else self.faiss.METRIC_L2
        self.index: Any = None

    @property
    def ntotal(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    @property
    def slots(self) -> int:
        return self.ntotal

    def compaction(self, force: bool = False) -> Any:
        return None

    def _flat(self) -> Any:
        return self.faiss.IndexFlatIP(self.dim) if self.metric == "cosine" else self.faiss.IndexFlatL2(self.dim)

    def _create(self, x: np.ndarray) -> Any:
        raise NotImplementedError

    def _apply_knobs(self) -> None:
        pass

    def add(self, x: np.ndarray) -> None:
        if self.index is None:
            if x.shape[0] == 0:
                return
            self.index = self._create(x)
            if not self.index.is_trained:
                self.index.train(x)
            self._apply_knobs()
        self.index.add(x)

    def set_search_params(self, **params: Any) -> None:
        """Search-time knobs (``knobs``). Changes the index in place: not while searching."""
        unknown = set(params) - set(self.knobs)
        if unknown:
            raise SearchIndexError(f"backend {self.name}: {sorted(unknown)} cannot change at search time "
                                   f"(search parameters: {', '.join(self.knobs) or 'none'})")
        if params.get("refine") and not self.params["refine"] and self.index is not None:
            raise SearchIndexError("faiss-ivfpq: refine must be set when the index is built (--param refine=8)")
        self.params.update(checked_params(self.name, params, self.defaults))
        if self.index is not None:
            self._apply_knobs()

    def search(self, q: np.ndarray, k: int) -> Tuple[np.ndarray, np.ndarray]:
        if self.index is None:
            return np.zeros((q.shape[0], 0), np.float32), np.zeros((q.shape[0], 0), np.int64)
        scores, rows = self.index.search(q, min(k, self.ntotal))
        return scores, rows.astype(np.int64)

    def keep(self, mask: np.ndarray) -> None:
        self.restore({k: (v[mask] if k in self.row_arrays else v) for k, v in self.state().items()})


class FlatBackend(FaissBackend):
    name = "faiss-flat"

    def _create(self, x: np.ndarray) -> Any:
        return self._flat()

    def state(self) -> Dict[str, np.ndarray]:
        return {"vectors": flat_vectors(self.faiss, self.index, self.dim)}

    def expected(self, count: int, slots: int) -> Dict[str, Tuple[str, Optional[tuple]]]:
        no_tombstones(self.name, count, slots)
        return {"vectors": ("F32", (count, self.dim))}

    def restore(self, arrays: Dict[str, np.ndarray]) -> None:
        index = self._flat()
        index.add(arrays["vectors"])
        self.index = index


class IVFBackend(FaissBackend):
    """``IndexIVFFlat``; its file arrays are the coarse centroids, each row's list and the vectors."""

    name = "faiss-ivf"
    defaults: Dict[str, Any] = {"nlist": None, "nprobe": 24}
    knobs: Tuple[str, ...] = ("nprobe",)
    row_arrays: Tuple[str, ...] = ("vectors", "ivf_lists")
    _total: Optional[int] = None  # the vectors a streaming build will add, when it trains on a sample

    def train(self, sample: np.ndarray, total: int) -> None:
        """Create the index and train it on ``sample`` (prepared vectors) standing for the ``total`` that a
        streaming build then adds block by block (the default nlist is about 4 sqrt(total))."""
        if self.index is not None:
            raise SearchIndexError(f"{self.name}: the index is trained already")
        self._total = int(total)
        self.index = self._create(sample)
        self.index.train(sample)
        self._apply_knobs()

    @property
    def code_size(self) -> int:
        """Bytes per vector in the inverted lists, its row number aside (once trained)."""
        return int(self.faiss.extract_index_ivf(self.index).code_size)

    def _nlist(self, n: int) -> int:
        if self.params["nlist"] is None:  # ~4 sqrt(N) lists, each with >= 39 training points (faiss's minimum)
            self.params["nlist"] = int(max(1, min(4 * math.sqrt(self._total or n), n // 39)))
        nlist = int(self.params["nlist"])
        if nlist > n:  # k-means cannot make more lists than it has points (FAISS fails with a traceback)
            raise SearchIndexError(f"{self.name}: nlist={nlist} lists need at least {nlist} vectors to train on, "
                                   f"and there are {n}; pass a smaller --param nlist (or leave it out: about 4 sqrt(N))")
        return nlist

    def _create(self, x: np.ndarray) -> Any:
        index = self.faiss.IndexIVFFlat(self._flat(), self.dim, self._nlist(x.shape[0]), self._mt)
        # k-means on up to 64 points per list (faiss's default 256 makes 1M-vector builds take many minutes)
        index.cp.max_points_per_centroid = 64
        return index

    def _apply_knobs(self) -> None:
        self.faiss.extract_index_ivf(self.index).nprobe = int(self.params["nprobe"])

    def _ivf_state(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(centroids (nlist, D), list of each row (N,), code of each row (N, code_size) uint8)``."""
        faiss, ivf = self.faiss, self.faiss.extract_index_ivf(self.index)
        n, cs, inv = ivf.ntotal, ivf.code_size, ivf.invlists
        lists, codes = np.empty(n, np.int64), np.empty((n, cs), np.uint8)
        for lst in range(ivf.nlist):
            size = inv.list_size(lst)
            if size:  # the ids FAISS holds are our rows (added in order, never by id)
                rows = faiss.rev_swig_ptr(inv.get_ids(lst), size)
                lists[rows] = lst
                codes[rows] = faiss.rev_swig_ptr(inv.get_codes(lst), size * cs).reshape(size, cs)
        # np.asarray: faiss.contrib.torch_utils (which PyTorch users may import) makes this return a tensor
        return np.asarray(ivf.quantizer.reconstruct_n(0, ivf.nlist)), lists, codes

    def _ivf_fill(self, ivf: Any, lists: np.ndarray, codes: np.ndarray) -> None:
        """Put each row's code into its list of the trained, empty ``ivf``, rows ascending within a list."""
        if len(lists) and (int(lists.min()) < 0 or int(lists.max()) >= ivf.nlist):
            raise ValueError(f"ivf_lists: list numbers outside 0..{ivf.nlist - 1}")
        if codes.shape[1] != ivf.code_size:
            raise ValueError(f"codes of {codes.shape[1]} bytes, the index uses {ivf.code_size}")
        order = np.argsort(lists, kind="stable")
        bounds = np.concatenate([[0], np.cumsum(np.bincount(lists, minlength=ivf.nlist))])
        for lst in np.flatnonzero(bounds[1:] > bounds[:-1]).tolist():
            rows = np.ascontiguousarray(order[bounds[lst]:bounds[lst + 1]])
            block = np.ascontiguousarray(codes[rows])
            ivf.invlists.add_entries(lst, len(rows), self.faiss.swig_ptr(rows), self.faiss.swig_ptr(block))
        ivf.ntotal = len(lists)

    def _trained(self, centroids: np.ndarray, make: Any) -> Any:
        quantizer = self._flat()
        quantizer.add(centroids)
        ivf = make(quantizer)
        ivf.is_trained = True
        return ivf

    def state(self) -> Dict[str, np.ndarray]:
        centroids, lists, codes = self._ivf_state()
        return {"ivf_centroids": centroids, "ivf_lists": lists, "vectors": codes.view("<f4")}

    def expected(self, count: int, slots: int) -> Dict[str, Tuple[str, Optional[tuple]]]:
        no_tombstones(self.name, count, slots)
        return {"ivf_centroids": ("F32", (self.params["nlist"], self.dim)), "ivf_lists": ("I64", (count,)),
                "vectors": ("F32", (count, self.dim))}

    def restore(self, arrays: Dict[str, np.ndarray]) -> None:
        ivf = self._trained(arrays["ivf_centroids"], lambda quantizer: self.faiss.IndexIVFFlat(
            quantizer, self.dim, len(arrays["ivf_centroids"]), self._mt))
        self._ivf_fill(ivf, arrays["ivf_lists"], arrays["vectors"].view(np.uint8))
        self.index = ivf
        self._apply_knobs()


#: the most bytes of PQ distance tables one FAISS add may make (see :meth:`IVFPQBackend.add`)
ADD_TABLE_BYTES = 32 << 20


class IVFPQBackend(IVFBackend):
    """``IndexIVFPQ`` (in an ``IndexRefineFlat`` with ``refine``); its arrays add the PQ codebooks and codes.

    With ``on_disk=1`` the codes live in a sidecar file beside the index, mapped read-only
    (:mod:`deepmetric.inference.ivf_ondisk`): a streaming build calls :meth:`start_on_disk` after
    :meth:`train`, adds, then :meth:`finish_on_disk`; the file holds the list sizes instead of the codes.
    Such an index cannot change in place (add, remove): it is rebuilt."""

    name = "faiss-ivfpq"
    defaults = {"nlist": None, "nprobe": 24, "m": None, "nbits": None, "refine": 0, "on_disk": 0}
    knobs = ("nprobe", "refine")

    row_arrays = ("ivf_lists", "pq_codes", "vectors")  # vectors only with refine
    folder: Optional[Path] = None  # the index file's folder, where the on-disk lists lie (set by load)
    _spill: Any = None
    _ondisk: Dict[str, np.ndarray] = {}  # sizes, name and token of the attached on-disk lists

    @property
    def ntotal(self) -> int:
        return self._spill.count if self._spill is not None else super().ntotal

    @property
    def slots(self) -> int:
        return self.ntotal

    @property
    def sidecar(self) -> Optional[Path]:
        """The file of the on-disk lists this index searches (None when they are in memory)."""
        if not self._ondisk or self.folder is None:
            return None
        return self.folder / self._ondisk["ondisk_name"].tobytes().decode("utf-8", "replace")

    def start_on_disk(self, target: Path) -> None:
        """Send the codes of the coming adds to on-disk lists beside the index file ``target`` (after :meth:`train`)."""
        from .ivf_ondisk import ListSpill

        if self.params["refine"]:
            raise SearchIndexError("faiss-ivfpq: refine keeps every vector in memory, which on-disk lists exist to "
                                   "avoid; build with --param refine=0, or without --on-disk")
        ivf = self.faiss.extract_index_ivf(self.index)
        self.params["on_disk"] = 1
        self._spill = ListSpill(Path(target), ivf.nlist, ivf.code_size)

    def finish_on_disk(self) -> Path:
        """Lay the spilled codes out in the sidecar and search them from there; returns the sidecar's path."""
        spill, self._spill = self._spill, None
        path = spill.finish()
        self.folder = path.parent
        self._attach({"ondisk_sizes": spill.sizes, "ondisk_name": np.frombuffer(path.name.encode(), np.uint8),
                      "ondisk_token": np.frombuffer(spill.token, np.uint8)}, self.faiss.extract_index_ivf(self.index))
        return path

    def abort_on_disk(self) -> None:
        if self._spill is not None:
            self._spill.abort()
            self._spill = None

    def _read_only(self) -> SearchIndexError:
        return SearchIndexError("faiss-ivfpq: an index with on-disk lists cannot change in place; rebuild it with "
                                "'deepmetric index build --on-disk' from all the embeddings")

    def add(self, x: np.ndarray) -> None:
        """Add ``x`` a piece at a time: FAISS encodes a batch with distance tables of ``n x 2^nbits x m`` floats
        when a sub-vector has 16 or more dimensions, which would make a build's memory grow with its
        blocks (65,536 rows of 256-d, m=16: 1 GB); :data:`ADD_TABLE_BYTES` bounds them."""
        if self.index is None:
            if x.shape[0] == 0:
                return
            self.train(x, x.shape[0])
        if self.params["on_disk"] and self._spill is None:
            raise self._read_only()
        pq = self.faiss.downcast_index(self.faiss.extract_index_ivf(self.index)).pq
        step = max(1024, ADD_TABLE_BYTES // (4 * pq.ksub * pq.M))
        for start in range(0, x.shape[0], step):
            (self._spill_piece if self.params["on_disk"] else self.index.add)(x[start:start + step])

    def _spill_piece(self, x: np.ndarray) -> None:
        ivf = self.faiss.extract_index_ivf(self.index)
        lists = np.ascontiguousarray(ivf.quantizer.assign(x, 1).reshape(-1), np.int64)
        codes = np.empty((len(x), ivf.code_size), np.uint8)
        ivf.encode_vectors(len(x), self.faiss.swig_ptr(x), self.faiss.swig_ptr(lists), self.faiss.swig_ptr(codes), False)
        self._spill.add(lists, codes)

    def keep(self, mask: np.ndarray) -> None:
        if self.params["on_disk"]:
            raise self._read_only()
        super().keep(mask)

    def _attach(self, arrays: Dict[str, np.ndarray], ivf: Any) -> None:
        """Search the on-disk lists that ``arrays`` (sizes, sidecar name, token) describe, from ``ivf``."""
        from .ivf_ondisk import SUFFIX, open_lists

        sizes, name = arrays["ondisk_sizes"], arrays["ondisk_name"].tobytes().decode("utf-8", "replace")
        if len(sizes) != ivf.nlist or int(sizes.min(initial=0)) < 0:
            raise ValueError(f"ondisk_sizes: {len(sizes)} list sizes for {ivf.nlist} lists, or a negative one")
        if os.sep in name or name.startswith(".") or not name.endswith(SUFFIX) or self.folder is None:
            raise ValueError(f"ondisk_name {name[:80]!r} is not the name of a sidecar beside the index")
        lists = open_lists(self.faiss, self.folder / name, sizes, ivf.code_size, arrays["ondisk_token"].tobytes())
        ivf.replace_invlists(lists, True)
        lists.this.disown()
        ivf.ntotal = int(sizes.sum())
        self._ondisk = {k: arrays[k] for k in ("ondisk_sizes", "ondisk_name", "ondisk_token")}

    def _create(self, x: np.ndarray) -> Any:
        p, d, n = self.params, self.dim, x.shape[0]
        nlist = self._nlist(n)
        if p["m"] is None:  # bytes per code: the largest divisor of D up to D/4 (and 64)
            p["m"] = max(m for m in range(1, min(64, max(1, d // 4)) + 1) if d % m == 0)
        if d % int(p["m"]):
            raise SearchIndexError(f"faiss-ivfpq: m={p['m']} must divide the vector size {d}")
        if p["nbits"] is None:  # 2^nbits centroids per sub-quantiser, >= 39 training points each
            p["nbits"] = int(max(1, min(8, math.floor(math.log2(max(n / 39, 2))))))
        if (1 << int(p["nbits"])) > n:
            raise SearchIndexError(f"faiss-ivfpq: nbits={p['nbits']} needs at least {1 << int(p['nbits'])} vectors "
                                   f"to train its codebooks, and there are {n}; pass a smaller --param nbits")
        index = self.faiss.IndexIVFPQ(self._flat(), d, nlist, int(p["m"]), int(p["nbits"]), self._mt)
        index.cp.max_points_per_centroid = 64
        index.pq.cp.max_points_per_centroid = 64  # m small k-means of 2^nbits centroids: 16k points each at most
        if p["refine"]:  # re-rank refine x k PQ candidates with exact distances (keeps raw vectors too)
            index = self.faiss.IndexRefineFlat(index)
        return index

    def _apply_knobs(self) -> None:
        super()._apply_knobs()
        if self.params.get("refine"):
            self.faiss.downcast_index(self.index).k_factor = float(self.params["refine"])

    def state(self) -> Dict[str, np.ndarray]:
        ivf = self.faiss.extract_index_ivf(self.index)
        pq = self.faiss.downcast_index(ivf).pq
        pq_centroids = self.faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)
        if self.params["on_disk"]:
            return {"ivf_centroids": np.asarray(ivf.quantizer.reconstruct_n(0, ivf.nlist)),
                    "pq_centroids": pq_centroids, **self._ondisk}
        centroids, lists, codes = self._ivf_state()
        out = {"ivf_centroids": centroids, "ivf_lists": lists, "pq_codes": codes, "pq_centroids": pq_centroids}
        if self.params["refine"]:
            out["vectors"] = flat_vectors(self.faiss, self.index.refine_index, self.dim)
        return out

    def expected(self, count: int, slots: int) -> Dict[str, Tuple[str, Optional[tuple]]]:
        no_tombstones(self.name, count, slots)
        m, nbits = self.params["m"], self.params["nbits"]
        if m is None or nbits is None or self.dim % m:
            raise ValueError(f"m={m}, nbits={nbits} do not describe a product quantiser of {self.dim}-d vectors")
        out = {"ivf_centroids": ("F32", (self.params["nlist"], self.dim)), "ivf_lists": ("I64", (count,)),
               "pq_codes": ("U8", (count, (m * nbits + 7) // 8)), "pq_centroids": ("F32", (m, 1 << nbits, self.dim // m))}
        if self.params["on_disk"]:
            del out["ivf_lists"], out["pq_codes"]
            return {**out, "ondisk_sizes": ("I64", (self.params["nlist"],)), "ondisk_name": ("U8", None),
                    "ondisk_token": ("U8", (16,))}
        if self.params["refine"]:
            out["vectors"] = ("F32", (count, self.dim))
        return out

    def restore(self, arrays: Dict[str, np.ndarray]) -> None:
        nlist, m, nbits = len(arrays["ivf_centroids"]), int(self.params["m"]), int(self.params["nbits"])
        ivf = self._trained(arrays["ivf_centroids"], lambda quantizer: self.faiss.IndexIVFPQ(
            quantizer, self.dim, nlist, m, nbits, self._mt))
        self.faiss.copy_array_to_vector(np.ascontiguousarray(arrays["pq_centroids"]).ravel(), ivf.pq.centroids)
        ivf.precompute_table()
        if self.params["on_disk"]:
            self._attach(arrays, ivf)
        else:
            self._ivf_fill(ivf, arrays["ivf_lists"], arrays["pq_codes"])
        index = ivf
        if self.params["refine"]:
            vectors = np.ascontiguousarray(arrays["vectors"])
            index = self.faiss.IndexRefineFlat(ivf, self.faiss.swig_ptr(vectors))
        self.index = index
        self._apply_knobs()
