"""End-to-end pipeline benchmark: N energies x 181 projections x n^2, with the per-stage split.

Simulates a Mn K-edge experiment (gpureg.synth, not timed), then times
``gpureg.pipeline.runner.run`` from raw projections to edge-energy maps (report
figures excluded) and reads the per-stage seconds the result file records.
Reference, measured in the same run on the same data: SimpleITK's affine
registration of one energy (the median-distance one) to the reference,
scaled by the number of registered energies, against gpureg's whole
registration stage (``ratio``), since a full SimpleITK pipeline would take hours.

    python bench/pipeline.py                 # CPU: n = 128, N = 8
    python bench/pipeline.py --quick         # n = 48, N = 6
    python bench/pipeline.py --size 512 --energies 60 --device gpu
    python bench/pipeline.py --engines numba numpy   # CPU: the compiled kernels, then the NumPy reference
                                                     # (the path before the compiled engine), same data

With several ``--engines`` the simulated data are shared and each engine's run is a row.
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

import h5py  # noqa: E402
import numpy as np  # noqa: E402

import gpureg  # noqa: E402
from common import save  # noqa: E402
from gpureg.core.backend import resolve_device  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--energies", type=int, default=8)
    ap.add_argument("--angles", type=int, default=181)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="n = 48, N = 6")
    ap.add_argument("--no-sitk", action="store_true")
    ap.add_argument("--compression", default=None,
                    help="codec of the result file (default: gpureg's; see gpureg.io.results.COMPRESSIONS)")
    ap.add_argument("--engines", nargs="+", choices=["numba", "numpy"], default=["numba"],
                    help="CPU engines to run in turn on the same data (gpureg.config.cpu_backend)")
    args = ap.parse_args(argv)
    size, n_e = (48, 6) if args.quick else (args.size, args.energies)
    dev = resolve_device(args.device)
    from gpureg.pipeline import run
    from gpureg.synth import mn_energy_grid, simulate

    grid = np.asarray(mn_energy_grid())
    energies = grid[np.linspace(0, len(grid) - 1, n_e).round().astype(int)]
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.h5"
        t0 = time.perf_counter()
        simulate(raw, size=size, energies=energies, n_angles=args.angles, seed=0)
        sim_s = time.perf_counter() - t0
        rows = []
        for i, engine in enumerate(args.engines):
            out = Path(tmp) / f"out-{engine}.h5"
            t0 = time.perf_counter()
            with gpureg.config(cpu_backend=engine):
                res = run(raw, out, device=dev, report=False,
                      **({"compression": args.compression} if args.compression else {}))
            wall = time.perf_counter() - t0
            stages = {k: float(v.sum()) for k, v in res.timings.items()}
            with h5py.File(out) as h5:
                truth, labels = h5["truth/matrices"][...], h5["truth/labels"][...]
                errs = [gpureg.displacement_error(m, t, mask=labels > 0)[0] for m, t in zip(res.matrices, truth)]
                row = {"case": "simulated Mn K-edge, projections -> edge maps", "size": size, "energies": n_e,
                       "angles": args.angles, "pipeline_ms": round(wall * 1e3, 1),
                       "stage_ms": {k: round(v * 1e3, 1) for k, v in stages.items()},
                       "per_energy_ms": round(wall * 1e3 / n_e, 1), "simulate_ms_not_timed": round(sim_s * 1e3),
                       "error_vox_median": round(float(np.median(errs)), 4),
                       "error_vox_max": round(float(np.max(errs)), 4), "cpu_engine": engine}
                row.update(_write_throughput(h5))
                if not args.no_sitk and i == 0:
                    row.update(_sitk_reference(h5, res, stages["register"]))
            print(row, flush=True)
            rows.append(row)
    save("pipeline", dev, rows, extra={"quick": args.quick, "engines": args.engines,
                                       "load_average": round(os.getloadavg()[0], 2)})


def _write_throughput(h5) -> dict:
    """The background writer's share: MB/s of uncompressed stack data it wrote, and the wall time it added."""
    attrs = h5["timings/write"].attrs
    busy, waited = float(attrs.get("write_busy_s", np.nan)), float(attrs.get("write_wait_s", np.nan))
    mb = sum(h5[name].size * h5[name].dtype.itemsize for name in ("recon", "aligned") if name in h5) / 1e6
    return {"write_busy_ms": round(busy * 1e3, 1), "write_wait_ms": round(waited * 1e3, 1),
            "write_mb_s": round(mb / busy, 1) if busy > 0 else None,
            "compression": str(h5["aligned"].attrs.get("compression", "gzip:1"))}


def _sitk_reference(h5, res, register_s):
    from gpureg.register import prepare_volume
    from gpureg.register.series import registration_order
    from gpureg.validate.sitk import register_sitk, sitk_available

    if not sitk_available():
        return {}
    order = registration_order(res.energies, res.reference_index)[1:]
    i = order[len(order) // 2]
    f = prepare_volume(h5["recon"][res.reference_index], "cpu", gpureg.Prep())
    m = prepare_volume(h5["recon"][i], "cpu", gpureg.Prep())
    _, seconds = register_sitk(f, m)
    ref_ms = seconds * 1e3 * len(order)
    return {"reference": "SimpleITK affine MSE, one energy x registered energies", "reference_ms": round(ref_ms, 1),
            "ratio": round(ref_ms / (register_s * 1e3), 2)}


if __name__ == "__main__":
    main()
