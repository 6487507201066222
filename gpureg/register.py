"""Affine registration by mean squared error (CPU and GPU through the same code).

The coarse-to-fine driver (:func:`register_affine`) is separate from the
solver (:func:`levenberg_marquardt`), which only sees a function returning
:class:`~gpureg.metric.MetricTerms` for a parameter vector. On the GPU that
function is one fused kernel pass; the solver runs on the host on the 1 + 1 +
12 + 78 reduced numbers.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from . import transform as tf
from .backend import array_device, ndimage_of, resolve_device, to_device, to_host, xp_of
from .metric import MetricTerms, cell_support, mse_terms
from .segment import binarize as _binarize
from .segment import denoise as denoise_volume

__all__ = [
    "MODELS",
    "RegistrationResult",
    "SeriesResult",
    "center_of_mass",
    "foreground_fraction",
    "levenberg_marquardt",
    "prepare_volume",
    "pyramid",
    "register_affine",
    "register_prepared",
    "register_series",
]

MODELS = ("affine", "translation")

_log = logging.getLogger("gpureg")


@dataclass
class RegistrationResult:
    """Outcome of one affine registration.

    Attributes
    ----------
    matrix : (4, 4) ndarray of float64
        ``moving_from_reference`` in voxel indices ``(z, y, x)``.
    mse_before, mse_after : float
        MSE of the registration inputs (binarized when asked) at the initial
        identity and at the result, at full resolution.
    iterations : list of int
        Metric passes per pyramid level, coarse to fine.
    seconds : float
        Wall time of the whole registration.
    device : str
        ``"cpu"`` or ``"gpu"``.
    converged : bool
        Whether the finest level met the step tolerance.
    """

    matrix: np.ndarray
    mse_before: float
    mse_after: float
    iterations: list = field(default_factory=list)
    seconds: float = 0.0
    device: str = "cpu"
    converged: bool = False


@dataclass
class SeriesResult:
    """Registration of every energy of a series to one reference energy."""

    energies: np.ndarray
    reference_index: int
    results: list  # RegistrationResult per energy, in input order

    @property
    def matrices(self) -> np.ndarray:
        """(n_energy, 4, 4) ``moving_from_reference`` per energy."""
        return np.stack([r.matrix for r in self.results])

    @property
    def mse_before(self) -> np.ndarray:
        return np.array([r.mse_before for r in self.results])

    @property
    def mse_after(self) -> np.ndarray:
        return np.array([r.mse_after for r in self.results])


def register_affine(fixed, moving, *, device: str = "auto", binarize: bool = False, init=None, mask=None,
                    model: str = "affine", denoise: str | None = None, smooth: float = 1.0, min_size: int = 24,
                    max_iter: int = 60, tol: float = 1e-3) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` with a 12-parameter affine minimising MSE.

    Parameters
    ----------
    fixed, moving : (Z, Y, X) ndarray
        Reference and moving volumes of the same shape (NumPy or CuPy; any real
        dtype, converted to float32). NaN/inf and constant volumes are errors.
    device : {"auto", "cpu", "gpu"}
        Where to compute; CuPy inputs always run on the GPU.
    binarize : bool
        Register Otsu-binarized copies (the reference method) instead of the
        grey levels.
    init : (4, 4) array_like, optional
        Starting ``moving_from_reference``; default: centre-of-mass translation.
    mask : (Z, Y, X) ndarray of bool, optional
        Restrict the metric to these reference voxels.
    model : {"affine", "translation"}
        Free parameters: all 12, or the 3 shifts only.
    denoise : {None, "median", "gaussian"}
        Filter both volumes first (before binarization when that is asked);
        ``"median"`` removes salt-and-pepper noise.
    smooth : float
        Gaussian sigma (voxels) applied to both volumes (after binarization)
        before registering; 0 = off. The MSE of two binary volumes is nearly
        piecewise constant in sub-voxel motion, and with trilinear interpolation
        the MSE of sharp grey volumes is biased toward grid-aligned transforms
        (the "grid effect"); sigma = 1 removes both (test phantom: binarized
        0.24 -> 0.04 voxel, grey near-identity motion 0.25 -> 0.03 voxel).
    min_size : int
        The pyramid halves the grid while the smallest axis stays >= this.
    max_iter : int
        Metric passes per level at most.
    tol : float
        Stop a level when a step moves no voxel of the grid by more than this
        many voxels (of that level).

    Returns
    -------
    RegistrationResult
        ``apply_affine(moving, result.matrix)`` lies on the grid of ``fixed``.
    """
    t0 = time.perf_counter()
    dev = "gpu" if array_device(fixed) == "gpu" else resolve_device(device)
    f = prepare_volume(fixed, dev, name="fixed", binarize=binarize, denoise=denoise, smooth=smooth)
    m = prepare_volume(moving, dev, name="moving", binarize=binarize, denoise=denoise, smooth=smooth)
    return register_prepared(f, m, init=init, mask=mask, model=model, min_size=min_size, max_iter=max_iter, tol=tol,
                             t0=t0)


def register_prepared(fixed, moving, *, init=None, mask=None, model: str = "affine", min_size: int = 24,
                      max_iter: int = 60, tol: float = 1e-3, t0: float | None = None) -> RegistrationResult:
    """Register volumes already made by :func:`prepare_volume` (no further filtering).

    Series, the pipeline and watch mode prepare the reference once and call
    this for every energy. Parameters as in :func:`register_affine`; the
    device is that of ``fixed`` (NumPy or CuPy float32 arrays).
    """
    t0 = time.perf_counter() if t0 is None else t0
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    f, m = fixed, moving
    dev = array_device(f)
    if f.shape != m.shape:
        raise ValueError(f"fixed and moving must have the same shape, got {tuple(f.shape)} and {tuple(m.shape)}")
    msk = _check_mask(mask, f.shape, dev)
    matrix = center_of_mass_init(f, m) if init is None else tf.compose(init)
    fixed_levels, moving_levels = pyramid(f, min_size), pyramid(m, min_size)
    mask_levels = [None] * len(fixed_levels) if msk is None else pyramid(msk, min_size)
    free = np.ones(12, bool) if model == "affine" else np.r_[np.zeros(9, bool), np.ones(3, bool)]
    iterations, converged = [], False
    for level in range(len(fixed_levels) - 1, -1, -1):
        fl, ml = fixed_levels[level], moving_levels[level]
        ml_mask = None if mask_levels[level] is None else mask_levels[level] > 0.5
        to_fine = _level_to_fine(level)
        center = tf.grid_center(fl.shape)
        params0 = tf.params_from_matrix(np.linalg.inv(to_fine) @ matrix @ to_fine, center)

        support = _support(ml)

        def terms(p, fl=fl, ml=ml, center=center, ml_mask=ml_mask, support=support):
            return mse_terms(fl, ml, tf.matrix_from_params(p, center), center=center, mask=ml_mask, support=support)

        params, n_pass, converged = levenberg_marquardt(terms, params0, fl.shape, free=free,
                                                        max_iter=max_iter, tol=tol)
        matrix = to_fine @ tf.matrix_from_params(params, center) @ np.linalg.inv(to_fine)
        iterations.append(n_pass)
    support = _support(m)
    before = mse_terms(f, m, np.eye(4), mask=msk, hessian=False, support=support)
    after = mse_terms(f, m, matrix, mask=msk, hessian=False, support=support)
    if after.count == 0:
        raise RuntimeError("registration diverged: the moving volume no longer overlaps the reference")
    return RegistrationResult(matrix=matrix, mse_before=before.mse, mse_after=after.mse, iterations=iterations,
                              seconds=time.perf_counter() - t0, device=dev, converged=converged)


def register_series(volumes, energies, reference="highest", *, device: str = "auto", binarize: bool = True,
                    progress=None, **options) -> SeriesResult:
    """Register every energy of a series to the reference energy.

    Energies are taken in order of distance from the reference; each is
    registered **to the reference** (no chaining), warm-started from the result
    of the nearest energy already registered.

    Parameters
    ----------
    volumes : sequence of (Z, Y, X) arrays, or (n_energy, Z, Y, X) array
        One volume per energy (an h5py dataset works: volumes are read one at a time).
    energies : (n_energy,) array_like
        Energies in eV.
    reference : "highest", "lowest" or float
        Reference energy (a float must be one of ``energies``).
    device, binarize : see :func:`register_affine`.
    progress : callable, optional
        Called as ``progress(index, result)`` after each energy.
    **options
        Passed to :func:`register_affine` (``model``, ``denoise``, ``tol``...).

    Returns
    -------
    SeriesResult
    """
    energies = np.asarray(energies, dtype=np.float64)
    if energies.ndim != 1 or len(energies) != len(volumes):
        raise ValueError(f"need one energy per volume: {len(volumes)} volumes, energies of shape {energies.shape}")
    ref = reference_index(energies, reference)
    dev = resolve_device(device)
    prep = {"binarize": binarize, "denoise": options.pop("denoise", None), "smooth": options.pop("smooth", 1.0)}
    order = registration_order(energies, ref)
    # On the GPU only the reference, the current and the next volume are on the device: the next
    # one is read and copied host->device on a side stream (cuda.HostToDevicePrefetcher) while the
    # current one registers.
    fetch = None
    if dev == "gpu":
        from . import cuda

        fetch = cuda.HostToDevicePrefetcher(volumes)
        fetch.submit(ref)
    try:
        source = fetch.take(ref) if fetch else volumes[ref]
        if fetch and len(order) > 1:
            fetch.submit(order[1])
        if binarize:
            prep["fraction"] = foreground_fraction(source, denoise=prep["denoise"])
        f = prepare_volume(source, dev, name=f"volume {ref} (reference)", **prep)
        del source
        results = [None] * len(energies)
        t0 = time.perf_counter()
        results[ref] = RegistrationResult(np.eye(4), 0.0, 0.0, [], 0.0, dev, True)
        done = [ref]
        for n, i in enumerate(order[1:], start=1):
            source = fetch.take(i) if fetch else volumes[i]
            if fetch and n + 1 < len(order):
                fetch.submit(order[n + 1])
            m = prepare_volume(source, dev, name=f"volume {i}", **prep)
            del source
            init = warm_start(((energies[j], None if j == ref else results[j].matrix) for j in done), energies[i])
            results[i] = register_prepared(f, m, init=init, **options)
            del m
            done.append(i)
            if progress is not None:
                progress(i, results[i])
    finally:
        if fetch is not None:
            fetch.close()
    _log.info("registered %d energies in %.2f s", len(energies) - 1, time.perf_counter() - t0)
    return SeriesResult(energies=energies, reference_index=ref, results=results)


def reference_index(energies, reference="highest") -> int:
    """Index of the reference energy (``"highest"``, ``"lowest"`` or an energy in eV)."""
    energies = np.asarray(energies, dtype=np.float64)
    if energies.size == 0:
        raise ValueError("no energies given")
    if isinstance(reference, str):
        if reference == "highest":
            return int(np.argmax(energies))
        if reference == "lowest":
            return int(np.argmin(energies))
        try:
            reference = float(reference)
        except ValueError:
            raise ValueError(f"reference must be 'highest', 'lowest' or an energy in eV, got {reference!r}") from None
    k = int(np.argmin(np.abs(energies - float(reference))))
    if abs(energies[k] - float(reference)) > 1e-3:
        raise ValueError(f"reference energy {reference} eV is not one of the energies "
                         f"({energies.min():g}..{energies.max():g} eV, {energies.size} values)")
    return k


def warm_start(done, energy):
    """Starting matrix for ``energy``: that of the nearest already-registered energy.

    ``done`` is an iterable of ``(energy, matrix)`` pairs, with ``matrix=None``
    for the reference (which means a centre-of-mass start). Ties go to the
    first pair in ``done``'s order.
    """
    return min(done, key=lambda pair: abs(pair[0] - energy))[1]


def registration_order(energies, ref: int) -> list:
    """Indices sorted by distance in energy from the reference (reference first)."""
    energies = np.asarray(energies, dtype=np.float64)
    return sorted(range(len(energies)), key=lambda i: (abs(energies[i] - energies[ref]), i))


def levenberg_marquardt(terms, params0, shape, *, free=None, max_iter: int = 60, tol: float = 1e-3,
                        lam0: float = 1e-2):
    """Minimise an MSE with Levenberg-Marquardt on Gauss-Newton sums.

    Parameters
    ----------
    terms : callable
        ``terms(params) -> MetricTerms`` (one metric pass).
    params0 : (12,) ndarray
        Start parameters (:func:`gpureg.transform.matrix_from_params` order).
    shape : tuple of int
        Grid shape; the step size is measured as the largest voxel displacement
        it causes over the grid's corners.
    free : (12,) bool array, optional
        Parameters to optimise (others stay fixed).
    max_iter : int
        Metric passes at most.
    tol : float
        Converged when an accepted (or proposed) step moves no voxel more than this.
    lam0 : float
        Initial damping (Marquardt: ``H + lam diag(H)``).

    Returns
    -------
    params : (12,) ndarray
    passes : int
        Metric passes used.
    converged : bool
    """
    free = np.ones(12, bool) if free is None else np.asarray(free, bool)
    corners = np.array([[z, y, x] for z in (0, shape[0] - 1) for y in (0, shape[1] - 1) for x in (0, shape[2] - 1)],
                       dtype=np.float64) - tf.grid_center(shape)
    params = np.asarray(params0, dtype=np.float64).copy()
    cur: MetricTerms = terms(params)
    if cur.count == 0:
        raise RuntimeError("the initial transform maps the reference grid entirely outside the moving volume")
    passes, lam, converged = 1, lam0, False
    while passes < max_iter:
        g = cur.gradient[free]
        h = cur.hessian[np.ix_(free, free)]
        diag = np.diag(h).copy()
        diag = np.maximum(diag, 1e-12 * max(diag.max(), 1e-30))
        try:
            step = np.linalg.solve(h + lam * np.diag(diag), -g)
        except np.linalg.LinAlgError:
            lam *= 10
            continue
        full = np.zeros(12)
        full[free] = step
        move = float(np.abs(corners @ full[:9].reshape(3, 3).T + full[9:]).max())
        if move < tol:
            converged = True
            break
        trial = terms(params + full)
        passes += 1
        if trial.count > 0 and trial.mse <= cur.mse:
            params, cur = params + full, trial
            lam = max(lam / 3.0, 1e-7)
        else:
            lam *= 4.0
            if lam > 1e8:
                converged = True  # no descent direction left at this resolution
                break
    return params, passes, converged


def prepare_volume(volume, device: str, *, name: str = "volume", binarize: bool = False, denoise=None,
                   smooth: float = 1.0, fraction: float | None = None):
    """Validate a volume and return it as float32 on ``device`` (optionally binarized).

    The volume (Otsu-binarized with ``binarize``) is then smoothed with a
    Gaussian of sigma ``smooth`` voxels (0: not smoothed); see :func:`register_affine`.
    ``fraction``: the reference's foreground fraction, see
    :func:`gpureg.segment.binarize` (series use :func:`foreground_fraction`).

    Raises a ``ValueError`` naming ``name`` for a non-3D, too small, non-real,
    non-finite or constant volume.
    """
    shape = getattr(volume, "shape", None)
    if shape is None or len(shape) != 3:
        raise ValueError(f"{name} must be a 3D (Z, Y, X) array, got shape {shape}")
    if min(shape) < 4:
        raise ValueError(f"{name} must be at least 4 voxels along every axis, got shape {tuple(shape)}")
    dtype = np.dtype(getattr(volume, "dtype", np.float64))
    if dtype.kind not in "biuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {dtype}")
    v = to_device(volume, device, np.float32)
    xp = xp_of(v)
    if not bool(xp.isfinite(v).all()):
        raise ValueError(f"{name} contains NaN or inf values")
    if float(v.max()) == float(v.min()):
        raise ValueError(f"{name} is constant (all values {float(v.max()):g}); there is nothing to register")
    v = denoise_volume(v, denoise)
    if binarize:
        try:
            v = _binarize(v, fraction=fraction)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    if smooth > 0:
        v = ndimage_of(v).gaussian_filter(v, sigma=float(smooth))
    return v


def foreground_fraction(volume, *, denoise=None) -> float:
    """Fraction of voxels in the Otsu foreground (of the reference, for :func:`prepare_volume`)."""
    return float(_binarize(to_device(volume, array_device(volume), np.float32), denoise=denoise).mean())


def center_of_mass(volume) -> np.ndarray:
    """Centre of mass ``(z, y, x)`` of ``max(volume - median, 0)`` (robust to a flat background)."""
    if array_device(volume) == "gpu":
        from . import cuda

        return cuda.center_of_mass(volume)  # exact radix-select median + one moments pass, no sort
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


def pyramid(volume, min_size: int = 24) -> list:
    """Volumes from fine to coarse by 2x block averaging while the smallest axis stays >= ``min_size``.

    Level ``l`` voxel ``k`` covers fine voxels ``2^l k .. 2^l (k + 1) - 1``, so its
    centre is at fine index ``2^l k + (2^l - 1) / 2``.
    """
    levels = [volume]
    while min(levels[-1].shape) // 2 >= min_size:
        levels.append(_downsample2(levels[-1]))
    return levels


def _downsample2(v):
    if array_device(v) == "gpu" and v.dtype == np.float32:
        from . import cuda

        return cuda.downsample2(v)
    nz, ny, nx = (n // 2 for n in v.shape)
    c = v[: 2 * nz, : 2 * ny, : 2 * nx]
    return c.reshape(nz, 2, ny, 2, nx, 2).mean(axis=(1, 3, 5), dtype=c.dtype)


def _support(moving):
    # CPU only: lets the metric skip voxels that cannot contribute (exact).
    return None if array_device(moving) == "gpu" else cell_support(moving)


def _level_to_fine(level: int) -> np.ndarray:
    s = float(2 ** level)
    m = np.diag([s, s, s, 1.0])
    m[:3, 3] = (s - 1.0) / 2.0
    return m


def _check_mask(mask, shape, device):
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask must have the reference shape {tuple(shape)}, got {tuple(mask.shape)}")
    m = to_device(mask, device, np.float32)
    if not bool((m > 0.5).any()):
        raise ValueError("mask selects no voxel")
    return m
