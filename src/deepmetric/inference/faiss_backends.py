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

    def _nlist(self, n: int) -> int:
        if self.params["nlist"] is None:  # ~4 sqrt(N) lists, each with >= 39 training points (faiss's minimum)
            self.params["nlist"] = int(max(1, min(4 * math.sqrt(n), n // 39)))
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


class IVFPQBackend(IVFBackend):
    """``IndexIVFPQ`` (in an ``IndexRefineFlat`` with ``refine``); its arrays add the PQ codebooks and codes."""

    name = "faiss-ivfpq"
    defaults = {"nlist": None, "nprobe": 24, "m": None, "nbits": None, "refine": 0}
    knobs = ("nprobe", "refine")

    row_arrays = ("ivf_lists", "pq_codes", "vectors")  # vectors only with refine

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
        centroids, lists, codes = self._ivf_state()
        pq = self.faiss.downcast_index(self.faiss.extract_index_ivf(self.index)).pq
        out = {"ivf_centroids": centroids, "ivf_lists": lists, "pq_codes": codes,
               "pq_centroids": self.faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)}
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
        if self.params["refine"]:
            out["vectors"] = ("F32", (count, self.dim))
        return out

    def restore(self, arrays: Dict[str, np.ndarray]) -> None:
        nlist, m, nbits = len(arrays["ivf_centroids"]), int(self.params["m"]), int(self.params["nbits"])
        ivf = self._trained(arrays["ivf_centroids"], lambda quantizer: self.faiss.IndexIVFPQ(
            quantizer, self.dim, nlist, m, nbits, self._mt))
        self.faiss.copy_array_to_vector(np.ascontiguousarray(arrays["pq_centroids"]).ravel(), ivf.pq.centroids)
        ivf.precompute_table()
        self._ivf_fill(ivf, arrays["ivf_lists"], arrays["pq_codes"])
        index = ivf
        if self.params["refine"]:
            vectors = np.ascontiguousarray(arrays["vectors"])
            index = self.faiss.IndexRefineFlat(ivf, self.faiss.swig_ptr(vectors))
        self.index = index
        self._apply_knobs()
