"""SimpleITK affine MSE registration: the reference gpureg is compared against.

Optional: needs the ``bench`` extra (``pip install 'gpureg[bench]'``). The
configuration is the usual one for ``ImageRegistrationMethod``: MeanSquares,
affine transform initialised on the centres of mass (moments), regular-step
gradient descent with scales from physical shift, shrink factors 4/2/1 with
smoothing sigmas 2/1/0 voxels, full sampling, linear interpolation.
"""

from __future__ import annotations

import time

import numpy as np

__all__ = ["register_sitk", "sitk_available"]


def sitk_available() -> bool:
    """True when SimpleITK imports."""
    try:
        import SimpleITK  # noqa: F401
    except ImportError:
        return False
    return True


def register_sitk(fixed, moving, *, threads: int | None = None, shrink=(4, 2, 1), smooth=(2, 1, 0),
                  iterations: int = 200, init: str = "moments", sampling: float | None = None):
    """Register ``moving`` to ``fixed`` with SimpleITK (affine, mean squares).

    Parameters
    ----------
    fixed, moving : (Z, Y, X) ndarray
        Volumes on the same grid (spacing 1, origin 0).
    threads : int, optional
        SimpleITK's global thread count (default: its own default, all cores).
    shrink, smooth : sequence
        Pyramid shrink factors and smoothing sigmas (voxels), coarse to fine.
    iterations : int
        Optimizer iterations per level at most.
    init : {"moments", "geometry"}
        Centred initialisation of the affine.
    sampling : float, optional
        Fraction of voxels sampled at random (fixed seed) by the metric; None: all.

    Returns
    -------
    matrix : (4, 4) ndarray of float64
        ``moving_from_reference`` in gpureg's convention (voxel indices, z, y, x).
    seconds : float
        Wall time of ``Execute`` (initialisation included, conversions excluded).
    """
    try:
        import SimpleITK as sitk
    except ImportError as exc:
        raise RuntimeError("SimpleITK is not installed; install the bench extra: pip install 'gpureg[bench]'") from exc
    if threads:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(int(threads))
    f = sitk.GetImageFromArray(np.ascontiguousarray(fixed, dtype=np.float32))
    m = sitk.GetImageFromArray(np.ascontiguousarray(moving, dtype=np.float32))
    t0 = time.perf_counter()
    mode = (sitk.CenteredTransformInitializerFilter.MOMENTS if init == "moments"
            else sitk.CenteredTransformInitializerFilter.GEOMETRY)
    tx = sitk.CenteredTransformInitializer(f, m, sitk.AffineTransform(3), mode)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMeanSquares()
    if sampling is None:
        reg.SetMetricSamplingStrategy(reg.NONE)
    else:
        reg.SetMetricSamplingStrategy(reg.RANDOM)
        reg.SetMetricSamplingPercentage(float(sampling), 1)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=iterations,
                                                 gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel(list(smooth))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(tx, inPlace=True)
    reg.Execute(f, m)
    seconds = time.perf_counter() - t0
    affine = sitk.AffineTransform(tx)
    a = np.asarray(affine.GetMatrix(), dtype=np.float64).reshape(3, 3)
    c = np.asarray(affine.GetCenter(), dtype=np.float64)
    t = np.asarray(affine.GetTranslation(), dtype=np.float64)
    xyz = np.eye(4)
    xyz[:3, :3] = a
    xyz[:3, 3] = t + c - a @ c
    perm = np.eye(4)[[2, 1, 0, 3]]  # (x, y, z) <-> (z, y, x)
    return perm @ xyz @ perm, seconds
