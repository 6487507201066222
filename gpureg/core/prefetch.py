"""Overlap host-to-device copies with compute: the next volume is copied on a side CUDA stream.

:class:`HostToDevicePrefetcher` keeps at most one volume in flight, so the
reference, the current and the next volume are all that live on the device
(DESIGN.md "Streaming"). It needs CuPy and a GPU to run, neither to be imported.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .config import submit
from .cuda_loader import require_cupy

__all__ = ["HostToDevicePrefetcher"]


class HostToDevicePrefetcher:
    """Loads volumes of a series onto the GPU one step ahead, overlapping compute.

    A worker thread reads ``volumes[i]`` on the host (an h5py dataset is read
    there), converts it to float32 into a pinned buffer and copies it to the
    device on its own non-blocking CUDA stream, while the caller's kernels run
    on theirs. :meth:`take` waits for that copy; at most the volume being
    taken and the one being fetched are held by the prefetcher.

    Parameters
    ----------
    volumes : sequence of (Z, Y, X) arrays
        NumPy arrays, h5py datasets, CuPy arrays (passed through) or a
        ``(n, Z, Y, X)`` array.
    """

    def __init__(self, volumes):
        cp = require_cupy()
        self._cp = cp
        self._volumes = volumes
        self._device = cp.cuda.Device()
        self._stream = cp.cuda.Stream(non_blocking=True)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpureg-h2d")
        self._pending = {}
        self._pinned = None

    def submit(self, index: int) -> None:
        """Start loading ``volumes[index]`` in the background (no-op when already pending).

        Call it from the thread whose stream consumes the volumes: the device
        buffer is allocated here, on that thread's current stream, and the copy
        waits for an event recorded there after the allocation. Memory the
        pool hands out may have been freed by this consumer while its kernels
        still read it; the event orders the copy after them (also with
        per-thread default streams, where another thread cannot name this
        thread's stream).
        """
        if index in self._pending:
            return
        out = ready = None
        shape, kind = self._describe(index)
        if shape is not None and len(shape) == 3 and kind in "biuf":
            with self._device:
                out = self._cp.empty(shape, dtype=self._cp.float32)
                ready = self._cp.cuda.Event(disable_timing=True)
                ready.record()  # on the current (consuming) stream of the calling thread
        self._pending[index] = submit(self._pool, self._load, index, out, ready)  # in the caller's gpureg.config

    def take(self, index: int):
        """``volumes[index]`` on the device (float32 CuPy array), waiting for its copy.

        Volumes that are not real 3D arrays are returned as they are, for the
        caller's validation to report.
        """
        self.submit(index)
        return self._pending.pop(index).result()

    def close(self) -> None:
        """Wait for the worker and drop pending volumes."""
        self._pool.shutdown(wait=True)
        self._pending.clear()
        self._pinned = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _describe(self, index):
        """(shape, dtype kind) of ``volumes[index]`` without reading it, or (None, "")."""
        vols = self._volumes
        if getattr(vols, "ndim", None) == 4 and hasattr(vols, "dtype"):
            return tuple(vols.shape[1:]), np.dtype(vols.dtype).kind
        src = vols[index]
        if type(src).__module__.split(".")[0] == "cupy" or not hasattr(src, "shape") or not hasattr(src, "dtype"):
            return None, ""
        return tuple(src.shape), np.dtype(src.dtype).kind

    def _load(self, index, out, ready):
        src = self._volumes[index]
        if type(src).__module__.split(".")[0] == "cupy":
            return src
        host = np.asarray(src)
        if host.ndim != 3 or host.dtype.kind not in "biuf":
            return host
        with self._device:
            if out is None or out.shape != host.shape:  # a sequence without shape/dtype attributes
                with self._stream:
                    out = self._cp.empty(host.shape, dtype=self._cp.float32)
                ready = None
            pinned = self._pinned_buffer(host.shape)
            np.copyto(pinned, host, casting="unsafe")
            if ready is not None:
                self._stream.wait_event(ready)
            out.set(pinned, stream=self._stream)
            # The pinned buffer is reused by the next load: wait for this copy (in the worker thread only).
            self._stream.synchronize()
        return out

    def _pinned_buffer(self, shape):
        if self._pinned is None or self._pinned.shape != tuple(shape):
            import cupyx

            self._pinned = None
            self._pinned = cupyx.empty_pinned(tuple(shape), dtype=np.float32)
        return self._pinned
