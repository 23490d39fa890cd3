"""Where a Milvus index lives, how to reach it and how its collections are laid out: :class:`Location`
(parsed from ``--uri`` or a ``milvus://`` spec), :func:`connect` (a bounded wait), :func:`milvus_errors`
(pymilvus's exceptions as one line that names the place), and the items' and metadata collections
(:func:`create_items`, :func:`create_meta`, :func:`read_meta`; the index itself is
:mod:`deepmetric.inference.milvus_backend`).

A location is a Milvus Lite file (``gallery.db``: an embedded Milvus that one process opens at a time)
or a Milvus server or cluster (``http://host:19530``, ``https://...``), and a collection in it::

    --uri gallery.db [--collection gallery]        milvus://gallery.db   milvus://data/gallery.db/shoes
    --uri http://host:19530 [--collection gallery] milvus://host:19530/gallery   milvus+https://host:443/gallery

The same code runs against both (pymilvus starts Milvus Lite for a ``.db`` path). A server that needs
credentials gets them from the environment variable ``MILVUS_TOKEN`` (``user:password`` or an API
key), never from the URI. Reaching a server waits at most :data:`CONNECT_TIMEOUT_S` seconds.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Optional

from .backends import SearchIndexError
from .faiss_compat import search_with_params

DEFAULT_COLLECTION = "gallery"
#: seconds a connection to a Milvus server may take before the command gives up
CONNECT_TIMEOUT_S = 5.0
#: seconds a search or query may take, and an insert or delete (Milvus Lite 3 holds an insert for minutes
#: while it compacts and indexes in the background): a hung server fails the request instead of holding it
READ_TIMEOUT_S, WRITE_TIMEOUT_S = 60.0, 600.0
TOKEN_ENV = "MILVUS_TOKEN"
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,199}$")  # Milvus's rule for collection names (255; room for a suffix)
_LITE = re.compile(r"^(?P<path>[^:]*\.db)(/(?P<name>[^/]+))?/?$")  # a path ending in .db, then a collection
_SERVER = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:(?P<port>[0-9]{1,5}))?(?P<rest>/.*)?$")


class MilvusUnavailableError(SearchIndexError):
    """Milvus did not answer, or failed: the change or search was not made (HTTP 503 in a server)."""

    status = 503


class MilvusRefusedError(SearchIndexError):
    """Milvus answered with an error (in Milvus's words); a server answers 500: nothing was changed."""

    status = 500


class MilvusMissingError(SearchIndexError):
    """pymilvus (or Milvus Lite) is not installed."""


@dataclass(frozen=True)
class Location:
    """``uri`` as pymilvus takes it (a ``.db`` path, or ``http(s)://host:port``) and the ``collection``."""

    uri: str
    collection: str

    @property
    def lite(self) -> bool:
        return not self.uri.startswith(("http://", "https://"))

    @property
    def spec(self) -> str:
        """The ``milvus://`` spec that names this location (what ``serve --index`` takes)."""
        if self.lite:
            return f"milvus://{self.uri}" + ("" if self.collection == DEFAULT_COLLECTION else f"/{self.collection}")
        scheme, _, address = self.uri.partition("://")
        return f"{'milvus' if scheme == 'http' else 'milvus+https'}://{address}/{self.collection}"

    def __str__(self) -> str:
        return f"{self.uri} (collection {self.collection})"

    @classmethod
    def of_uri(cls, uri: str, collection: Optional[str] = None) -> "Location":
        """From ``--uri`` (a ``.db`` path or ``http(s)://host:port[/collection]``) and ``--collection``."""
        text = str(uri).strip()
        if text.startswith("milvus"):
            return cls.of_spec(text, collection)
        if text.startswith(("http://", "https://")):
            scheme, _, rest = text.partition("://")
            return cls._server(scheme, rest, collection, f"--uri {uri}")
        if "://" in text or not text.endswith(".db"):
            raise SearchIndexError(f"--uri {uri}: expected a Milvus Lite file ending in .db (gallery.db) or a Milvus "
                                   "server address (http://host:19530)")
        return cls(os.path.abspath(text), _collection(collection, f"--uri {uri}"))

    @classmethod
    def of_spec(cls, spec: str, collection: Optional[str] = None) -> "Location":
        """From ``milvus://FILE.db[/collection]`` or ``milvus[+https]://host[:port][/collection]``."""
        text = str(spec).strip()
        scheme, sep, rest = text.partition("://")
        if not sep or scheme not in ("milvus", "milvus+https", "milvus+http") or not rest:
            raise SearchIndexError(f"{spec}: expected milvus://gallery.db (a Milvus Lite file) or "
                                   "milvus://host:19530/collection (a Milvus server)")
        lite = _LITE.match(rest)
        if lite and scheme == "milvus":
            return cls(os.path.abspath(lite.group("path")), _collection(lite.group("name") or collection, spec))
        return cls._server("https" if scheme == "milvus+https" else "http", rest, collection, spec)

    @classmethod
    def _server(cls, scheme: str, rest: str, collection: Optional[str], what: str) -> "Location":
        m = _SERVER.match(rest)
        if not m or (m.group("port") and not 0 < int(m.group("port")) < 65536):
            raise SearchIndexError(f"{what}: not a Milvus address; expected host:port (host:19530), optionally "
                                   "followed by /collection")
        name = (m.group("rest") or "").strip("/") or collection
        return cls(f"{scheme}://{m.group('host')}:{m.group('port') or 19530}", _collection(name, what))


def _collection(name: Optional[str], what: str) -> str:
    name = name or DEFAULT_COLLECTION
    if not _NAME.match(name):
        raise SearchIndexError(f"{what}: collection name {name!r}: Milvus takes letters, digits and underscores, "
                               "starting with a letter or underscore (at most 200 here)")
    return name


def import_pymilvus() -> Any:
    """pymilvus, with its logging quieted: its errors reach the user as our one-line errors (and Milvus Lite 3,
    a gRPC server in this process, logs a traceback for each call it lacks, which pymilvus then works around)."""
    try:
        import pymilvus
    except ImportError:
        raise MilvusMissingError("a Milvus index needs pymilvus and Milvus Lite, which are not installed: "
                                 "pip install 'deepmetric[milvus]'") from None
    for name in ("pymilvus", "milvus_lite", "grpc._server"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # Milvus Lite 3 loads FAISS: INFO noise
    search_with_params()  # Milvus Lite 3 searches FAISS with params, which faiss.contrib.torch_utils drops
    return pymilvus


def connect(location: Location, create: bool = False, timeout: Optional[float] = None) -> Any:
    """A ``MilvusClient`` of ``location`` (Milvus Lite started for a ``.db``); ``create``: a missing Lite
    file may be made. One line and no wait beyond ``timeout`` seconds (default :data:`CONNECT_TIMEOUT_S`)
    when Milvus is not there."""
    timeout = CONNECT_TIMEOUT_S if timeout is None else float(timeout)
    pymilvus = import_pymilvus()
    if location.lite:
        path = Path(location.uri)
        if not path.parent.is_dir():
            raise SearchIndexError(f"{path}: the folder {path.parent} does not exist")
        if not create and not path.exists():
            raise SearchIndexError(f"{path}: no Milvus Lite file there; make one with deepmetric index build "
                                   f"--backend milvus --uri {path}")
        if importlib.util.find_spec("milvus_lite") is None:
            raise MilvusMissingError("a Milvus Lite file (.db) needs milvus-lite, which is not installed: "
                                     "pip install 'deepmetric[milvus]' (or point --uri at a Milvus server)") from None
    with milvus_errors(location, f"could not connect within {timeout:g} s"):
        return pymilvus.MilvusClient(location.uri, token=os.environ.get(TOKEN_ENV, ""), timeout=timeout)


@contextmanager
def milvus_errors(location: Location, doing: str, changing: bool = False) -> Iterator[None]:
    """pymilvus's (and gRPC's) exceptions raised inside, as one :class:`SearchIndexError` line naming
    ``location``. ``changing``: a write, whose outcome a timeout leaves unknown (the message says so)."""
    import grpc
    from pymilvus.exceptions import ConnectionConfigException, MilvusException

    try:
        yield
    except ConnectionConfigException as e:
        if location.lite:
            raise MilvusUnavailableError(
                f"{location.uri}: could not open this Milvus Lite file: another process has it open (Milvus Lite "
                "lets one process use a file at a time: change a served gallery through the server's POST /items "
                "and DELETE /items/{id}, or move to a Milvus server), or it is not a Milvus Lite file") from None
        raise SearchIndexError(f"{location.uri}: {_message(e)}") from None
    except (MilvusException, grpc.RpcError) as e:
        message = _message(e)
        if any(s in message.lower() for s in ("deadline", "retry timeout")):
            outcome = "; the change may still be made: look before you retry" if changing else ""
            raise MilvusUnavailableError(f"{location.uri}: Milvus did not answer in time ({doing}){outcome}") from None
        if any(s in message.lower() for s in _UNAVAILABLE):
            raise MilvusUnavailableError(f"{location.uri}: Milvus is not reachable ({doing}); check the address and "
                                         "that the server is running") from None
        raise MilvusRefusedError(f"{location}: Milvus refused ({doing}): {message}") from None


_UNAVAILABLE = ("fail connecting", "server unavailable", "unavailable", "retry run out")


def _message(e: Exception) -> str:
    text = str(getattr(e, "message", "") or e)
    return " ".join(text.split())[:400]


# -- the collections' layout --------------------------------------------------------------------------

FORMAT = 1  # of the metadata
MAX_K = 16384  # Milvus's largest limit (topk) per search
MAX_PATH, MAX_NAME = 4096, 1024  # VARCHAR bytes of path and label_name
#: build parameters -> Milvus's names; search parameters -> Milvus's names
BUILD_PARAMS = {"M": "M", "ef_construction": "efConstruction", "nlist": "nlist"}
SEARCH_PARAMS = {"ef_search": "ef", "nprobe": "nprobe"}
INDEX_TYPES = ("AUTOINDEX", "FLAT", "HNSW", "IVF_FLAT", "IVF_SQ8", "IVF_PQ", "HNSW_SQ", "DISKANN")
RANGES = {"M": (2, 512), "ef_construction": (1, 1 << 16), "nlist": (1, 65536), "ef_search": (1, 1 << 16),
          "nprobe": (1, 65536)}


def check_params(params: Dict[str, Any]) -> Dict[str, Any]:
    """``index_type`` and the integer parameters of a Milvus index, each checked."""
    params = dict(params)
    unknown = set(params) - {"index_type", *RANGES}
    if unknown:
        raise SearchIndexError(f"backend milvus: unknown parameter(s) {sorted(unknown)} (valid: index_type, "
                               f"{', '.join(RANGES)})")
    kind = str(params.get("index_type", "AUTOINDEX")).upper()
    if kind not in INDEX_TYPES:
        raise SearchIndexError(f"backend milvus: index_type {kind!r} (valid: {', '.join(INDEX_TYPES)})")
    params["index_type"] = kind
    for key, (lo, hi) in RANGES.items():
        value = params.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi):
            raise SearchIndexError(f"backend milvus: {key} must be an integer from {lo} to {hi}, got {value!r}")
    return params


def meta_name(collection: str) -> str:
    """The collection of an index's metadata and class names, beside its items."""
    return f"{collection}__meta"


def in_list(field: str, values: Iterable[Any]) -> str:
    """``field in [...]`` ("" for no values: Milvus Lite 2.5 cannot run an empty list)."""
    values = list(values)
    if not values:
        return ""
    return f"{field} in [{', '.join(json.dumps(v) if isinstance(v, str) else str(int(v)) for v in values)}]"


def create_items(client: Any, pymilvus: Any, name: str, dim: int, params: Dict[str, Any]) -> None:
    """The items' collection: ``id`` (Milvus's), ``vector`` (inner product), ``label``, ``label_name``,
    ``path``, ``camera``; strong consistency, so a search sees every change acknowledged before it."""
    DataType = pymilvus.DataType
    schema = client.create_schema(auto_id=True, enable_dynamic_field=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("label", DataType.INT64)
    schema.add_field("label_name", DataType.VARCHAR, max_length=MAX_NAME)
    schema.add_field("path", DataType.VARCHAR, max_length=MAX_PATH)
    schema.add_field("camera", DataType.INT64)
    index = client.prepare_index_params()
    build = {BUILD_PARAMS[k]: v for k, v in params.items() if k in BUILD_PARAMS and v is not None}
    index.add_index(field_name="vector", index_type=params["index_type"], metric_type="IP", params=build)
    client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")


def create_meta(client: Any, pymilvus: Any, name: str) -> None:
    """The metadata collection: the row ``index`` (JSON) and one row ``class:<name>`` per class name."""
    DataType = pymilvus.DataType
    schema = client.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=MAX_NAME + 8)
    schema.add_field("label", DataType.INT64)
    schema.add_field("value", DataType.VARCHAR, max_length=65535)
    schema.add_field("vec", DataType.FLOAT_VECTOR, dim=2)  # Milvus wants a vector field in every collection
    index = client.prepare_index_params()
    index.add_index(field_name="vec", index_type="FLAT", metric_type="L2")
    client.create_collection(name, schema=schema, index_params=index, consistency_level="Strong")


def read_meta(client: Any, location: Location) -> Dict[str, Any]:
    """The index's metadata; one line when the collection, or deepmetric's metadata beside it, is not there."""
    name, side = location.collection, meta_name(location.collection)
    if not client.has_collection(name):
        have = [c for c in client.list_collections() if not c.endswith("__meta")]
        raise SearchIndexError(f"{location.uri}: no collection {name!r} (there are: {', '.join(have) or 'none'}); "
                               f"build one with deepmetric index build --backend milvus --uri {location.uri} "
                               f"--collection {name}")
    if not client.has_collection(side):
        raise SearchIndexError(f"{location}: not a deepmetric index (no {side} collection beside it); build it "
                               "with deepmetric index build --backend milvus")
    client.load_collection(side)
    rows = client.query(side, filter='key == "index"', output_fields=["value"])
    try:
        meta = json.loads(rows[0]["value"])
        if meta.get("format") != FORMAT or meta.get("metric") != "cosine" or int(meta["dim"]) < 1:
            raise ValueError(f"format {meta.get('format')}")
    except (IndexError, KeyError, TypeError, ValueError) as e:
        raise SearchIndexError(f"{location}: its metadata is missing or unreadable ({e}); rebuild it") from None
    return meta
