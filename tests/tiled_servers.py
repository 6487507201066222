"""Real Tiled servers for the tests (and bench/live_tiled.py): started on a free 127.0.0.1 port, torn down after.

``directory(folder)`` is ``tiled serve directory`` over files; ``catalog(folder)``
is a writable catalog on SQLite in ``folder`` (created on the first start, kept
across :meth:`TiledServer.restart`, so a server stopped mid-run comes back with its
data), allowed to read the external detector files Bluesky's ``TiledWriter``
registers. By default it streams updates to subscribers (an in-memory streaming
cache: ``tiled serve config`` with ``streaming_cache: {uri: memory}``, since
``tiled serve catalog --cache memory`` fails in Tiled 0.2.20); ``streaming=False``
serves it with ``tiled serve catalog``, which refuses subscriptions (HTTP 500).
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

KEY = "gpuregtestkey5e1f"  # the single-user API key of the test servers


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TiledServer:
    """One ``tiled serve ...`` process; ``uri`` is its root (``http://127.0.0.1:PORT/api/v1/metadata``)."""

    def __init__(self, args, log, ready_text=None, timeout=60.0):
        self.args, self.log, self.ready_text, self.timeout = args, Path(log), ready_text, timeout
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}/api/v1/metadata"
        self.proc = None
        self.start()

    def start(self):
        exe = shutil.which("tiled")
        cmd = [exe] if exe else [sys.executable, "-m", "tiled"]
        env = {**os.environ, "TILED_RETRY_ATTEMPTS": "1"}
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen([*cmd, "serve", *self.args, "--api-key", KEY, "--host", "127.0.0.1",
                                          "--port", str(self.port)], stdout=fh, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        self._wait()
        self.args = [a for a in self.args if a != "--init"]  # a restart keeps the catalog

    def _wait(self):
        import httpx

        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tiled server exited: {self.log.read_text()[-2000:]}")
            try:
                ok = httpx.get(f"http://127.0.0.1:{self.port}/api/v1/", timeout=1.0).status_code == 200
            except httpx.HTTPError:
                ok = False
            if ok and (self.ready_text is None or self.ready_text in self.log.read_text(errors="replace")):
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"tiled server not ready in {self.timeout} s: {self.log.read_text()[-2000:]}")

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def restart(self):
        self.stop()
        self.start()


def directory(folder, log):
    """``tiled serve directory FOLDER`` (read-only), ready once its files are indexed."""
    return TiledServer(["directory", str(folder)], log, ready_text="Indexing complete")


def catalog(folder, readable, log, streaming=True):
    """A writable catalog on ``folder/catalog.db`` (arrays written into ``folder/data``, tables into
    ``folder/tables.sqlite``), reading ``readable``; ``streaming``: with a streaming cache (see the module)."""
    folder = Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    db = folder / "catalog.db"
    tables = folder / "tables.sqlite"
    if not tables.exists():
        # WAL journal (kept in the file): readers polling the run no longer lock out the RunEngine's appends,
        # which otherwise got HTTP 500 "database is locked" and could abort the scan.
        import sqlite3

        with sqlite3.connect(tables) as con:
            con.execute("PRAGMA journal_mode=WAL")
    if streaming:
        config = folder / "tiled-config.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "trees": [{"path": "/", "tree": "catalog", "args": {
                "uri": f"sqlite:///{db}", "writable_storage": [str(folder / "data"), f"sqlite:///{tables}"],
                "readable_storage": [str(readable)], "init_if_not_exists": True}}],
            "streaming_cache": {"uri": "memory"}}))
        return TiledServer(["config", str(config)], log)
    init = [] if db.exists() else ["--init"]
    return TiledServer(["catalog", str(db), *init, "--write", str(folder / "data"), "--write",
                        f"sqlite:///{tables}", "--read", str(readable)], log)
