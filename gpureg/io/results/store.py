"""Writing a run's result: :class:`ResultStore` (the ``.partial`` file: per-energy data, done flags, digests)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np

from ...core.signals import deferred
from ..files import InputError
from .compression import DEFAULT_COMPRESSION, dataset_filter, register_filters
from .extras import RunExtras
from .nexus import annotate_stack, check_storable, stack_dtype, write_nexus_views
from .space import Reserve, digest, disk_full, is_no_space
from .write import write_xanes

__all__ = ["GREY_STACKS", "ResultStore", "STAGES", "XANES_SKIPPED"]

_log = logging.getLogger("gpureg")

STAGES = ("load", "register", "apply", "write")
GREY_STACKS = ("recon", "aligned")  # the per-energy grey stacks of a result (what --keep chooses among)
XANES_MAPS = ("edge_energy", "edge_jump", "white_line", "mask")
XANES_SKIPPED = "xanes_skipped"  # root attribute: why the result has no /xanes maps (the energy grid cannot give them)


class ResultStore(RunExtras):
    """The ``.partial`` result file of a run: preallocated per-energy datasets and ``done`` flags.

    An energy is flagged done only after its data are on disk (:meth:`commit`:
    flush and fsync, then the flag, flush and fsync again), with a digest of
    its volumes that a resumed run checks, so a flagged energy is one that was
    written. A failed write (a full disk: :class:`~gpureg.io.results.space.DiskFullError`)
    stops the run at once; the store then gives back its reserve so that the
    file closes with what it held. ``complete`` is set only by :meth:`finish`,
    after a verified close.

    One thread writes at a time (the run's thread, or one writer thread behind
    a queue that calls :meth:`write_energy`, which ends with :meth:`commit`).
    """

    def __init__(self, h5, energies, ref, reserve=None):
        self.h5, self.energies, self.ref = h5, energies, ref
        self.path = Path(h5.filename)
        self.done = h5["registration/done"][...].astype(bool)
        ex = h5.get("registration/excluded")
        self.excluded = np.zeros(len(energies), bool) if ex is None else ex[...].astype(bool)
        self._reserve, self._ds, self._maps, self._grown = reserve, {}, {}, []
        self._swallowed, self._hook = [], None
        self._lock = threading.RLock()
        self._watch_unraisable()

    @classmethod
    def open(cls, path, reader, energies, ref, parameters: dict, checksum, *, fresh, attrs=None,
             compression: str = DEFAULT_COMPRESSION, store_dtype: str = "float32"):
        """Open (resume) or create ``path``.

        An existing file is resumed only when its input checksum, ``parameters``
        (JSON) and volume shape match; otherwise :class:`InputError`. ``attrs``:
        more root attributes (provenance, JSON for dicts and lists), also set on a resumed file.
        ``compression`` (:func:`~gpureg.io.results.parse_compression`) and ``store_dtype`` (``float32``, or
        ``float16``: lossy, see :data:`STORE_DTYPES`) apply to the ``/recon`` and ``/aligned``
        stacks of a new file; a resumed file keeps those it was created with.
        """
        import h5py

        register_filters()  # the stacks of a resumed file may need them

        from ...core.version import __version__

        shape = tuple(int(n) for n in reader.recon_shape)
        params = json.dumps(parameters)
        path = Path(path)
        if path.exists() and not fresh:
            store = cls._resume(path, energies, ref, params, checksum, shape)
            if store is not None:
                store._set_attrs(attrs)
                return store
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        reserve = Reserve(path)
        try:
            h5 = h5py.File(path, "w")
        except BaseException:
            reserve.release()
            raise
        n = len(energies)
        chunks = (1, min(16, shape[0]), shape[1], shape[2])
        h5.attrs.update({"gpureg_version": __version__, "device": parameters.get("device", ""), "parameters": params,
                         "input": str(reader.path), "input_checksum": checksum, "complete": False,
                         "convention": "registration/matrix: moving_from_reference, voxel indices (z, y, x)"})
        h5["energy"] = energies
        h5["energy"].attrs["units"] = "eV"
        h5.attrs["reference_index"] = ref
        if getattr(reader, "pixel_size_nm", None):
            h5.attrs["voxel_size_nm"] = float(reader.pixel_size_nm)
        dtype = stack_dtype(store_dtype)
        for name in GREY_STACKS:
            ds = h5.create_dataset(name, shape=(n, *shape), dtype=dtype, chunks=chunks,
                                   **dataset_filter(compression))
            annotate_stack(ds, compression, store_dtype)
        h5["registration/matrix"] = np.tile(np.eye(4), (n, 1, 1))
        for name in ("mse_before", "mse_after"):
            h5[f"registration/{name}"] = np.full(n, np.nan)
        h5["registration/done"] = np.zeros(n, dtype=bool)
        h5["registration/digest"] = np.zeros(n, dtype="S32")
        h5["registration/digest"].attrs["what"] = ("BLAKE2b-128 (hex) of recon[i] then aligned[i] as stored, read as "
                                                   "float32 bytes; checked when a run resumes")
        h5["registration/excluded"] = np.zeros(n, dtype=bool)
        h5["registration/excluded"].attrs["reasons"] = "{}"
        for stage in STAGES:
            h5[f"timings/{stage}"] = np.zeros(n)
            h5[f"timings/{stage}"].attrs["units"] = "s"
        truth = reader.truth()
        if truth:
            from ..dataexchange import write_group

            write_group(h5.create_group("truth"), truth)
        store = cls(h5, energies, ref, reserve)
        store._set_attrs(attrs)
        return store

    def _set_attrs(self, attrs):
        for key, value in (attrs or {}).items():
            self.h5.attrs[key] = json.dumps(value) if isinstance(value, (dict, list, tuple)) else value
        self._sync()

    @classmethod
    def _resume(cls, path, energies, ref, params, checksum, shape):
        """The store of an interrupted run at ``path`` (its done energies checked), ``None`` to start over."""
        import h5py

        try:
            h5 = h5py.File(path, "r+")
        except Exception as exc:  # noqa: BLE001 - any HDF5 failure: the file is ours, start over
            _log.warning("gpureg: %s is unreadable (%s); starting over", path, str(exc).splitlines()[0])
            return None
        try:
            same = (h5.attrs.get("input_checksum") == checksum and h5.attrs.get("parameters") == params
                    and h5["aligned"].shape[1:] == shape)
        except Exception as exc:  # noqa: BLE001
            _close_quietly(h5)
            _log.warning("gpureg: %s is damaged (%s); starting over", path, str(exc).splitlines()[0])
            return None
        if not same:
            h5.close()
            raise InputError(f"{path}: an interrupted run with a different input or parameters is here; "
                             "rerun with the same ones, or pass overwrite=True to start over")
        try:
            reserve = Reserve(path)
        except BaseException:
            h5.close()
            raise
        store = cls(h5, energies, ref, reserve)
        try:
            store._check_done()
        except BaseException:
            store.abandon()
            raise
        return store

    def _check_done(self):
        """Un-flag done energies whose stored volumes are unreadable or differ from their digest."""
        if "registration/digest" not in self.h5:
            return
        digests = self.h5["registration/digest"][...]
        bad = []
        for i in np.flatnonzero(self.done & ~self.excluded):
            try:
                ok = digest(self.h5["recon"][i], self.h5["aligned"][i]).encode() == digests[i]
            except Exception:  # noqa: BLE001 - an unreadable chunk is a damaged energy
                ok = False
            if not ok:
                bad.append(int(i))
        if bad:
            _log.warning("gpureg: %s: %s eV flagged done but not stored intact (a full disk?); computing again",
                         self.path, ", ".join(f"{self.energies[i]:g}" for i in bad))
            self._d("registration/done")[bad] = False
            self.done[bad] = False
            self._sync()

    def recon(self, i):
        return self.h5["recon"][i]

    def matrix(self, i):
        return self.h5["registration/matrix"][i]

    def stack(self, name: str = "aligned"):
        """The ``(n_energy, Z, Y, X)`` dataset ``aligned`` or ``aligned_global`` (read lazily)."""
        return self.h5[name]

    def has_stack(self, name: str) -> bool:
        """Whether the file holds the stack ``name`` (``aligned_global`` only in some runs)."""
        return name in self.h5

    def write_energy(self, i, recon, aligned, matrix, before, after, timings):
        """Write energy ``i`` and flag it done once it is on disk (:meth:`commit`)."""
        t0 = time.perf_counter()
        for name, volume in (("recon", recon), ("aligned", aligned)):
            check_storable(self._d(name), volume, f"{name} at {self.energies[i]:g} eV")
        dtype = self._d("recon").dtype  # the digest is of what is stored (float16 stacks: rounded)
        recon, aligned = np.ascontiguousarray(recon, dtype), np.ascontiguousarray(aligned, dtype)
        with self._lock, deferred():  # a signal waits until the energy is written and flagged (or not)
            self._check_space(recon.nbytes + aligned.nbytes)
            size0 = self._size()
            self._put("recon", i, recon)
            self._put("aligned", i, aligned)
            self._put("registration/matrix", i, matrix)
            self._put("registration/mse_before", i, before)
            self._put("registration/mse_after", i, after)
            for stage, secs in timings.items():
                self._put(f"timings/{stage}", i, secs)
            self._put("timings/write", i, time.perf_counter() - t0)
            self.commit(i, digest(recon, aligned))
            self._grown.append(max(self._size() - size0, 0))

    def commit(self, i, digest: str | None = None):
        """Flag energy ``i`` done, only after everything written so far is on disk.

        Flush and fsync (a failure raises: nothing is flagged), then the flag
        (and the ``digest`` of its volumes), flush and fsync again. Call it from
        the thread that wrote the energy's data.
        """
        with self._lock:
            self._sync()
            if digest is not None and "registration/digest" in self.h5:
                self._put("registration/digest", i, digest.encode())
            self._put("registration/done", i, True)
            self._sync()
            self.done[i] = True

    def record_writer(self, *, busy: float, waited: float):
        """Say on ``/timings/write`` that energies were written in the background (this run's totals, s)."""
        with self._lock:
            attrs = self._d("timings/write").attrs
            attrs["overlap"] = ("written by a background thread while the next energy was computed: per-energy "
                                "write times overlap the other stages; write_wait_s is what writing added")
            attrs["write_busy_s"] = attrs.get("write_busy_s", 0.0) + float(busy)
            attrs["write_wait_s"] = attrs.get("write_wait_s", 0.0) + float(waited)
            self._sync()

    def exclude(self, i, reason: str):
        """Leave energy ``i`` out (``--skip-bad-energies``): flagged done and excluded, ``reason`` recorded."""
        with self._lock, deferred():
            ds = self._d("registration/excluded")
            reasons = json.loads(ds.attrs.get("reasons", "{}"))
            reasons[f"{self.energies[i]:g}"] = reason
            ds[i] = True
            ds.attrs["reasons"] = json.dumps(reasons)
            self.excluded[i] = True
            self.commit(i)

    def bytes_needed(self, extra: float = 0.0) -> float:
        """Disk the rest of the run needs: the energies not done (at the size measured so far), the maps, ``extra``."""
        vol = 4.0 * float(np.prod(self.h5["aligned"].shape[1:]))
        per = float(np.mean(self._grown)) if self._grown else 2 * vol
        return per * float((~self.done).sum()) + 8 * vol + extra

    def used(self) -> np.ndarray:
        """Indices of the energies not excluded."""
        return np.flatnonzero(~self.excluded)

    def volumes(self, name: str = "aligned", indices=None) -> list:
        """Lazy per-energy views of a stack (``view[z0:z1]`` reads one slab), for ``indices`` (default: all used)."""
        ds = self.h5[name]
        return [_EnergyView(ds, int(i)) for i in (self.used() if indices is None else indices)]

    def write_xanes(self, maps, labels, *, group: str = "xanes", chemistry=None, attrs=None):
        """The ``/xanes`` (or ``/xanes_global``) group, see :func:`write_xanes`; checked again by :meth:`finish`."""
        import h5py

        with self._lock:
            self._check_space(8 * 4.0 * float(np.prod(self.h5["aligned"].shape[1:])))
            g = write_xanes(self.h5, maps, labels, group=group, chemistry=chemistry, attrs=attrs)
            if group == "xanes" and XANES_SKIPPED in self.h5.attrs:  # a resumed run that now maps
                del self.h5.attrs[XANES_SKIPPED]
            self._sync()
            self._maps.update({f"{group}/{k}": digest(g[k][...]) for k in g if isinstance(g[k], h5py.Dataset)})

    def skip_xanes(self, reason: str):
        """No edge maps: record ``reason`` (one line) as the root attribute ``xanes_skipped``, and remove any
        ``/xanes`` or ``/xanes_global`` group an earlier attempt left."""
        with self._lock:
            for group in ("xanes", "xanes_global"):
                if group in self.h5:
                    del self.h5[group]
                    self._maps = {k: d for k, d in self._maps.items() if not k.startswith(f"{group}/")}
            self.h5.attrs[XANES_SKIPPED] = str(reason).splitlines()[0] if str(reason) else "unknown"
            self._sync()

    def finish(self):
        """Mark the file complete, close it, and check it: reopened, every energy done, the maps as written.

        Raises (and the run does not rename the file) when any of it fails.
        """
        import h5py

        with self._lock, deferred():
            write_nexus_views(self.h5)
            try:
                self.close(release=False)  # the reserve stays until complete=True is on disk
            except BaseException:
                self._release()
                raise
            try:
                with h5py.File(self.path, "r") as h5:
                    ok = bool(h5["registration/done"][...].all())
                    bad = [k for k, d in self._maps.items() if digest(h5[k][...]) != d]
            except Exception as exc:  # noqa: BLE001
                self._release()
                raise OSError(f"{self.path}: the finished file cannot be read back "
                              f"({str(exc).splitlines()[0]})") from None
            if not ok or bad:
                self._release()
                raise OSError(f"{self.path}: the finished file does not read back as written "
                              f"({'energies not done' if not ok else ', '.join(bad)}); run the same command again")
            try:
                with h5py.File(self.path, "r+") as h5:  # verified: now it says so
                    h5.attrs["complete"] = True
            finally:
                self._release()

    def close(self, *, release: bool = True):
        """Close the file; a failure raises (after giving back the reserve, so that HDF5 can finish its writes).
        ``release=False`` keeps the reserve after a successful close (:meth:`finish` writes once more)."""
        with self._lock:
            if not self.h5.id.valid:
                return
            try:
                self._sync()
                self._ds.clear()
                self.h5.close()
            except Exception as exc:
                self._release()
                try:
                    needed = self.bytes_needed()
                except Exception:  # noqa: BLE001 - the file is in no state to say
                    needed = 0.0
                self._ds.clear()
                _close_quietly(self.h5)
                if is_no_space(exc):
                    raise disk_full(self.path.parent, needed) from None
                raise
            finally:
                self._unwatch_unraisable()
            if release:
                self._release()

    def abandon(self):
        """Close after a failure elsewhere, never raising (a close that fails is logged)."""
        try:
            self.close()
        except Exception as exc:  # noqa: BLE001 - the first error is the one the user sees
            _log.warning("gpureg: %s: closing after the error failed too (%s)", self.path, str(exc).splitlines()[0])

    # --- writing safely ---------------------------------------------------------------------
    def _d(self, name):
        """An open handle of dataset ``name``, kept: its chunks are written by :meth:`_sync` (where a failure
        raises), not when a temporary handle is garbage-collected (where HDF5's error would be ignored)."""
        ds = self._ds.get(name)
        if ds is None:
            ds = self._ds[name] = self.h5[name]
        return ds

    def _put(self, name, i, value):
        with self._lock:  # the writer thread and the processing thread (alignment, particles) both write
            try:
                self._d(name)[i] = value
            except Exception as exc:  # noqa: BLE001
                self._failed(exc)

    def _sync(self):
        """Flush HDF5 and fsync the file; a failed write raises :class:`DiskFullError` (or the write's error)."""
        try:
            self.h5.flush()
            with contextlib.suppress(NotImplementedError, ValueError, AttributeError):
                os.fsync(self.h5.id.get_vfd_handle())
        except Exception as exc:  # noqa: BLE001
            self._failed(exc)
        if self._swallowed:
            self._failed(self._swallowed[0])

    def _failed(self, exc):
        """A write failed: give back the reserve (HDF5 can then close the file), raise the one-line error."""
        self._release()
        if is_no_space(exc):
            raise disk_full(self.path.parent, self.bytes_needed()) from None
        raise OSError(f"{self.path}: writing failed ({str(exc).splitlines()[0]})") from None

    def _check_space(self, upper: float):
        """Stop before writing ``upper`` bytes (or the projected rest of the run) that the disk no longer holds."""
        free = shutil.disk_usage(self.path.parent).free
        need = float(np.mean(self._grown)) if self._grown else upper
        if need > free or (self._grown and self.bytes_needed() > free):
            raise disk_full(self.path.parent, self.bytes_needed())

    def _size(self) -> int:
        try:
            return os.stat(self.path).st_size
        except OSError:
            return 0

    def _release(self):
        if self._reserve is not None:
            self._reserve.release()

    def _watch_unraisable(self):
        """Collect HDF5 write errors that h5py can only report as 'Exception ignored' (temporary handles)."""
        previous = sys.unraisablehook

        def hook(unraisable):
            if is_no_space(unraisable.exc_value) or "file write failed" in str(unraisable.exc_value):
                self._swallowed.append(unraisable.exc_value)
                return
            previous(unraisable)

        self._hook, self._previous_hook = hook, previous
        sys.unraisablehook = hook

    def _unwatch_unraisable(self):
        if self._hook is not None and sys.unraisablehook is self._hook:
            sys.unraisablehook = self._previous_hook
        self._hook = None


# --- internals ---------------------------------------------------------------------------

def _close_quietly(h5):
    with contextlib.suppress(Exception):
        h5.close()


class _EnergyView:
    """One energy of a ``(n_energy, Z, Y, X)`` dataset, read slab by slab (``view[z0:z1]``)."""

    def __init__(self, ds, i):
        self.ds, self.i, self.shape = ds, i, tuple(ds.shape[1:])

    def __getitem__(self, key):
        return self.ds[(self.i,) + (key if isinstance(key, tuple) else (key,))]
