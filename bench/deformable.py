"""Deformable registration benchmark: gpureg's B-spline FFD vs elastix's B-spline (and ANTs SyN) on the same pairs.

The pairs: the analytic two-particle phantom (grey, textured) and its copy
moved by a rotation of 3 deg + a shift of about 1.4 voxels (64^3, scaled with
the size) plus a smooth warp, sampled exactly through the warp's inverse, so
the true position of every reference voxel in the moving volume is known.
The sweep (``SWEEP``): Gaussian-smoothed random warps (:class:`warps.GaussianWarp`)
of amplitude 1, 3, 6 voxels and smoothness sigma 4, 8, 12 voxels at 64^3,
salt-and-pepper noise 5 and 10 % (both volumes), issue 27's sinusoidal
warp (:class:`gpureg.synth.deform.SmoothWarp`, ``sigma=None``), and three
128^3 cases. Every method gets the same prepared arrays (``Prep(binarize=False,
denoise="impulse")``: saturated voxels replaced, Gaussian sigma 1) and the same
final control-point spacing S (8 voxels):

- gpureg: ``register_deformable_prepared`` with its defaults (its affine,
  then control grids 4S, 2S, S; L-BFGS on MSE + bending energy, cubic sampling);
- elastix (itk-elastix): its default "affine" then "bspline" parameter maps
  with ``Metric = AdvancedMeanSquares`` and
  ``FinalGridSpacingInPhysicalUnits = S`` (everything else elastix's defaults:
  4 resolutions, adaptive stochastic gradient descent, 2048 random samples per
  iteration; ``--elastix-samples`` for more);
- elastix on the unprepared volumes too (``--elastix-raw``; a variant of the row, ``input``
  "unprepared volumes"): elastix's own input, since the prepared arrays are not what it is tuned for;
- ANTs SyN (``--ants``, antspyx where it installs): ``type_of_transform="SyN"``
  with mean squares, cases up to ``--ants-max-size``.

Reported per case: wall time (ms, median over repeats, after one warm-up run
of each method), mean error (voxels) over the particle voxels of
``p + displacement`` against the truth, the error of the best least-squares
affine (what no affine method can beat), the smallest Jacobian determinant,
and ratio = gpureg time / elastix time. Times of one run share the machine's
load (``load_before_after`` in the JSON).

    python bench/deformable.py --ants          # the sweep on the CPU
    python bench/deformable.py --cases 64:3:8:0.05 --interpolation linear
    python bench/deformable.py --device gpu --legacy --sizes 128 --no-elastix
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from common import save, synchronize

from gpureg.core import transform as tf
from gpureg.core.backend import to_device, to_host
from gpureg.register.deformable import register_deformable_prepared
from gpureg.register.prepare import Prep, prepare_volume
from gpureg.synth.deform import SmoothWarp
from gpureg.synth.distort import salt_and_pepper
from gpureg.synth.phantom import two_particle_phantom
from warps import GaussianWarp


def make_pair(size, seed=1, *, amplitude=None, sigma=None, noise=0.0, cache=True):
    """Fixed and moving phantoms, particle points, their true moving positions and the best affine.

    ``sigma=None``: the sinusoidal :class:`SmoothWarp` of at most ``amplitude`` voxels
    (default 3 at 64^3, scaled with the size; the case of issue 27); else a
    :class:`warps.GaussianWarp` of ``amplitude`` voxels and smoothness ``sigma``.
    ``noise``: salt-and-pepper fraction of both volumes (different draws). With
    ``$GPUREG_BENCH_CACHE`` set (and ``cache``) the pairs are kept there (``.npz``).
    """
    key = f"deformable-{size}-{seed}-{amplitude}-{sigma}-{noise}.npz"
    cache = os.environ.get("GPUREG_BENCH_CACHE") if cache else None
    if cache and (Path(cache) / key).is_file():
        d = np.load(Path(cache) / key)
        return d["fixed"], d["moving"], d["points"], d["truth"], d["best"]
    shape = (size,) * 3
    c = tf.grid_center(shape)
    affine = tf.rotation_matrix(3.0, (1.0, 0.5, 0.2), c)
    affine[:3, 3] += np.array([1.0, -0.8, 0.6]) * size / 64
    if sigma is None:
        warp = SmoothWarp(shape, (3.0 if amplitude is None else amplitude) * size / 64, matrix=affine, seed=seed)
    else:
        warp = GaussianWarp(shape, amplitude, sigma, matrix=affine, seed=seed)
    fixed, labels = two_particle_phantom(shape, seed=2, return_labels=True)
    moving = two_particle_phantom(shape, warp, seed=2)
    if noise:
        fixed, moving = salt_and_pepper(fixed, noise, seed=11), salt_and_pepper(moving, noise, seed=12)
    points = np.argwhere(labels > 0).astype(np.float64)
    out = fixed, moving, points, warp.moving_from_reference(points), warp.best_affine(points)
    if cache:
        Path(cache).mkdir(parents=True, exist_ok=True)
        np.savez(Path(cache) / key, **dict(zip(("fixed", "moving", "points", "truth", "best"), out)))
    return out


def mean_error(displacement, points, truth):
    idx = tuple(points.astype(int).T)
    q = points + np.stack([np.asarray(d)[idx] for d in displacement], axis=1)
    return float(np.linalg.norm(q - truth, axis=1).mean())


def run_gpureg(f, m, spacing, device, **options):
    fd, md = to_device(f, device), to_device(m, device)
    synchronize(device)
    t0 = time.perf_counter()
    res = register_deformable_prepared(fd, md, spacing=spacing, **options)
    synchronize(device)
    return (time.perf_counter() - t0) * 1e3, to_host(res.displacement), res.min_jacobian


def run_elastix(f, m, spacing, samples, bending=0.0):
    """elastix affine + B-spline (mean squares); ``bending`` > 0 adds its bending-energy penalty with that weight."""
    import itk

    fixed, moving = itk.GetImageFromArray(f.astype(np.float32)), itk.GetImageFromArray(m.astype(np.float32))
    params = itk.ParameterObject.New()
    for name in ("affine", "bspline"):
        p = params.GetDefaultParameterMap(name)
        p["Metric"] = ["AdvancedMeanSquares"]
        if name == "bspline":
            p["FinalGridSpacingInPhysicalUnits"] = [str(float(spacing))]
            if bending:  # elastix's default B-spline map pairs its metric with this penalty (weight 1 beside MI)
                p["Metric"] = ["AdvancedMeanSquares", "TransformBendingEnergyPenalty"]
                p["Metric0Weight"], p["Metric1Weight"] = ["1.0"], [str(float(bending))]
        if samples:
            p["NumberOfSpatialSamples"] = [str(int(samples))]
        params.AddParameterMap(p)
    t0 = time.perf_counter()
    # elastix uses every core by default (number_of_threads= crashed itk-elastix 0.25.4 here)
    _, result = itk.elastix_registration_method(fixed, moving, parameter_object=params, log_to_console=False)
    ms = (time.perf_counter() - t0) * 1e3
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:  # transformix writes deformationField.nii into the working folder
        os.chdir(tmp)
        try:
            field = itk.GetArrayFromImage(itk.transformix_deformation_field(moving, result))  # (z, y, x, 3): x, y, z
        finally:
            os.chdir(cwd)
    disp = np.moveaxis(field[..., ::-1], -1, 0).astype(np.float32)
    return ms, disp


# (size, amplitude, sigma, noise); sigma None: issue 27's sinusoidal case (amplitude 3 at 64^3)
SWEEP = ([(64, a, s, 0.0) for a in (1, 3, 6) for s in (4, 8, 12)] + [(64, 3, 8, 0.05), (64, 3, 8, 0.10)]
         + [(64, 3, None, 0.0), (128, 3, 8, 0.0), (128, 6, 16, 0.0), (128, 3, 8, 0.05)])


def parse_case(text):
    """``SIZE:AMPLITUDE:SIGMA:NOISE`` (SIGMA ``-``: the sinusoidal warp of issue 27) -> tuple."""
    size, amp, sig, noise = text.split(":")
    return int(size), float(amp), (None if sig == "-" else float(sig)), float(noise)


def run_ants(f, m):
    """ANTs SyN (antspyx, its ``SyN`` transform: affine then SyN, mean squares as in the others)."""
    import ants

    fixed, moving = ants.from_numpy(f.astype(np.float32)), ants.from_numpy(m.astype(np.float32))
    t0 = time.perf_counter()
    reg = ants.registration(fixed, moving, type_of_transform="SyN", syn_metric="meansquares",
                            aff_metric="meansquares")
    ms = (time.perf_counter() - t0) * 1e3
    # where each reference voxel lies in the moving volume: the moving grid's own coordinates pulled back
    # through the forward transforms (exact for a linear function, no point-convention question)
    coords = np.indices(f.shape, dtype=np.float32)
    disp = np.stack([ants.apply_transforms(fixed, ants.from_numpy(coords[i]), reg["fwdtransforms"],
                                           interpolator="linear").numpy() - coords[i] for i in range(3)])
    return ms, disp


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=None,
                    help="SIZE:AMPLITUDE:SIGMA:NOISE (voxels, voxels, voxels or '-', fraction); default: the sweep")
    ap.add_argument("--sizes", type=int, nargs="+", default=None,
                    help="only the sweep's cases of these sizes (or, with --legacy, issue 27's case at these sizes)")
    ap.add_argument("--legacy", action="store_true", help="issue 27's sinusoidal case (amplitude 3 at 64^3)")
    ap.add_argument("--spacing", type=float, default=8.0)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--no-elastix", action="store_true")
    ap.add_argument("--ants", action="store_true", help="also ANTs SyN (antspyx)")
    ap.add_argument("--ants-max-size", type=int, default=64, help="ANTs only on cases up to this size")
    ap.add_argument("--elastix-samples", type=int, nargs="+", default=[0],
                    help="elastix NumberOfSpatialSamples per run (0: its default, 2048); the first is the row's "
                         "reference, all are listed under reference_variants")
    ap.add_argument("--elastix-bending", type=float, nargs="*", default=[],
                    help="also elastix with its bending-energy penalty at these weights (reference_variants)")
    ap.add_argument("--elastix-raw", action="store_true",
                    help="also elastix on the unprepared volumes (its own input; issue 27's caveat)")
    ap.add_argument("--interpolation", default=None, choices=["linear", "cubic"],
                    help="gpureg's sampling of the moving volume in the objective (default: gpureg's)")
    ap.add_argument("--regularization", type=float, default=None, help="gpureg's bending-energy weight")
    ap.add_argument("--binarize", action="store_true", help="prepare both volumes binarized (default grey)")
    ap.add_argument("--out-dir", default=None)
    ap.add_argument("--name", default="deformable")
    args = ap.parse_args(argv)
    if args.cases:
        cases = [parse_case(c) for c in args.cases]
    elif args.legacy:
        cases = [(n, 3.0, None, 0.0) for n in (args.sizes or [64, 128])]
    else:
        cases = [c for c in SWEEP if args.sizes is None or c[0] in args.sizes]
    opts = {k: v for k, v in (("interpolation", args.interpolation), ("regularization", args.regularization))
            if v is not None}
    prep = Prep(binarize=args.binarize, denoise="impulse")  # the common input of every method
    results, warm, load0 = [], False, os.getloadavg()[0]
    for size, amplitude, sigma, noise in cases:
        fixed, moving, points, truth, best = make_pair(size, amplitude=amplitude, sigma=sigma, noise=noise)
        f = prepare_volume(fixed, "cpu", prep)
        m = prepare_volume(moving, "cpu", prep)
        floor = float(np.linalg.norm(points @ best[:3, :3].T + best[:3, 3] - truth, axis=1).mean())
        if not warm:  # warm-up: kernel compilation (numba or NVRTC), elastix's and ANTs's first loads
            run_gpureg(f, m, args.spacing, args.device, **opts)
            if not args.no_elastix:
                run_elastix(f, m, args.spacing, args.elastix_samples[0])
            warm = True
        runs = [run_gpureg(f, m, args.spacing, args.device, **opts) for _ in range(args.repeats)]
        ms = float(np.median([r[0] for r in runs]))
        row = {"case": f"{size}^3 amplitude {amplitude:g} " + ("sinusoidal" if sigma is None else f"sigma {sigma:g}")
                       + f" noise {noise:g}", "size": size, "amplitude": amplitude, "sigma": sigma, "noise": noise,
               "spacing": args.spacing, **opts, "registration_ms": round(ms, 1),
               "error_vox": round(mean_error(runs[-1][1], points, truth), 4),
               "min_jacobian": round(runs[-1][2], 4), "best_affine_error_vox": round(floor, 4),
               "identity_error_vox": round(float(np.linalg.norm(points - truth, axis=1).mean()), 4)}
        if not args.no_elastix:
            variants = []
            for samples, bending in ([(s, 0.0) for s in args.elastix_samples]
                                     + [(args.elastix_samples[0], b) for b in args.elastix_bending]):
                ref = [run_elastix(f, m, args.spacing, samples, bending) for _ in range(args.repeats)]
                variants.append({"samples": samples or 2048, "bending_weight": bending,
                                 "reference_ms": round(float(np.median([r[0] for r in ref])), 1),
                                 "reference_error_vox": round(mean_error(ref[-1][1], points, truth), 4),
                                 "reference_min_jacobian": round(bspline_free_min_jacobian(ref[-1][1]), 4)})
            if args.elastix_raw:
                raw_f, raw_m = (np.asarray(v, np.float32) for v in (fixed, moving))
                ref = [run_elastix(raw_f, raw_m, args.spacing, args.elastix_samples[0]) for _ in range(args.repeats)]
                variants.append({"samples": args.elastix_samples[0] or 2048, "bending_weight": 0.0,
                                 "input": "unprepared volumes",
                                 "reference_ms": round(float(np.median([r[0] for r in ref])), 1),
                                 "reference_error_vox": round(mean_error(ref[-1][1], points, truth), 4),
                                 "reference_min_jacobian": round(bspline_free_min_jacobian(ref[-1][1]), 4)})
            first = variants[0]
            row.update({"reference": "elastix (itk-elastix) affine + bspline, AdvancedMeanSquares, "
                                     f"NumberOfSpatialSamples {first['samples']}",
                        **{k: v for k, v in first.items() if k not in ("samples", "bending_weight", "input")},
                        "ratio": round(ms / first["reference_ms"], 3), "reference_variants": variants})
        if args.ants and size <= args.ants_max_size:
            a_ms, a_disp = run_ants(f, m)
            row.update({"ants_ms": round(a_ms, 1), "ants_error_vox": round(mean_error(a_disp, points, truth), 4)})
        print(row, flush=True)
        results.append(row)
    save(args.name, args.device, results, out_dir=args.out_dir,
         extra={"threads": args.threads, "load_before_after": [round(load0, 2), round(os.getloadavg()[0], 2)],
                "prep": repr(prep), "note": "same prepared arrays for every method; errors: mean distance to "
                "the exact truth over the particle voxels; ratio = gpureg time / elastix time (same run)"})


def bspline_free_min_jacobian(displacement):
    """Smallest det(I + grad displacement) of a dense field (central differences)."""
    g = [np.gradient(displacement[i].astype(np.float64)) for i in range(3)]
    jac = np.array([[g[i][k] + (1.0 if i == k else 0.0) for k in range(3)] for i in range(3)])
    return float(np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1))).min())


if __name__ == "__main__":
    main()
