"""Benchmark: linear-combination fitting and k-means of voxel spectra (issue 17), with accuracy against truth.

Data: ``n_energy x size^3`` float32 stack (default 60 energies, 15 eV steps off
the edge and 1.5 eV across it) of MnO/Mn2O3 mixtures (:mod:`gpureg.synth.mixtures`)
with a fraction varying across the volume, a random per-voxel edge step
(0.6-5) and Gaussian noise of 1 % of the step; 10 % background voxels.

Cases (``gpureg.xanes.chemistry_map`` over z-slabs, from host memory):
``lcf``: Larch-compatible normalisation + batched NNLS fit to the 2 references;
``kmeans``: normalisation, k-means (k=2) on a 100 000-voxel sample, then a
second normalisation pass assigning every voxel. ``chain``: the whole chemistry of issue 26 with each stage timed:
spectral basis (PCA, components from the data) + edge map with denoising and
the sigma map (one normalisation, common E0) + LCF + k-means on the denoised
spectra. Accuracy: fraction RMS error
against truth; share of voxels whose cluster matches the sign of ``f - 0.5``
with k=2. Reference: ``scipy.optimize.nnls`` per voxel on the normalised
spectra (as a script would loop), timed on 2000 voxels and scaled to the
stack (``reference_extrapolated``).

Usage: ``python bench/chemistry.py [--quick] [--device auto|cpu|gpu] [--size N] [--repeats R] [--cases lcf,kmeans,chain]``
(``bench/gpu_check.sh`` runs ``--device gpu --size 128 --cases chain``: the whole chain of issue 26 on the GPU.)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import median_time, save  # noqa: E402

from gpureg.core.backend import resolve_device  # noqa: E402
from gpureg.synth.mixtures import reference_spectra  # noqa: E402
from gpureg.xanes import chemistry_map, edge_energy_map, pre_edge, scan_energies  # noqa: E402


def make_stack(energies, size, seed=0):
    """(stack (n_e, size^3) float32, fraction of Mn2O3 (size^3), inside mask) - built one energy at a time."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[:size, :size, :size]
    f = np.clip((x + 0.5 * y + 0.25 * z) / (1.75 * (size - 1)), 0, 1) * np.ones((size,) * 3)
    inside = rng.random((size,) * 3) > 0.1
    step = np.where(inside, rng.uniform(0.6, 5.0, (size,) * 3), 0.0).astype(np.float32)
    refs = reference_spectra()
    (ea, ma), (eb, mb) = refs["MnO"], refs["Mn2O3"]
    a, b = np.interp(energies, ea, ma), np.interp(energies, eb, mb)
    stack = np.empty((energies.size, size, size, size), np.float32)
    fb = f.astype(np.float32)
    for i in range(energies.size):
        stack[i] = step * (np.float32(a[i]) + fb * np.float32(b[i] - a[i]))
        stack[i] += rng.normal(0, 0.01, (size,) * 3).astype(np.float32) * np.maximum(step, 1.0)
    return stack, f, inside, refs


def reference_nnls(stack, energies, refs, n=2000, seed=1):
    """Seconds per voxel of a per-voxel scipy NNLS loop on normalised spectra (normalisation not timed)."""
    from scipy.optimize import nnls

    rng = np.random.default_rng(seed)
    cols = rng.choice(stack[0].size, n, replace=False)
    mu = stack.reshape(energies.size, -1)[:, cols]
    y = np.asarray(pre_edge(mu, energies)["norm"], dtype=np.float64)
    A = np.stack([np.interp(energies, e, m) for e, m in refs.values()], axis=1)
    A = np.asarray(pre_edge(A.astype(np.float32), energies)["norm"], dtype=np.float64)
    A = np.c_[A, np.ones(energies.size)]
    ok = np.isfinite(y).all(axis=0)
    t0 = time.perf_counter()
    for j in np.flatnonzero(ok):
        nnls(A, y[:, j])
    return (time.perf_counter() - t0) / max(int(ok.sum()), 1)


def chain(stack, E, f, inside, refs_list, dev, slab):
    """Normalise + denoise + edge map (+ sigma) + LCF + k-means, stage by stage (seconds)."""
    t0 = time.perf_counter()
    info = {}
    maps = edge_energy_map(stack, E, slab=slab, device=dev, denoise="auto", info=info)
    t1 = time.perf_counter()
    out = chemistry_map(stack, E, references=refs_list, names=["MnO", "Mn2O3"], k=2, mask=maps["mask"], slab=slab,
                        device=dev, e0=info["e0"], denoise=info["basis"])
    t2 = time.perf_counter()
    sel = out["mask"] & inside
    rms = float(np.sqrt(np.mean((out["fractions"][1][sel] - f[sel]) ** 2)))
    return {"case": "chain: PCA basis + denoise + edge map + sigma + LCF + k-means (k=2)", "size": int(stack.shape[1]),
            "n_energy": int(E.size), "time_ms": round((t2 - t0) * 1e3, 1),
            "edge_map_with_denoise_ms": round((t1 - t0) * 1e3, 1), "lcf_kmeans_ms": round((t2 - t1) * 1e3, 1),
            "components": info["basis"].k, "voxels_per_s": round(stack[0].size / (t2 - t0)),
            "fraction_rms_error": round(rms, 4),
            "median_sigma_ev": round(float(np.nanmedian(maps["edge_energy_sigma"])), 4)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="64^3 only")
    p.add_argument("--device", default="auto")
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--slab", type=int, default=16)
    p.add_argument("--cases", default="lcf,kmeans,chain", help="comma list of lcf, kmeans, chain")
    args = p.parse_args(argv)
    cases = {c.strip() for c in args.cases.split(",") if c.strip()}
    if not cases or cases - {"lcf", "kmeans", "chain"}:
        p.error(f"--cases: a comma list of lcf, kmeans, chain, got {args.cases!r}")
    dev = resolve_device(args.device)
    size = args.size or (64 if args.quick else (512 if dev == "gpu" else 128))
    E = scan_energies(fine_step=1.5)
    t0 = time.perf_counter()
    stack, f, inside, refs = make_stack(E, size)
    print(f"stack {stack.shape} built in {time.perf_counter() - t0:.1f} s", flush=True)
    refs_list = [refs["MnO"], refs["Mn2O3"]]
    results = []
    if "lcf" in cases:
        ms, out = median_time(lambda: chemistry_map(stack, E, references=refs_list, names=["MnO", "Mn2O3"],
                                                    slab=args.slab, device=dev),
                              repeats=args.repeats, warmup=0, device=dev)
        sel = out["mask"] & inside
        rms = float(np.sqrt(np.mean((out["fractions"][1][sel] - f[sel]) ** 2)))
        per_voxel = reference_nnls(stack, E, refs)
        ref_ms = per_voxel * stack[0].size * 1e3
        results.append({"case": "lcf (normalise + NNLS, 2 references + offset)", "size": size, "n_energy": int(E.size),
                        "time_ms": round(ms, 1), "voxels_per_s": round(stack[0].size / (ms / 1e3)),
                        "fraction_rms_error": round(rms, 4), "voxels_fitted": int(out["mask"].sum()),
                        "reference": "scipy.optimize.nnls per voxel (normalisation not timed)",
                        "reference_ms": round(ref_ms, 1), "reference_extrapolated": True,
                        "ratio": round(ref_ms / ms, 1)})
        print(results[-1], flush=True)
        del out
    if "kmeans" in cases:
        for k in (2,):
            ms, out = median_time(lambda: chemistry_map(stack, E, k=k, slab=args.slab, device=dev),
                                  repeats=args.repeats, warmup=0, device=dev)
            row = {"case": f"kmeans k={k} (normalise x2, 100k-voxel sample)", "size": size, "n_energy": int(E.size),
                   "time_ms": round(ms, 1), "voxels_per_s": round(stack[0].size / (ms / 1e3))}
            if k == 2:
                truth = np.where(f > 0.5, 2, 1)
                sel = out["mask"] & inside & (np.abs(f - 0.5) > 0.1)
                row["cluster_accuracy_f_off_0.5_by_0.1"] = round(float((out["clusters"][sel] == truth[sel]).mean()), 4)
            results.append(row)
            print(row, flush=True)
            del out
    if "chain" in cases:
        if dev == "gpu":  # warm-up on 8 planes: CuPy compiles its kernels on first use
            chain(stack[:, :8], E, f[:8], inside[:8], refs_list, dev, args.slab)
        results.append(chain(stack, E, f, inside, refs_list, dev, args.slab))
        print(results[-1], flush=True)
    load = [round(x, 2) for x in os.getloadavg()]  # measured, not assumed: timings on a shared CPU vary ~10x with load
    save("chemistry", dev, results, extra={"conditions": ("CPU" if dev == "cpu" else "single GPU, stack streamed "
                                                          "from host") + f"; load average (1, 5, 15 min) {load}"})


if __name__ == "__main__":
    main()
