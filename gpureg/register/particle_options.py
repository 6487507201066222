"""How particles are registered on their own: one frozen :class:`ParticleOptions`.

Used by :func:`gpureg.register_particles`, :func:`gpureg.detect_relative_motion`
and the pipeline's ``--per-particle``; the keywords these took one by one before
(``particle_model=``, ``min_voxels=``...) still build it, with a
:class:`DeprecationWarning`.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

__all__ = ["PARTICLE_MODELS", "ParticleOptions", "particle_options_from"]

PARTICLE_MODELS = ("rigid", "affine")

# old keyword -> ParticleOptions field (deprecated; removed in the release after next)
OLD_KEYWORDS = {"particle_model": "model", "min_voxels": "min_voxels", "dilate": "dilate", "guard": "guard",
                "margin": "margin", "min_gain": "min_gain", "ratio": "ratio"}


@dataclass(frozen=True)
class ParticleOptions:
    """Settings of per-particle registration (:func:`gpureg.register_particles`).

    Attributes
    ----------
    model : {"rigid", "affine"}
        ``"rigid"``: every particle is ``A @ R_k``: one affine ``A`` shared by
        all particles (the imaging: drift, magnification, shear) and a rigid
        motion ``R_k`` per particle about its centroid (identity for the
        largest), fitted jointly. ``"affine"``: an independent 12-parameter
        affine per particle, each on its own region (why rigid is the default:
        :func:`gpureg.register_particles`, Notes).
    min_voxels : int
        A label with fewer voxels is not registered on its own: it keeps the
        global transform and a warning names it (default labels: smaller
        components are background). Below about 1000 voxels the fit follows
        the metric's spurious minima (32^3 phantom, 400-800 voxel particles:
        0.4-0.6 voxel errors where the global one left 0.2-0.3).
    dilate : int
        Each particle's region is its label grown by this many voxels (nearest
        particle wins where two grow into each other), so the metric sees the
        particle's edges on both sides.
    guard : int
        The metric of a particle leaves out its region's voxels within this
        many voxels of another particle: there, a particle that moved
        relative to the other samples the other one. Should exceed the
        relative motion (on the phantom, whose particles are 3.5-3.7 voxels
        apart at 64^3, 3 voxels + 4 degrees needed 5).
    margin : int
        The per-particle metric runs on a box around the region and its
        globally mapped position, grown by this many voxels: the largest
        motion of a particle relative to the global transform it can follow.
    min_gain : float
        A particle takes its own transform only when that divides the MSE of
        its region by at least this factor; otherwise it keeps the global
        one. A metric restricted to one particle has spurious minima a few
        tenths of a voxel off (trilinear "grid effect", binarization, noise),
        which lower the MSE too. Measured: 64^3 noise-free phantom, no relative
        motion 1.0-1.08x (own fits 0.1-0.5 voxel off the truth), 1 voxel + 2
        degrees 1.1-1.15x, 3 voxels + 4 degrees 1.5-1.7x; the noisy 48^3
        simulation (`gpureg demo --per-particle`) 1.1-1.9x from noise alone, where
        1.1 and 1.2 let through 0.7-1.5 voxel outliers and 1.3 none. 1 accepts
        any decrease.
    ratio : float
        Threshold of :attr:`ParticleResult.residual` ``.suspect`` on the
        largest over the smallest particle residual after the global
        registration (as :func:`gpureg.detect_relative_motion`; no warning from
        :func:`register_particles`).
    """

    model: str = "rigid"
    min_voxels: int = 1000
    dilate: int = 3
    guard: int = 5
    margin: int = 8
    min_gain: float = 1.3
    ratio: float = 3.0

    def __post_init__(self):
        if self.model not in PARTICLE_MODELS:
            raise ValueError(f"ParticleOptions: model must be one of {PARTICLE_MODELS}, got {self.model!r}")
        if int(self.min_voxels) < 1:
            raise ValueError(f"ParticleOptions: min_voxels must be >= 1, got {self.min_voxels}")
        if not float(self.min_gain) >= 1:
            raise ValueError(f"ParticleOptions: min_gain must be >= 1, got {self.min_gain}")
        if min(int(self.dilate), int(self.guard), int(self.margin)) < 0 or int(self.guard) > int(self.margin):
            raise ValueError(f"ParticleOptions: need 0 <= guard <= margin and dilate >= 0, got dilate={self.dilate}, "
                             f"guard={self.guard}, margin={self.margin}")
        if not float(self.ratio) > 0:
            raise ValueError(f"ParticleOptions: ratio must be > 0, got {self.ratio}")
        for name in ("min_voxels", "dilate", "guard", "margin"):
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("min_gain", "ratio"):
            object.__setattr__(self, name, float(getattr(self, name)))


def particle_options_from(particles: ParticleOptions | None, options: dict, where: str) -> ParticleOptions:
    """``particles``, or ``ParticleOptions()``, or one built from the old keywords popped from ``options``.

    The old keywords raise a :class:`DeprecationWarning` (at the caller's caller);
    given together with ``particles`` they are a ``TypeError``.
    """
    old = {OLD_KEYWORDS[k]: options.pop(k) for k in list(options) if k in OLD_KEYWORDS}
    if particles is not None and not isinstance(particles, ParticleOptions):
        raise TypeError(f"{where}: particles must be a gpureg.register.ParticleOptions, got {type(particles).__name__}")
    if not old:
        return ParticleOptions() if particles is None else particles
    if particles is not None:
        raise TypeError(f"{where}: give particles=ParticleOptions(...) or the deprecated keywords, not both")
    warnings.warn(f"{where}: the keywords {', '.join(k for k, v in OLD_KEYWORDS.items() if v in old)} are deprecated "
                  f"and will be removed; pass particles=ParticleOptions(...) instead", DeprecationWarning, stacklevel=3)
    return dataclasses.replace(ParticleOptions(), **old)
