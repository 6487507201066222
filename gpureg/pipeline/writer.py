"""Background writing of a run's per-energy results: one writer thread behind a bounded queue.

The processing thread hands each energy's volumes and numbers to :class:`BackgroundWriter` and goes on
with the next energy; the writer thread compresses and writes them (``ResultStore.write_energy``: data,
flush, then the ``done`` flag), so writing overlaps the next energy's reconstruction and registration.
At most ``depth`` energies wait (two by default: bounded memory). A write error (a full disk...) is raised
in the processing thread at its next :meth:`submit` or at :meth:`close`, and nothing after it is written.
Until an energy is written, its matrix is kept here (:attr:`pending`) so that warm starts see exactly what
a synchronous run would see.
"""

from __future__ import annotations

import contextvars
import queue
import threading
import time

__all__ = ["BackgroundWriter"]


class BackgroundWriter:
    """Run ``store.write_energy`` (and what follows it) in a thread, ``depth`` energies deep.

    Parameters
    ----------
    store : gpureg.io.results.ResultStore
        The run's result store.
    depth : int
        Energies that may wait to be written (the processing thread blocks beyond that).
    after : callable, optional
        ``after(i, write_seconds)`` called in the writer thread once energy ``i`` is written and flagged
        done (progress events, logs).
    """

    def __init__(self, store, *, depth: int = 2, after=None):
        self.store, self.after = store, after
        self.pending: dict[int, object] = {}  # energy index -> matrix, submitted but not yet written
        self.busy_seconds = 0.0               # time the writer thread spent writing
        self.wait_seconds = 0.0               # time the processing thread waited for it (what writing added)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(depth)))
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        # in the caller's gpureg.config context (a thread does not inherit contextvars)
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._work,),
                                        name="gpureg-writer", daemon=True)
        self._thread.start()

    def submit(self, i, recon, aligned, matrix, before, after, timings) -> None:
        """Queue energy ``i`` (the arguments of ``ResultStore.write_energy``); raises an earlier write error."""
        self._raise()
        with self._lock:
            self.pending[int(i)] = matrix
        t0 = time.perf_counter()
        try:
            while True:
                try:
                    self._queue.put((i, (recon, aligned, matrix, before, after, timings)), timeout=0.2)
                    return
                except queue.Full:
                    self._raise()  # the writer died while the queue was full: do not wait for ever
        finally:
            self.wait_seconds += time.perf_counter() - t0

    def close(self) -> None:
        """Wait until everything queued is written; raise the first write error, if any."""
        t0 = time.perf_counter()
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self.wait_seconds += time.perf_counter() - t0
        self._raise()
        self.store.record_writer(busy=self.busy_seconds, waited=self.wait_seconds)

    def abandon(self) -> None:
        """Stop after the write in progress (on an error or Ctrl-C in the processing thread); queued energies
        are dropped (they were never flagged done, so a rerun computes them again)."""
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is None:
            self.close()
        else:
            self.abandon()

    # --- writer thread ---------------------------------------------------------------------
    def _work(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is not None:
                continue  # drain without writing: nothing after a failed write is flagged done
            i, args = item
            t0 = time.perf_counter()
            try:
                self.store.write_energy(i, *args)
                seconds = time.perf_counter() - t0
                self.busy_seconds += seconds
                with self._lock:
                    self.pending.pop(int(i), None)
                if self.after is not None:
                    self.after(i, seconds)
            except BaseException as exc:  # noqa: BLE001 - handed to the processing thread, never swallowed
                self._error = exc

    def _raise(self):
        if self._error is not None:
            raise self._error
