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

import logging

import numpy as np

from ..core.backend import to_host
from ..core.transform import apply_affine

_log = logging.getLogger("gpureg")

# --- per-particle registration (run(per_particle=True), issue 8) -------------------------

class PerParticle:
    """Per-particle registration of each energy after its global one.

    Labels are the connected components of the binarized reference, computed
    once and kept in the result file (``/registration/particle_labels``), so a
    resumed run uses the same ones. Per energy it stores
    ``/registration/particle_matrix`` (n_energy, n_labels + 1, 4, 4) (row 0:
    the global transform, for the background), ``particle_mse_global`` and
    ``particle_mse`` (n_energy, n_labels + 1) (column 0: the whole grid), and
    ``/aligned_global`` (the global alignment, for comparison); ``/aligned``
    holds the piecewise alignment.
    """

    def __init__(self, store, ref, params):
        from ..core.segment import binarize, particle_labels

        self.store, self.device, self.result = store, params["device"], None
        h5 = store.h5
        if "registration/particle_labels" not in h5:
            labels, _ = particle_labels(to_host(binarize(store.recon(ref), denoise=params["denoise"])) > 0.5)
            labels = np.asarray(to_host(labels), dtype=np.int32)
            n, k = len(store.energies), int(labels.max())
            h5["registration/particle_labels"] = labels
            h5["registration/particle_matrix"] = np.tile(np.eye(4), (n, k + 1, 1, 1))
            for name in ("particle_mse_global", "particle_mse"):
                h5[f"registration/{name}"] = np.full((n, k + 1), np.nan)
                h5[f"registration/{name}"][ref] = 0.0
            h5.create_dataset("aligned_global", shape=h5["aligned"].shape, dtype="f4", chunks=h5["aligned"].chunks)
            h5["aligned_global"][ref] = store.recon(ref)
            h5.flush()
        self.labels = h5["registration/particle_labels"][...]
        self.n_labels = int(self.labels.max())

    def register(self, i, fixed, moving, global_result):
        """Particles of energy ``i`` from its (prepared) volume and global result; rows ``i`` written."""
        from ..register.particles import register_particles

        if self.n_labels == 0:
            _log.warning("gpureg: --per-particle: the reference has no particle of >= 64 voxels; global only")
        self.result = register_particles(fixed, moving, self.labels, prepared=True, global_result=global_result,
                                         device=self.device)
        reg = self.store.h5["registration"]
        reg["particle_matrix"][i] = self.result.stack(self.n_labels)
        reg["particle_mse_global"][i], reg["particle_mse"][i] = self.result.mse_arrays(self.n_labels)

    def apply(self, i, volume):
        """Piecewise-aligned grey volume of energy ``i`` (host); the global alignment goes to ``/aligned_global``."""
        from ..register.particles import apply_piecewise

        self.store.h5["aligned_global"][i] = to_host(apply_affine(volume, self.result.matrices[0], device=self.device))
        return to_host(apply_piecewise(volume, self.result.matrices, self.result.regions, device=self.device))


def per_particle_xanes(store, params):
    """Edge-energy maps of the global alignment too (``/xanes_global``), for the side-by-side figure."""
    from ..xanes.stack import edge_energy_map

    maps = edge_energy_map(store.h5["aligned_global"], store.energies, device=params["device"],
                           method=params["xanes_method"])
    grp = store.h5.require_group("xanes_global")
    for key in ("edge_energy", "mask"):
        if key in grp:
            del grp[key]
        grp[key] = np.asarray(to_host(maps[key]))
    grp["edge_energy"].attrs["units"] = "eV"
