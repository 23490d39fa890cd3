"""Images in, embeddings out: :class:`Predictor` (a model plus the preprocessing it was trained with)
and the inputs it reads (:func:`list_inputs`).

A predictor runs a checkpoint with PyTorch or an ONNX model with onnxruntime; both apply the same
test-time pipeline (:class:`~deepmetric.inference.preprocess.Preprocessing`: the preset's, with numpy
and Pillow), so their embeddings agree to export tolerance. The ONNX path (:meth:`Predictor.from_onnx`)
never imports PyTorch.

Writing and reading embeddings (``features.npz``, Parquet chunks) is in
:mod:`deepmetric.inference.embeddings_io`; its names are importable from here too.
"""
from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ..core.errors import UserError
from ..core.files import file_fingerprint
from .blocks import DTYPES, EmbeddingsFileError, InputList  # noqa: F401 (re-exported)
from .embeddings_io import EmbeddingsFile, load_embeddings, write_embeddings  # noqa: F401 (re-exported)
from .onnx import decode_metadata, onnx_session
from .preprocess import Preprocessing

if TYPE_CHECKING:
    from ..core.embeddings import EmbeddingSet

log = logging.getLogger("deepmetric")

class InputError(UserError):
    """An ``--input`` that is neither an image folder nor a list file, or a malformed list file."""


# -- inputs ------------------------------------------------------------------------------------------

def list_inputs(source: str | os.PathLike) -> InputList:
    """Images named by a folder or a list file.

    - folder: every image below it (sorted). Images inside a top-level subfolder get that
      subfolder's index (sorted names, as the ``image_folder`` format) as label; images lying
      directly in the folder get -1.
    - ``.csv`` with a header containing ``path`` (and optionally ``label``);
    - any other file: one ``path[ label]`` per line (``#`` comments, blank lines skipped).

    Paths come back absolute; relative paths in list files are taken relative to the list file's folder.
    """
    from ..data.io import IMAGE_EXTENSIONS, find_images

    src = Path(os.path.abspath(source))  # absolute: the server finds gallery files from any directory
    if src.is_dir():
        names, rel, labels = find_images(str(src))
        if not rel:
            raise InputError(f"{src}: no images found (looked for {' '.join(IMAGE_EXTENSIONS)} in it and below)")
        return InputList([str(src / p) for p in rel], labels, names if (labels >= 0).any() else [])
    if not src.is_file():
        raise InputError(f"input not found: {src} (expected a folder of images or a list file)")
    rows = _read_csv(src) if src.suffix.lower() == ".csv" else _read_lines(src)
    if not rows:
        raise InputError(f"{src}: list file names no images")
    paths = [p if os.path.isabs(p) else str(src.parent / p) for p, _ in rows]
    return InputList(paths, np.asarray([lab for _, lab in rows], np.int64), [])


def _label(text: str, src: Path, line: int) -> int:
    try:
        return int(text)
    except ValueError:
        raise InputError(f"{src} line {line}: label should be an integer, got {text!r}") from None


def _read_lines(src: Path) -> List[Tuple[str, int]]:
    rows = []
    try:
        lines = src.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"{src}: not a UTF-8 text list file (expected 'path[ label]' per line)") from None
    for n, text in enumerate(lines, start=1):
        text = text.strip()
        if not text or text.startswith("#"):
            continue
        parts = text.rsplit(None, 1)
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            rows.append((parts[0], _label(parts[1], src, n)))
        else:
            rows.append((text, -1))
    return rows


def _read_csv(src: Path) -> List[Tuple[str, int]]:
    from ..data.io import read_csv

    return [(r["path"], _label(r["label"], src, n) if r.get("label", "") != "" else -1)
            for n, r in read_csv(src, ["path"])]


# -- the predictor -------------------------------------------------------------------------------------

class _ImageFiles:
    """Map-style dataset of image files -> ``(C, H, W) float32`` (for a DataLoader's worker processes)."""

    def __init__(self, paths: Sequence[str], preprocess: Preprocessing) -> None:
        self.paths, self.preprocess = list(paths), preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.preprocess(self.preprocess.decode_file(self.paths[i]))


class Predictor:
    """A model and its preprocessing: PIL images, image bytes or paths in, ``(B, D) float32`` embeddings out.

    Build with :meth:`from_checkpoint` (PyTorch, or ``runtime="onnx"`` to run the same weights through
    onnxruntime) or :meth:`from_onnx` (onnxruntime, numpy and Pillow only: no PyTorch). Every input
    is brought to the model's training input size and channels (:class:`Preprocessing`). Thread-safe:
    decoding and preprocessing run concurrently, forward passes one at a time under a lock (each
    already spreads over the intra-op threads; concurrent passes only oversubscribe).
    """

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], preprocess: Preprocessing,
                 metadata: Dict[str, Any], runtime: str, source: str, fingerprint: Optional[str]) -> None:
        self._run, self.preprocess, self.metadata = run, preprocess, metadata
        self.runtime, self.source, self.fingerprint = runtime, source, fingerprint

    @property
    def embedding_dim(self) -> int:
        return int(self.metadata["embedding_dim"])

    @property
    def normalized(self) -> bool:
        return bool(self.metadata.get("l2_normalized", False))

    @property
    def input_shape(self) -> Optional[Tuple[int, int, int]]:
        """``(C, H, W)`` every input is brought to; ``None`` when the model records no input size."""
        size = self.preprocess.input_size
        return None if size is None else (self.preprocess.channels, *size)

    def pixel_limit(self, max_pixels: Optional[int] = None) -> int:
        """The largest upload (width x height) :meth:`decode` accepts: ``max_pixels``, by default sized to
        the model's input (:func:`~deepmetric.inference.preprocess.default_max_pixels`)."""
        return self.preprocess.pixel_limit(max_pixels)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu", runtime: str = "torch",
             threads: Optional[int] = None) -> "Predictor":
        """An ``.onnx`` file (:meth:`from_onnx`) or a run/checkpoint directory (:meth:`from_checkpoint`)."""
        if str(path).lower().endswith(".onnx"):
            return cls.from_onnx(path, threads=threads)
        return cls.from_checkpoint(path, device=device, runtime=runtime, threads=threads)

    def check_index(self, index: Any) -> None:
        """Refuse an index of another vector size; warn when it was built with other weights."""
        if index.dim != self.embedding_dim:
            raise UserError(f"the index holds {index.dim}-d vectors but the model {self.source} makes "
                            f"{self.embedding_dim}-d embeddings; rebuild the index with this model")
        built_with = index.source.get("model")
        if built_with and self.fingerprint and built_with != self.fingerprint:
            log.warning("the index was built from embeddings of another model (%s, this one is %s); "
                        "scores will not mean much", built_with, self.fingerprint)

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, device: str = "cpu", runtime: str = "torch",
                        prefer: str = "best", threads: Optional[int] = None) -> "Predictor":
        """A run or checkpoint directory (needs PyTorch); ``runtime="onnx"`` exports it in memory and
        runs onnxruntime. The input size is ``data.image_size`` (through the preset), else the
        ``input_shape`` the trainer recorded in ``state.json``."""
        if runtime not in ("torch", "onnx"):
            raise UserError(f"unknown runtime {runtime!r} (valid: torch, onnx)")
        try:
            import torch
        except ModuleNotFoundError as e:
            raise UserError(f"loading a checkpoint needs PyTorch ({e.name} is missing): pip install "
                            "'deepmetric[serve]', or export the model to ONNX on a machine with PyTorch "
                            "and load the .onnx file") from None
        from ..engine.build import load_for_inference
        from .export import onnx_bytes, preprocessing_metadata

        model, cfg, ckpt = load_for_inference(path, prefer=prefer, device=device if runtime == "torch" else "cpu")
        meta = preprocessing_metadata(cfg, model, ckpt)
        if meta["input_size"] is None and meta.get("input_shape"):  # a size-free preset (tensor): the size
            meta["input_size"] = meta["input_shape"][1:]  # it was trained at
        if runtime == "onnx":
            data, meta = onnx_bytes(model, meta)
            return cls._onnx(data, meta, str(ckpt), meta.get("source_fingerprint"), threads)
        lock, dev = threading.Lock(), torch.device(device)

        def run(x: np.ndarray) -> np.ndarray:
            with lock, torch.inference_mode():
                return model(torch.from_numpy(x).to(dev)).float().cpu().numpy()

        return cls(run, Preprocessing.from_metadata(meta), meta, "torch", str(ckpt), meta.get("source_fingerprint"))

    @classmethod
    def from_onnx(cls, path: str | os.PathLike, threads: Optional[int] = None) -> "Predictor":
        """An ONNX file written by ``deepmetric export`` (its metadata gives the preprocessing).

        Needs onnxruntime, numpy and Pillow only: PyTorch is never imported."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"ONNX model not found: {path}")
        try:
            session = onnx_session(str(path), threads)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise UserError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
        meta = decode_metadata(session.get_modelmeta().custom_metadata_map)
        missing = [k for k in ("mean", "std", "channels", "embedding_dim") if k not in meta]
        if missing:
            raise UserError(f"{path}: ONNX metadata lacks {', '.join(missing)}; export it with 'deepmetric export'")
        return cls._wrap_session(session, meta, str(path), meta.get("source_fingerprint") or file_fingerprint(path))

    @classmethod
    def _onnx(cls, data: bytes, meta: Dict[str, Any], source: str, fingerprint: Optional[str],
              threads: Optional[int]) -> "Predictor":
        return cls._wrap_session(onnx_session(data, threads), meta, source, fingerprint)

    @classmethod
    def _wrap_session(cls, session: Any, meta: Dict[str, Any], source: str, fingerprint: Optional[str]) -> "Predictor":
        graph_input = session.get_inputs()[0]
        name = meta.get("input_name", graph_input.name)
        if not meta.get("input_size") and not meta.get("input_shape"):
            hw = list(graph_input.shape)[2:]  # a graph of fixed height and width says its input size
            if len(hw) == 2 and all(isinstance(v, int) and v > 0 for v in hw):
                meta = dict(meta, input_size=hw)
        lock = threading.Lock()

        def run(x: np.ndarray) -> np.ndarray:
            with lock:  # one run at a time: its intra-op threads already use the cores
                return session.run(None, {name: x})[0].astype(np.float32, copy=False)

        return cls(run, Preprocessing.from_metadata(meta), meta, "onnx", source, fingerprint)

    # -- embedding -----------------------------------------------------------------------------------

    def decode(self, data: bytes, max_pixels: Optional[int] = None) -> Image.Image:
        """Uploaded bytes -> PIL image, refusing more than :meth:`pixel_limit` pixels from the header
        (:class:`~deepmetric.inference.preprocess.ImageError` and subclasses say what is wrong)."""
        return self.preprocess.decode(data, self.pixel_limit(max_pixels))

    def _prepare(self, image: Image.Image | str | os.PathLike) -> np.ndarray:
        if not isinstance(image, Image.Image):
            image = self.preprocess.decode_file(image)
        return self.preprocess(image)

    def embed_images(self, images: Sequence[Image.Image | str | os.PathLike], batch_size: int = 64) -> np.ndarray:
        """PIL images or image paths -> ``(B, D) float32``; each is brought to the model's input size
        (paths that fail raise :class:`~deepmetric.inference.preprocess.ImageError`, naming the file)."""
        if self.preprocess.input_size is None:  # each image at its own size: one forward pass per image
            batch_size = 1
        out = [self._run(np.stack([self._prepare(im) for im in images[start:start + batch_size]]))
               for start in range(0, len(images), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.embedding_dim), np.float32)

    def iter_embeddings(self, paths: Sequence[str], batch_size: int = 64, num_workers: int = 0) -> Iterator[np.ndarray]:
        """``(b, D) float32`` per batch of ``paths``, in order; with ``num_workers`` > 0 images decode in
        that many processes (a PyTorch DataLoader), else in this one."""
        if self.preprocess.input_size is None:
            batch_size = 1
        if num_workers <= 0:
            for start in range(0, len(paths), batch_size):
                yield self._run(np.stack([self._prepare(p) for p in paths[start:start + batch_size]]))
            return
        from torch.utils.data import DataLoader

        loader = DataLoader(_ImageFiles(paths, self.preprocess), batch_size=batch_size, shuffle=False,
                            num_workers=num_workers)
        for images in loader:
            yield self._run(np.ascontiguousarray(images.numpy(), dtype=np.float32))  # the collated tensor

    def embed_list(self, paths: Sequence[str], labels: Optional[Sequence[int]] = None, batch_size: int = 64,
                   num_workers: int = 0, progress: bool = True) -> EmbeddingSet:
        """An :class:`EmbeddingSet` of the images ``paths`` (labels default -1)."""
        from tqdm.auto import tqdm

        from ..core.embeddings import EmbeddingSet

        labels = np.full(len(paths), -1, np.int64) if labels is None else labels
        parts = []
        with tqdm(total=len(paths), desc="embed", unit="img", disable=not progress) as bar:
            for emb in self.iter_embeddings(paths, batch_size, num_workers):
                parts.append(emb)
                bar.update(len(emb))
        vectors = np.concatenate(parts) if parts else np.zeros((0, self.embedding_dim), np.float32)
        return EmbeddingSet(vectors, labels, paths=list(paths))

    def embed_folder(self, source: str | os.PathLike, **kwargs: Any) -> EmbeddingSet:
        """:meth:`embed_list` over :func:`list_inputs` (a folder or a list file)."""
        inputs = list_inputs(source)
        return self.embed_list(inputs.paths, inputs.labels, **kwargs)
