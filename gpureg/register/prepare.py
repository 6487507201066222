"""Preparation of volumes for registration: one frozen :class:`Prep` (denoise, binarize, smooth),
applied once to a series' reference (:func:`prepare_reference`) and then to every energy
(:func:`prepare_volume`); also the centre-of-mass start and the block-averaging pyramid.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import numpy as np

from ..core import transform as tf
from ..core.backend import (
    array_device,
    cpu_engine,
    to_device,
    to_host,
    xp_of,
)
from ..core.errors import InputError, ParameterError
from ..core.segment import binarize as _binarize
from ..core.segment import denoise as denoise_volume
from ..core.segment import gaussian

__all__ = ["center_of_mass", "foreground_fraction", "Prep", "prep_from", "prepare_reference", "prepare_volume",
           "PreparedReference", "pyramid"]

MIN_SIZE = 24  # the affine pyramid halves the grid while its smallest axis stays >= this (default)

# The keywords that said the preparation before one Prep did (deprecated; removed in the release after next).
PREP_KEYWORDS = ("binarize", "denoise", "smooth", "ramp")


@dataclass(frozen=True)
class Prep:
    """How volumes are prepared for registration: one frozen object for a whole series.

    Order: optional ``denoise``, then (with ``binarize``) Otsu binarization
    with a partial-volume ramp of ``ramp`` voxels across the threshold surface,
    then Gaussian smoothing of sigma ``smooth`` voxels (0: none).

    Why the ramp (issue 13): a hard 0/1 volume quantises every surface to the
    grid, so the MSE minimum of two binarized volumes lies off the truth by
    the difference of their staircases, and the 12 affine parameters absorb
    it. The ramp is the clipped signed distance to the threshold surface
    (:func:`gpureg.core.segment.partial_volume`): as insensitive to the
    contrast change across the edge as the hard binarization (it is invariant
    to ``v -> a v + b``), but it keeps the surface's sub-voxel position.
    Measured on the CPU, two-particle phantoms at 64^3 (edge 1 voxel), worst
    mean displacement error over 3 seeds of random affines, binarized, hard ->
    ramp 3 voxels: noise-free 0.080 -> 0.028 voxel; pure sub-voxel shifts
    (6 per size) 0.22 -> 0.04 (64^3) and 0.19 -> 0.08 (32^3) (bench/accuracy.py).

    Noise: ``denoise="impulse"`` (:func:`gpureg.core.segment.remove_impulses`)
    replaces only the saturated voxels of salt-and-pepper noise. The 3x3x3
    median erodes convex particles, more so in a noisier volume, which biased
    the noisy cases (moving volume with salt-and-pepper, binarized, worst of 3
    seeds: 10 % 0.090 voxel with the median -> 0.037 with ``"impulse"``, 30 %
    0.094 -> 0.045; raw 0.048 -> 0.031 and 0.088 -> 0.084), and costs 3x the
    time. Cheaper medians (separable 3-tap, 7-point cross) leave enough
    impulses to wreck the ramp's gradient (30 %: 0.32-0.42 voxel).

    Attributes
    ----------
    binarize : bool
        Register Otsu-binarized volumes (the reference method); False: grey levels.
    denoise : {None, "impulse", "median", "gaussian"}
        Filter applied first: saturated (salt-and-pepper) voxels replaced by
        the mean of their unsaturated neighbours (clean volumes unchanged),
        median 3 voxels wide, or Gaussian sigma 1
        (:func:`gpureg.core.segment.denoise`).
    smooth : float
        Gaussian sigma (voxels) applied last.
    ramp : float
        Width (voxels) of the partial-volume ramp of the binarization
        (:func:`gpureg.core.segment.partial_volume`); 0: hard 0/1 Otsu
        binarization (the behaviour before issue 13). Ignored for grey levels.
    fraction : float, optional
        The reference's Otsu foreground fraction. Across an absorption edge, an
        energy whose Otsu fraction differs from it by more than 5 % is thresholded
        to keep this fraction instead (:func:`gpureg.core.segment.binarize`). Set by
        :func:`prepare_reference`, not by hand.
    """

    binarize: bool = True
    denoise: str | None = None
    smooth: float = 1.0
    ramp: float = 3.0
    fraction: float | None = None

    def __post_init__(self):
        from ..core.segment import DENOISE

        denoise = getattr(self.denoise, "value", self.denoise)  # an Enum member (the CLI's) or its value
        if denoise not in DENOISE:
            raise ParameterError(f"denoise must be one of {DENOISE}, got {self.denoise!r}")
        object.__setattr__(self, "denoise", denoise)
        object.__setattr__(self, "binarize", bool(self.binarize))
        if not (np.isfinite(self.smooth) and float(self.smooth) >= 0):
            raise ParameterError(f"smooth must be a finite sigma >= 0 voxels, got {self.smooth!r}")
        object.__setattr__(self, "smooth", float(self.smooth))
        if not (np.isfinite(self.ramp) and float(self.ramp) >= 0):
            raise ParameterError(f"ramp must be a finite width >= 0 voxels, got {self.ramp!r}")
        object.__setattr__(self, "ramp", float(self.ramp))
        if self.fraction is not None and not 0 < float(self.fraction) < 1:
            raise ParameterError(f"fraction must be in (0, 1), got {self.fraction!r}")

    def to_dict(self) -> dict:
        """Plain JSON-able dict (:meth:`from_dict` reads it back)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Prep":
        return cls(**d)


@dataclass(frozen=True)
class PreparedReference:
    """The reference volume prepared once for a series.

    Attributes
    ----------
    volume : (Z, Y, X) ndarray of float32
        Prepared reference (on the device the series registers on).
    prep : Prep
        The preparation for every other energy (``fraction`` set when binarizing).
    mask : (Z, Y, X) ndarray of bool
        Otsu foreground of the (denoised) reference, on the host: the particle
        labels of the XANES maps and of per-particle registration come from it,
        whether or not registration binarizes.
    """

    volume: object
    prep: Prep
    mask: np.ndarray


def prepare_reference(volume, device: str, prep: Prep, *, name: str = "reference") -> PreparedReference:
    """Prepare the reference of a series once: its Otsu mask, foreground fraction and registration input.

    The reference is denoised and binarized exactly once; the mask serves the
    matched-fraction rule for the other energies (:class:`Prep` ``fraction``)
    and the particle labels.

    Parameters
    ----------
    volume : (Z, Y, X) ndarray
        Reference volume (NumPy or CuPy).
    device : {"auto", "cpu", "gpu"}
        Where the prepared volume lives.
    prep : Prep
        Its ``fraction`` is ignored (it is measured here).
    name : str
        Names the volume in error messages.
    """
    v = _checked(volume, device, name)
    v = denoise_volume(v, prep.denoise)
    try:
        mask = _binarize(v)
    except ValueError as exc:
        raise InputError(f"{name}: {exc}") from None
    host_mask = to_host(mask)
    prep = dataclasses.replace(prep, fraction=float(host_mask.mean()) if prep.binarize else None)
    if prep.binarize and prep.ramp > 0:
        v = _binarize(v, fraction=prep.fraction, ramp=prep.ramp)  # the Otsu threshold again: the same surface
    else:
        v = mask if prep.binarize else v
    if prep.smooth > 0:
        v = gaussian(v, prep.smooth)
    return PreparedReference(volume=v, prep=prep, mask=host_mask > 0.5)


def prep_from(prep: Prep | None, deprecated: dict, where: str, *, stacklevel: int = 3) -> Prep:
    """The :class:`Prep` of a call: ``prep``, or ``Prep()`` (the default), or one built from old keywords.

    ``deprecated`` holds the call's other keywords: the old ``binarize``,
    ``denoise``, ``smooth``, ``ramp`` build ``Prep(**deprecated)`` (the
    defaults of :class:`Prep` for the rest, so ``binarize`` is True unless given)
    with a :class:`DeprecationWarning`; anything else is a ``TypeError``, as
    for any unknown keyword.

    Parameters
    ----------
    prep : Prep or None
    deprecated : dict
        The ``**deprecated`` keywords of the caller.
    where : str
        The caller's name, for the messages.
    stacklevel : int
        Of the warning: 3 points at the caller's caller.
    """
    unknown = sorted(set(deprecated) - set(PREP_KEYWORDS))
    if unknown:
        raise TypeError(f"{where}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}")
    if prep is not None and not isinstance(prep, Prep):
        raise TypeError(f"{where}: prep must be a gpureg.Prep, got {type(prep).__name__}")
    if not deprecated:
        return Prep() if prep is None else prep
    if prep is not None:
        raise TypeError(f"{where}: give prep=Prep(...) or the deprecated keywords {sorted(deprecated)}, not both")
    spelled = ", ".join(f"{k}={v!r}" for k, v in deprecated.items())
    warnings.warn(f"{where}: the keywords {', '.join(deprecated)} are deprecated and will be removed; pass "
                  f"prep=gpureg.Prep({spelled}) instead", DeprecationWarning, stacklevel=stacklevel)
    return Prep(**deprecated)


def prepare_volume(volume, device: str, prep: Prep | None = None, *, name: str = "volume", **deprecated):
    """Validate a volume and return it as float32 on ``device``, prepared as ``prep`` says.

    Parameters
    ----------
    volume : (Z, Y, X) ndarray
        Any real dtype, NumPy or CuPy.
    device : {"auto", "cpu", "gpu"}
        Where the result lives.
    prep : Prep, optional
        Denoise / binarize (ramp) / smooth settings (for a series: the ``prep`` of
        :func:`prepare_reference`, which carries the reference's fraction);
        default ``Prep()`` (binarized, ramp 3, smoothed sigma 1).
    name : str
        Names the volume in error messages.
    **deprecated
        ``binarize``, ``denoise``, ``smooth``, ``ramp``: the old spelling of
        ``prep`` (a :class:`DeprecationWarning`; see :func:`prep_from`).

    Raises a ``ValueError`` naming ``name`` for a non-3D, too small, non-real,
    non-finite or constant volume.
    """
    prep = prep_from(prep, deprecated, "prepare_volume")
    v = _checked(volume, device, name)
    v = denoise_volume(v, prep.denoise)
    if prep.binarize:
        try:
            v = _binarize(v, fraction=prep.fraction, ramp=prep.ramp)
        except ValueError as exc:
            raise InputError(f"{name}: {exc}") from None
    if prep.smooth > 0:
        v = gaussian(v, prep.smooth)
    return v


def foreground_fraction(volume, *, denoise=None) -> float:
    """Fraction of voxels in the Otsu foreground (of the reference, for :func:`prepare_volume`)."""
    return float(_binarize(to_device(volume, array_device(volume), np.float32), denoise=denoise).mean())


def center_of_mass(volume) -> np.ndarray:
    """Centre of mass ``(z, y, x)`` of ``max(volume - median, 0)`` (robust to a flat background)."""
    if array_device(volume) == "gpu":
        from ..core import cuda

        return cuda.center_of_mass(volume)  # exact radix-select median + one moments pass, no sort
    if cpu_engine() == "numba":
        from ..core import cpu_kernels

        return cpu_kernels.center_of_mass(volume)
    xp = xp_of(volume)
    w = xp.maximum(volume - xp.median(volume), 0)
    total = float(w.sum())
    if total <= 0:
        return tf.grid_center(volume.shape)
    out = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        marginal = to_host(w.sum(axis=other)).astype(np.float64)
        out.append(float(marginal @ np.arange(volume.shape[axis])) / total)
    return np.asarray(out)


def center_of_mass_init(fixed, moving) -> np.ndarray:
    """Translation taking the reference's centre of mass onto the moving one's."""
    m = np.eye(4)
    m[:3, 3] = center_of_mass(moving) - center_of_mass(fixed)
    return m


def pyramid(volume, min_size: int = MIN_SIZE) -> list:
    """Volumes from fine to coarse by 2x block averaging while the smallest axis stays >= ``min_size``.

    Level ``l`` voxel ``k`` covers fine voxels ``2^l k .. 2^l (k + 1) - 1``, so its
    centre is at fine index ``2^l k + (2^l - 1) / 2``.
    """
    levels = [volume]
    while min(levels[-1].shape) // 2 >= min_size:
        levels.append(downsample2(levels[-1]))
    return levels


def downsample2(v):
    if array_device(v) == "gpu" and v.dtype == np.float32:
        from ..core import cuda

        return cuda.downsample2(v)
    if cpu_engine() == "numba" and v.dtype == np.float32 and v.ndim == 3:
        from ..core import cpu_kernels

        return cpu_kernels.downsample2(v)
    nz, ny, nx = (n // 2 for n in v.shape)
    c = v[: 2 * nz, : 2 * ny, : 2 * nx]
    return c.reshape(nz, 2, ny, 2, nx, 2).mean(axis=(1, 3, 5), dtype=c.dtype)


def level_to_fine(level: int) -> np.ndarray:
    s = float(2 ** level)
    m = np.diag([s, s, s, 1.0])
    m[:3, 3] = (s - 1.0) / 2.0
    return m


def _checked(volume, device, name):
    shape = getattr(volume, "shape", None)
    if shape is None:
        raise InputError(f"{name} must be a 3D (Z, Y, X) NumPy or CuPy array, got {type(volume).__name__} "
                         "(convert it with numpy.asarray)")
    if len(shape) != 3:
        raise InputError(f"{name} must be a 3D (Z, Y, X) array, got shape {shape}")
    if min(shape) < 4:
        raise InputError(f"{name} must be at least 4 voxels along every axis, got shape {tuple(shape)}")
    dtype = np.dtype(getattr(volume, "dtype", np.float64))
    if dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {dtype}")
    v = to_device(volume, device, np.float32)
    xp = xp_of(v)
    if not bool(xp.isfinite(v).all()):
        raise InputError(f"{name} contains NaN or inf values")
    if float(v.max()) == float(v.min()):
        raise InputError(f"{name} is constant (all values {float(v.max()):g}); there is nothing to register")
    return v
