"""The pipeline: projections -> FBP -> binarize -> register -> align -> XANES -> report.

Energies stream one at a time: the reference is reconstructed first, then the
others in order of distance from it; while one registers, the next is read
and reconstructed in a worker thread. Everything is written to
``OUTPUT.partial`` as it completes (flushed per energy, with a ``done`` flag),
so rerunning the same command after an interruption resumes where it stopped
and gives the same result; the finished file is renamed onto ``OUTPUT``
(atomic) and never overwritten without ``overwrite=True``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time

import numpy as np

from .files import InputError

__all__ = ["STAGES"]

_log = logging.getLogger("gpureg")

STAGES = ("load", "register", "apply", "write")


class ResultStore:
    """The ``.partial`` result file: preallocated per-energy datasets and ``done`` flags."""

    def __init__(self, h5, energies, ref):
        self.h5, self.energies, self.ref = h5, energies, ref
        self.done = h5["registration/done"][...].astype(bool)

    @classmethod
    def open(cls, path, reader, energies, ref, params, checksum, *, fresh):
        import h5py

        from ..core.version import __version__

        shape = tuple(int(n) for n in reader.recon_shape)
        if path.exists() and not fresh:
            try:
                h5 = h5py.File(path, "r+")
            except OSError as exc:
                _log.warning("gpureg: %s is unreadable (%s); starting over", path, exc)
            else:
                same = (h5.attrs.get("input_checksum") == checksum and h5.attrs.get("parameters") == json.dumps(params)
                        and h5["aligned"].shape[1:] == shape)
                if same:
                    return cls(h5, energies, ref)
                h5.close()
                raise InputError(f"{path}: an interrupted run with a different input or parameters is here; "
                                 "rerun with the same ones, or pass --overwrite to start over")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        h5 = h5py.File(path, "w")
        n = len(energies)
        chunks = (1, min(16, shape[0]), shape[1], shape[2])
        h5.attrs.update({"gpureg_version": __version__, "device": params["device"], "parameters": json.dumps(params),
                         "input": str(reader.path), "input_checksum": checksum, "complete": False,
                         "convention": "registration/matrix: moving_from_reference, voxel indices (z, y, x)"})
        h5["energy"] = energies
        h5["energy"].attrs["units"] = "eV"
        h5.attrs["reference_index"] = ref
        for name in ("recon", "aligned"):
            h5.create_dataset(name, shape=(n, *shape), dtype="f4", chunks=chunks)
        h5["registration/matrix"] = np.tile(np.eye(4), (n, 1, 1))
        for name in ("mse_before", "mse_after"):
            h5[f"registration/{name}"] = np.full(n, np.nan)
        h5["registration/done"] = np.zeros(n, dtype=bool)
        for stage in STAGES:
            h5[f"timings/{stage}"] = np.zeros(n)
            h5[f"timings/{stage}"].attrs["units"] = "s"
        truth = reader.truth()
        if truth:
            from .dataexchange import write_group

            write_group(h5.create_group("truth"), truth)
        h5.flush()
        return cls(h5, energies, ref)

    def recon(self, i):
        return self.h5["recon"][i]

    def matrix(self, i):
        return self.h5["registration/matrix"][i]

    def write_energy(self, i, recon, aligned, matrix, before, after, timings):
        t0 = time.perf_counter()
        self.h5["recon"][i] = recon
        self.h5["aligned"][i] = aligned
        self.h5["registration/matrix"][i] = matrix
        self.h5["registration/mse_before"][i] = before
        self.h5["registration/mse_after"][i] = after
        for stage, secs in timings.items():
            self.h5[f"timings/{stage}"][i] = secs
        self.h5.flush()  # data first, then the flag that says it is complete
        self.h5["timings/write"][i] = time.perf_counter() - t0
        self.h5["registration/done"][i] = True
        self.h5.flush()
        self.done[i] = True

    def write_xanes(self, maps, labels):
        grp = self.h5.require_group("xanes")
        for key in ("edge_energy", "edge_jump", "white_line", "mask"):
            if key in grp:
                del grp[key]
            grp[key] = np.asarray(maps[key])
        if "labels" in grp:
            del grp["labels"]
        grp["labels"] = labels.astype(np.int32)
        grp["edge_energy"].attrs["units"] = "eV"

    def finish(self):
        self.h5.attrs["complete"] = True
        self.close()

    def close(self):
        with contextlib.suppress(Exception):
            self.h5.close()
