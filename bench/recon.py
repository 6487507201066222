"""FBP throughput per energy: ASTRA's CPU FBP, and the ASTRA CUDA slab path where available.

Cases: 256^2 and 512^2 slices x 181 angles (-90..90 degrees), Ram-Lak.

- GPU (ASTRA built with CUDA and a device): whole volumes (256^3, 512^3), NumPy
  projections in and a NumPy volume out, so host<->device copies are included;
  median of repeats after one warm-up (which also runs the one-off calibration).
- CPU: ASTRA's CPU FBP is single-threaded and costs the same for every slice,
  so a block of slices is timed and the per-energy time is extrapolated to all
  ``n`` slices (``"extrapolated": true`` in the JSON).
- Reference: scikit-image's ``iradon`` (ramp filter, linear interpolation) on
  a few slices of the same data, extrapolated the same way; ``ratio`` is its
  time over ours. ``corr`` is the correlation of our slice with the phantom.

Usage: ``python bench/recon.py [--quick] [--device auto|cpu|gpu]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import median_time, save  # noqa: E402
from gpureg import recon  # noqa: E402

N_ANGLES = 181


def slice_phantom(n: int) -> np.ndarray:
    """A 2D test slice: a few overlapping ellipses inside the field of view, attenuation ~0.02 / pixel."""
    y, x = (np.mgrid[0:n, 0:n] - (n - 1) / 2) / (n / 2)
    img = np.zeros((n, n))
    for cy, cx, ry, rx, v in ((0.0, 0.0, 0.8, 0.65, 0.01), (-0.25, -0.2, 0.25, 0.18, 0.02),
                              (0.3, 0.25, 0.15, 0.3, 0.015), (0.1, -0.35, 0.08, 0.08, -0.008)):
        img += v * (((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1)
    return img.astype(np.float32)


def projections(n: int, n_slices: int):
    """(n_angle, n_slices, n) projections: one forward-projected slice, scaled slightly per slice."""
    theta = np.linspace(-90.0, 90.0, N_ANGLES)
    img = slice_phantom(n)
    sino = recon.forward_project(img[None], theta, projector="line")[:, 0, :]
    scale = 1.0 + 0.01 * np.arange(n_slices, dtype=np.float32)
    return np.ascontiguousarray(sino[:, None, :] * scale[None, :, None]), theta, img


def run_case(n: int, *, device: str, cpu_slices: int, ref_slices: int, repeats: int) -> dict:
    row = {"case": f"FBP {n}^2 x {N_ANGLES} angles, ram-lak", "size": n, "n_angles": N_ANGLES, "slices": n}
    if device == "gpu":
        proj, theta, img = projections(n, n)
        ms, vol = median_time(lambda: recon.reconstruct_fbp(proj, theta, device="gpu"), repeats=repeats,
                              warmup=1, device="gpu")
        row.update({"device_path": "ASTRA BP3D_CUDA slabs + ramp filter (host arrays in/out)",
                    "energy_ms": ms, "slices_per_s": n / (ms / 1e3), "extrapolated": False})
    else:
        proj, theta, img = projections(n, cpu_slices)
        ms, vol = median_time(lambda: recon.reconstruct_fbp(proj, theta, device="cpu"), repeats=repeats, warmup=1)
        per_slice = ms / cpu_slices
        row.update({"device_path": "ASTRA CPU FBP (linear projector), slice by slice", "timed_slices": cpu_slices,
                    "energy_ms": per_slice * n, "slices_per_s": 1e3 / per_slice, "extrapolated": True})
    row["corr"] = float(np.corrcoef(vol[0].ravel(), img.ravel())[0, 1])
    row["seconds_per_energy"] = row["energy_ms"] / 1e3
    ref_ms = _reference_ms_per_slice(proj[:, :ref_slices], theta) * n
    row.update({"reference": "skimage.transform.iradon (ramp, linear)", "reference_ms": ref_ms,
                "reference_extrapolated": True, "ratio": ref_ms / row["energy_ms"]})
    return row


def _reference_ms_per_slice(proj, theta):
    from skimage.transform import iradon

    # iradon's angle convention differs from ASTRA's; only its time is used.
    sino = np.asarray(proj, dtype=np.float64)
    t0 = time.perf_counter()
    for z in range(sino.shape[1]):
        iradon(sino[:, z, :].T, theta=theta, filter_name="ramp", interpolation="linear", circle=True)
    return (time.perf_counter() - t0) * 1e3 / sino.shape[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few CPU slices, one repeat (< 1 min)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
    args = parser.parse_args(argv)
    device = args.device
    if device == "auto":
        device = "gpu" if recon.astra_cuda_available() else "cpu"
    if device == "gpu" and not recon.astra_cuda_available():
        raise SystemExit("bench/recon.py: --device gpu needs ASTRA built with CUDA and a GPU")
    repeats = 1 if args.quick else 5
    results = []
    for n in (256, 512):
        cpu_slices = (8 if n == 256 else 2) if args.quick else (32 if n == 256 else 8)
        ref_slices = 1 if args.quick else 2
        results.append(run_case(n, device=device, cpu_slices=cpu_slices, ref_slices=ref_slices, repeats=repeats))
        print(f"{results[-1]['case']}: {results[-1]['seconds_per_energy']:.3f} s per energy, "
              f"{results[-1]['slices_per_s']:.1f} slices/s on {device}", flush=True)
    if device == "gpu":  # the same cases on the CPU of this machine, for the speed-up
        for row in results:
            cpu = run_case(row["size"], device="cpu", cpu_slices=8, ref_slices=1, repeats=1)
            row["cpu_energy_ms"] = cpu["energy_ms"]
            row["speedup_vs_cpu"] = cpu["energy_ms"] / row["energy_ms"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # shared machines: say how busy it was
    save("recon", device, results, extra={"quick": bool(args.quick), "load_average_1min": load,
                                          "target": "512^3 energy <= 0.5 s on one H100"})


if __name__ == "__main__":
    main()
