"""Per-particle registration inside a pipeline run (``run(per_particle=True)``, issue 8)."""

from __future__ import annotations

import logging

from ..core.backend import to_host
from ..core.transform import apply_affine

__all__ = ["PerParticle", "per_particle_xanes"]

_log = logging.getLogger("gpureg")


class PerParticle:
    """Per-particle registration of each energy after its global one.

    Labels are the connected components of the reference's Otsu mask
    (:class:`~gpureg.register.prepare.PreparedReference` ``mask``), computed once
    and kept in the result file, so a resumed run uses the same ones. Per energy
    the store records the per-particle transforms and MSEs (row/column 0: the
    global transform, the whole grid) and the global alignment (for comparison);
    the aligned stack holds the piecewise alignment.
    """

    def __init__(self, store, reference, device, *, min_gain: float = 1.3, min_voxels: int = 1000):
        from ..core.segment import particle_labels

        self.store, self.device, self.result, self.min_gain = store, device, None, float(min_gain)
        self.min_voxels = int(min_voxels)
        self.labels = store.particle_labels(lambda: to_host(particle_labels(reference.mask)[0]))
        self.n_labels = int(self.labels.max())

    def register(self, i, fixed, moving, global_result):
        """Particles of energy ``i`` from its (prepared) volume and global result; rows ``i`` written."""
        from ..register.particle_options import ParticleOptions
        from ..register.particles import register_particles

        if self.n_labels == 0:
            _log.warning("gpureg: per_particle=True: the reference has no particle of >= 64 voxels; global only")
        self.result = register_particles(fixed, moving, self.labels, prepared=True, global_result=global_result,
                                         device=self.device,
                                         particles=ParticleOptions(min_gain=self.min_gain,
                                                                    min_voxels=self.min_voxels))
        self.store.write_particles(i, self.result.stack(self.n_labels), *self.result.mse_arrays(self.n_labels))

    def write_global(self, i, volume):
        """Store energy ``i``'s global (affine-only) alignment, ``/aligned_global``, for the comparison."""
        self.store.write_aligned_global(i, to_host(apply_affine(volume, self.result.matrices[0], device=self.device)))

    def apply(self, i, volume):
        """Piecewise-aligned grey volume of energy ``i`` (host); the global alignment is stored beside it."""
        from ..register.particles import apply_piecewise

        self.write_global(i, volume)
        return to_host(apply_piecewise(volume, self.result.matrices, self.result.regions, device=self.device))


def per_particle_xanes(store, options, devices, mask=None):
    """Edge-energy maps of the global (affine-only) alignment too (``/xanes_global``), for the comparison figure.

    Per-particle runs, and deformable runs with series smoothing (which store ``/aligned_global``). ``mask``:
    the sample mask the run's own map uses (the reference's Otsu mask), so both maps cover the same voxels.
    """
    from ..xanes.stack import edge_energy_map

    maps = edge_energy_map(store.stack("aligned_global"), store.energies, device=devices.registration,
                           method=options.edge.value, mask=mask, psf=options.psf)
    keys = ("edge_energy", "mask", "edge_ambiguous", "edge_energy_sigma")
    store.write_xanes({key: maps[key] for key in keys if key in maps}, None, group="xanes_global")
