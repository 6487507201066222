"""Inputs served by a Tiled server, read lazily through the Tiled client (``pip install 'gpureg[live]'``).

A URI ``http(s)://HOST[:PORT]/api/v1/metadata/PATH`` (as ``tiled.client.from_uri``
takes it; short form ``tiled+http(s)://HOST:PORT/PATH``) names a container:

- one HDF5 file served by ``tiled serve directory`` (a container mirroring the
  file's groups), in any layout of :mod:`gpureg.io.detect` (Data Exchange, FXI,
  NXtomo): :class:`TiledFile` presents it to the readers as an open ``h5py``
  file would (groups, datasets, attributes = Tiled metadata), and a dataset
  slice fetches only the blocks it covers;
- a folder of such files (its children are the per-energy "files");
- a Bluesky run written by ``TiledWriter`` (:mod:`gpureg.io.tiled_run`).

The API key comes from ``--api-key-file`` (:func:`use_api_key_file`) or the
``TILED_API_KEY`` environment variable; it is never printed, logged or written.
A server that goes away is retried with backoff by :func:`retrying` (one log
line when it goes, one when it is back).
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import numpy as np

from ..core.config import getenv
from .files import InputError

__all__ = ["TiledFile", "TiledUnavailable", "connect", "describe_node", "family", "is_bluesky_run", "normalize_uri",
           "parts", "read_columns", "retrying", "set_outage_limit", "translate_errors", "use_api_key_file"]

_log = logging.getLogger("gpureg")
_BLOCK_BYTES = 64 << 20  # one request fetches at most this much of an array
_KEY_FILE = None
_OUTAGE_S = 120.0


class TiledUnavailable(InputError):
    """The server did not answer (connection refused, timed out, 5xx) for longer than allowed."""


def normalize_uri(uri: str) -> str:
    """``tiled+http://HOST:PORT/PATH`` -> ``http://HOST:PORT/api/v1/metadata/PATH``; other URIs unchanged."""
    m = re.match(r"^tiled\+(https?)://([^/]+)/?(.*)$", uri, re.IGNORECASE)
    if m is None:
        return uri
    return f"{m.group(1)}://{m.group(2)}/api/v1/metadata/{m.group(3)}".rstrip("/")


def use_api_key_file(path) -> None:
    """Read the API key from this file (first line) instead of ``TILED_API_KEY``; None forgets it."""
    global _KEY_FILE
    if path is not None and not Path(path).is_file():
        raise InputError(f"{path}: --api-key-file not found")
    _KEY_FILE = None if path is None else Path(path)


def _api_key():
    if _KEY_FILE is not None:
        key = _KEY_FILE.read_text(encoding="utf-8").strip().splitlines()
        if not key:
            raise InputError(f"{_KEY_FILE}: --api-key-file is empty")
        return key[0].strip(), f"--api-key-file {_KEY_FILE}"
    key = getenv("TILED_API_KEY")
    return (key.strip(), "TILED_API_KEY") if key and key.strip() else (None, None)


def set_outage_limit(seconds: float) -> None:
    """How long reads keep retrying a server that went away (default 120 s; ``gpureg watch`` sets its own)."""
    global _OUTAGE_S
    _OUTAGE_S = float(seconds)


def _import_client():
    try:
        from tiled.client import from_uri
        from tiled.client import utils as client_utils
    except ImportError:
        raise InputError("reading from a Tiled server needs the Tiled client: pip install 'gpureg[live]'") from None
    if getenv("TILED_RETRY_ATTEMPTS") is None:  # gpureg retries itself (retrying): one line per outage
        client_utils.TILED_RETRY_ATTEMPTS = 1
    return from_uri


def connect(uri: str, *, retry_for: float = 0.0):
    """The Tiled client node at ``uri`` (a container or an array).

    Parameters
    ----------
    uri : str
        ``http(s)://HOST[:PORT]/api/v1/metadata/PATH`` or ``tiled+http(s)://HOST:PORT/PATH``.
    retry_for : float
        Seconds to keep retrying an unreachable server (0: fail at once).

    Raises
    ------
    InputError
        One line: the server cannot be reached, refuses the credential (naming
        which one is missing or refused), or has no node at this path.
    """
    from_uri = _import_client()
    full = normalize_uri(uri)
    key, source = _api_key()
    return retrying(lambda: translate_errors(lambda: from_uri(full, api_key=key), full, source), full, retry_for)


def retrying(fn, what: str, retry_for: float, *, max_wait: float = 5.0):
    """Call ``fn()``, retrying while the server is unreachable (backoff 0.25 s doubling to ``max_wait``).

    One warning when the server goes away and one when it is back; after
    ``retry_for`` seconds of outage the :class:`TiledUnavailable` is raised.

    Parameters
    ----------
    fn : callable
        Raises :class:`TiledUnavailable` while the server does not answer (see :func:`translate_errors`).
    what : str
        The URI (its host is named when the server is back).
    retry_for : float
        Seconds of outage tolerated (0: no retry).
    max_wait : float
        Longest pause between tries, seconds.

    Returns
    -------
    object
        What ``fn()`` returns.
    """
    start, wait, told = None, 0.25, False
    while True:
        try:
            out = fn()
        except TiledUnavailable as exc:
            now = time.monotonic()
            start = now if start is None else start
            if now - start >= retry_for:
                raise
            if not told:
                _log.warning("gpureg: %s; retrying (up to %g s)", str(exc).splitlines()[0], retry_for)
                told = True
            time.sleep(wait)
            wait = min(2 * wait, max_wait)
            continue
        if told:
            _log.warning("gpureg: Tiled server back after %.1f s outage: %s", time.monotonic() - start, _host(what))
        return out


def _host(uri):
    m = re.match(r"^[a-z+]+://([^/]+)", uri)
    return m.group(1) if m else uri


def translate_errors(fn, uri, key_source=None):
    """Run ``fn()``; Tiled/HTTP errors become one-line :class:`InputError` (:class:`TiledUnavailable` when the
    server does not answer)."""
    import httpx

    try:
        return fn()
    except httpx.HTTPStatusError as exc:
        code = exc.response.status_code
        if code in (401, 403):
            raise _credential_error(uri, key_source, code) from None
        if code == 404:
            raise InputError(f"{uri}: no such node on the Tiled server (HTTP 404)") from None
        if code >= 500:
            raise TiledUnavailable(f"{uri}: Tiled server error (HTTP {code})") from None
        raise InputError(f"{uri}: Tiled server answered HTTP {code}") from None
    except RuntimeError as exc:
        if "api key" not in str(exc).lower():  # tiled's own message when a server refuses anonymous access
            raise
        raise _credential_error(uri, key_source, None) from None
    except (httpx.TransportError, ConnectionError) as exc:
        raise TiledUnavailable(f"Tiled server at {_host(uri)} unreachable ({type(exc).__name__})") from None
    except KeyError as exc:
        raise InputError(f"{uri}: no node {exc} on the Tiled server") from None


def family(node) -> str:
    """``"container"``, ``"array"``, ``"table"`` ... of a Tiled client node."""
    fam = getattr(node, "structure_family", None)
    return str(getattr(fam, "value", fam) or "unknown")


class TiledDataset:
    """An ``h5py.Dataset``-like view of a Tiled array: ``shape``, ``ndim``, ``dtype``, ``attrs``, slicing."""

    def __init__(self, node, uri):
        self._node, self.uri = node, uri
        self.shape = tuple(int(n) for n in node.shape)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(node.dtype)
        self.attrs = dict(node.metadata)

    def __len__(self):
        return self.shape[0]

    def __getitem__(self, key):
        if key is Ellipsis or (isinstance(key, tuple) and not key):
            key = (slice(None),) * max(self.ndim, 1)
        if not isinstance(key, tuple):
            key = (key,)
        first, rest = key[0], tuple(key[1:])
        if isinstance(first, (list, np.ndarray)):  # integer indices on the first axis: contiguous runs
            idx = np.asarray(first, dtype=np.int64).reshape(-1)
            if idx.size == 0:
                return np.zeros((0, *self.shape[1:]), dtype=self.dtype)[(slice(None), *rest)]
            cuts = np.flatnonzero(np.diff(idx) != 1) + 1
            parts = [self._blocks(slice(int(r[0]), int(r[-1]) + 1), rest) for r in np.split(idx, cuts)]
            return np.concatenate(parts)
        return self._blocks(first, rest)

    def _blocks(self, first, rest):
        """Read ``[first, *rest]`` in requests of at most ``_BLOCK_BYTES`` (split along the first axis)."""
        if isinstance(first, slice) and self.ndim:
            lo, hi, step = first.indices(self.shape[0])
            per = self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))
            rows = max(1, _BLOCK_BYTES // max(per, 1))
            if step == 1 and hi - lo > rows:
                return np.concatenate([self._read((slice(a, min(a + rows, hi)), *rest))
                                       for a in range(lo, hi, rows)])
        return self._read((first, *rest))

    def _read(self, key):
        key = tuple(_plain(k) for k in key)
        return retrying(lambda: translate_errors(lambda: np.asarray(self._node[key]), self.uri), self.uri, _OUTAGE_S)


def _plain(k):
    """NumPy integers -> int (the client's slice parser takes Python ints only)."""
    if isinstance(k, slice):
        return slice(*(None if v is None else int(v) for v in (k.start, k.stop, k.step)))
    return int(k) if isinstance(k, np.integer) else k


def parts(node, uri) -> dict:
    """A container's children (name -> client node) in one listing; of a composite node (a Bluesky stream) its
    parts, tables and arrays, rather than the flattened columns its client shows."""
    base = getattr(node, "base", node)
    return retrying(lambda: translate_errors(lambda: dict(base.items()), uri), uri, _OUTAGE_S)


def read_columns(node, uri, columns) -> dict:
    """Columns of a Tiled table as NumPy arrays (name -> array), all rows, in one request."""
    frame = retrying(lambda: translate_errors(lambda: node.read(columns=list(columns)), uri), uri, _OUTAGE_S)
    return {c: np.asarray(frame[c].to_numpy()) for c in columns}


class TiledGroup:
    """An ``h5py.Group``-like view of a Tiled container: ``in``, ``[name]`` (``a/b`` paths), ``items()``, ``attrs``."""

    def __init__(self, node, uri):
        self._node, self.uri = node, uri.rstrip("/")
        self.attrs = dict(node.metadata)
        self.node = node
        self._keys = None
        self._children = {}

    def keys(self):
        if self._keys is None:  # one paged listing brings every child's structure and metadata
            self._nodes = retrying(lambda: translate_errors(lambda: dict(self._node.items()), self.uri), self.uri,
                                   _OUTAGE_S)
            self._keys = list(self._nodes)
        return list(self._keys)

    def __iter__(self):
        return iter(self.keys())

    def __contains__(self, name):
        head, _, tail = str(name).strip("/").partition("/")
        if head not in self.keys():
            return False
        if not tail:
            return True
        child = self[head]
        return isinstance(child, TiledGroup) and tail in child

    def __getitem__(self, name):
        head, _, tail = str(name).strip("/").partition("/")
        if head not in self._children:
            if head not in self.keys():
                raise KeyError(f"{self.uri}/{head}")
            node = self._nodes[head]
            uri = f"{self.uri}/{head}"
            self._children[head] = TiledGroup(node, uri) if family(node) in ("container", "composite") \
                else TiledDataset(node, uri)
        child = self._children[head]
        return child[tail] if tail else child

    def items(self):
        return [(k, self[k]) for k in self.keys()]

    def visititems(self, func):
        """Call ``func(name, obj)`` for every descendant (``h5py`` order: depth first)."""
        def walk(group, prefix):
            for k, obj in group.items():
                name = f"{prefix}{k}"
                func(name, obj)
                if isinstance(obj, TiledGroup):
                    walk(obj, name + "/")
        walk(self, "")

    def close(self):
        """Nothing to release (the HTTP connection belongs to the client)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class TiledFile:
    """One Tiled container standing for one HDF5 file: what :func:`gpureg.io.base.open_group` opens.

    ``str()`` is its URI; ``name``/``stem`` its key (energies in names such as
    ``scan_6552eV`` are read as for files).
    """

    def __init__(self, node, uri):
        self.node, self.uri = node, uri.rstrip("/")
        self.name = self.stem = self.uri.rsplit("/", 1)[-1]
        self._group = None

    def open_group(self):
        """The container as an ``h5py.File``-like :class:`TiledGroup` (one per file: its listings are kept)."""
        if self._group is None:
            self._group = TiledGroup(self.node, self.uri)
        return self._group

    def is_file(self):
        return True

    def __str__(self):
        return self.uri

    def __repr__(self):
        return f"<TiledFile {self.uri}>"


def is_bluesky_run(node) -> bool:
    """True for a run container written by Bluesky's ``TiledWriter`` (spec ``BlueskyRun`` or a ``start`` document)."""
    specs = [getattr(s, "name", s) for s in (getattr(node, "specs", None) or [])]
    return family(node) == "container" and ("BlueskyRun" in specs or "start" in getattr(node, "metadata", {}))


def describe_node(node, uri) -> str:
    """What a node holds, in words (for the 'not a tomography container' error)."""
    fam = family(node)
    if fam == "array":
        return f"an array of shape {tuple(node.shape)} ({node.dtype})"
    if fam in ("container", "composite"):
        keys = translate_errors(lambda: list(node), uri)
        shown = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
        return f"a container of {len(keys)} entries ({shown})" if keys else "an empty container"
    return f"a {fam}"


def _credential_error(uri, key_source, code):
    """The one-line error for a refused request: no key given, or which key was refused (HTTP ``code``)."""
    if key_source is None:
        key_source = _api_key()[1]
    if key_source is None:
        http = f" (HTTP {code})" if code else ""
        return InputError(f"{uri}: the Tiled server requires an API key{http} and none was given: set "
                          "TILED_API_KEY or pass --api-key-file FILE")
    return InputError(f"{uri}: the Tiled server refused the API key from {key_source} (HTTP {code or 401}): give a "
                      "key with read access (and write access for --publish)")
