"""elastix affine MSE registration (itk-elastix): the second reference gpureg is compared against.

Optional: needs the ``bench`` extra (``pip install 'gpureg[bench]'``). elastix's
default affine map with the metric set to mean squares, as in gpureg and
SimpleITK: ``AdvancedMeanSquares``, centre-of-gravity initialisation,
adaptive stochastic gradient descent (256 iterations per level) on 2048
random samples per iteration (``RandomCoordinate``, new samples every
iteration), three resolutions of the smoothing pyramid, linear interpolation.
"""

from __future__ import annotations

import time

import numpy as np

__all__ = ["elastix_available", "register_elastix"]


def elastix_available() -> bool:
    """True when itk-elastix imports."""
    try:
        import itk

        itk.ElastixRegistrationMethod  # noqa: B018  (lazy attribute: raises when itk-elastix is missing)
    except (ImportError, AttributeError):
        return False
    return True


def register_elastix(fixed, moving, *, samples: int = 2048, resolutions: int = 3, iterations: int = 256,
                     seed: int = 0, threads: int | None = None):
    """Register ``moving`` to ``fixed`` with elastix (affine, mean squares, random samples).

    Parameters
    ----------
    fixed, moving : (Z, Y, X) ndarray
        Volumes on the same grid (spacing 1, origin 0).
    samples : int
        Random spatial samples per iteration.
    resolutions : int
        Pyramid levels.
    iterations : int
        Optimizer iterations per level at most.
    seed : int
        elastix's random seed (the samples).
    threads : int, optional
        Threads elastix may use (default: its own choice, all cores).

    Returns
    -------
    matrix : (4, 4) ndarray of float64
        ``moving_from_reference`` in gpureg's convention (voxel indices, z, y, x).
    seconds : float
        Wall time of the registration (conversions excluded).
    """
    try:
        import itk
    except ImportError as exc:
        raise RuntimeError("itk-elastix is not installed; install the bench extra: pip install 'gpureg[bench]'") from exc
    f = itk.image_from_array(np.ascontiguousarray(fixed, dtype=np.float32))
    m = itk.image_from_array(np.ascontiguousarray(moving, dtype=np.float32))
    po = itk.ParameterObject.New()
    pm = po.GetDefaultParameterMap("affine", int(resolutions))
    pm["Metric"] = ["AdvancedMeanSquares"]
    pm["NumberOfSpatialSamples"] = [str(int(samples))]
    pm["MaximumNumberOfIterations"] = [str(int(iterations))]
    pm["AutomaticTransformInitialization"] = ["true"]
    pm["AutomaticTransformInitializationMethod"] = ["CenterOfGravity"]
    pm["RandomSeed"] = [str(int(seed))]
    pm["WriteResultImage"] = ["false"]
    po.AddParameterMap(pm)
    t0 = time.perf_counter()
    kw = {} if threads is None else {"number_of_threads": int(threads)}
    _, result = itk.elastix_registration_method(f, m, parameter_object=po, log_to_console=False, **kw)
    seconds = time.perf_counter() - t0
    tp = result.GetParameterMap(0)
    p = np.array([float(x) for x in tp["TransformParameters"]])
    c = np.array([float(x) for x in tp["CenterOfRotationPoint"]])
    a = p[:9].reshape(3, 3)  # elastix maps fixed points to moving points: q = A (x - c) + t + c (x, y, z)
    xyz = np.eye(4)
    xyz[:3, :3] = a
    xyz[:3, 3] = p[9:] + c - a @ c
    perm = np.eye(4)[[2, 1, 0, 3]]  # (x, y, z) <-> (z, y, x)
    return perm @ xyz @ perm, seconds
