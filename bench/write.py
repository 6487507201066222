"""Result-file compression: write and read throughput and compression ratio of HDF5 filters on tomograms.

What is measured, per codec and per volume: one float32 tomogram written by h5py into a dataset chunked
as the result file chunks ``/recon`` and ``/aligned`` (16 planes x the whole slice), from
``create_dataset`` to the file's close (so the filter's work and the flush are both counted), then read
back whole from a new handle; MB/s of uncompressed data, median of ``--repeats`` after one warm-up.
``ratio`` is the uncompressed size over the dataset's stored size.

Volumes: the two-particle phantom of ``gpureg.synth`` at ``--size`` (a clean tomogram: smooth particles on
an exactly zero background) and the same with 2 % Gaussian noise everywhere (what FBP gives: no exactly
constant background). The codecs are those ``gpureg.io.results`` offers (``COMPRESSIONS``), so the
benchmark is also the record of why the default is the default. The reference is gzip level 1 + shuffle
(the default before issue 30); ``ratio_vs_gzip`` is gzip's write time over the codec's.

With ``--pipeline N``: ``gpureg run`` at ``N``^3 with the default codec, ``--keep none`` and gzip level 1,
and how long the processing thread waited for the background writer (``write_wait_ms``).

Usage: ``python bench/write.py [--size 256] [--repeats 3] [--dir /tmp] [--pipeline 128 --energies 12]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import save  # noqa: E402
from gpureg.io.results import COMPRESSIONS, DEFAULT_COMPRESSION, dataset_filter  # noqa: E402

REFERENCE = "gzip:1"


def volumes(n: int) -> dict[str, np.ndarray]:
    """The clean phantom and the phantom with 2 % Gaussian noise (of its maximum), float32 ``(n, n, n)``."""
    from gpureg.synth.phantom import two_particle_phantom

    clean = np.ascontiguousarray(two_particle_phantom((n, n, n)), dtype=np.float32)
    rng = np.random.default_rng(0)
    noisy = (clean + rng.normal(0, 0.02 * float(clean.max()), clean.shape)).astype(np.float32)
    return {"clean": clean, "noisy 2 %": noisy}


def measure(vol: np.ndarray, spec: str, folder: Path, repeats: int) -> dict:
    """Write/read MB/s (median over ``repeats`` after one warm-up) and the compression ratio of one codec."""
    import h5py

    kwargs = dataset_filter(spec)
    chunks = (min(16, vol.shape[0]), *vol.shape[1:])
    path = folder / "bench_write.h5"
    writes, reads, stored = [], [], 0
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        with h5py.File(path, "w") as h5:
            h5.create_dataset("v", data=vol, chunks=chunks, **kwargs)
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        with h5py.File(path, "r") as h5:
            back = h5["v"][...]
            stored = h5["v"].id.get_storage_size()
        t_read = time.perf_counter() - t0
        if not np.array_equal(back, vol):
            raise AssertionError(f"{spec}: data read back differ from what was written")
        if i:  # the first round is the warm-up
            writes.append(t_write)
            reads.append(t_read)
    path.unlink()
    mb = vol.nbytes / 1e6
    return {"codec": spec, "write_ms": 1e3 * statistics.median(writes), "read_ms": 1e3 * statistics.median(reads),
            "write_mb_s": mb / statistics.median(writes), "read_mb_s": mb / statistics.median(reads),
            "ratio": vol.nbytes / max(stored, 1)}


def pipeline_rows(n: int, n_energy: int, folder: Path, repeats: int = 3) -> list[dict]:
    """``gpureg.run`` on reconstructed volumes (no FBP: writing is the largest possible share) at ``n``^3.

    Rows: the default codec, ``--keep none`` (the maps only; the stacks still pass through the
    ``.partial`` file, which the run needs for the maps and to resume), and gzip level 1 (the old default).
    ``write_wait_s`` is the time the processing thread waited for the writer: what writing added to the wall.
    One warm-up run first; then ``repeats`` interleaved rounds of the three, medians.
    """
    import h5py

    import gpureg
    from gpureg.io import write_dataexchange

    energies = np.linspace(6500.0, 6600.0, n_energy)
    step = 0.3 + 0.7 / (1 + np.exp(-(energies - 6550.0) / 3.0))
    c = (n - 1) / 2.0
    vols = []
    for k, s in enumerate(step):
        a = (n_energy - 1 - k) / max(n_energy - 1, 1)
        m = gpureg.rotation_matrix(1.5 * a, (0.2, 1, 0.4), (c, c, c))
        m[:3, 3] += np.array([1.0, -1.5, 0.5]) * a
        vols.append(gpureg.two_particle_phantom((n,) * 3, m) * s)
    src = write_dataexchange(folder / "series.h5", recon=vols, energy=energies)
    cases = (("default codec", {}), ("--keep none", {"keep": ()}), ("gzip:1", {"compression": "gzip:1"}))
    gpureg.run(src, folder / "warm-up.h5", gpureg.RunOptions(report=False), overwrite=True)  # compiled kernels loaded
    times = {label: [] for label, _ in cases}
    for _ in range(repeats):  # interleaved rounds, so a change of machine load hits every case alike
        for label, opts in cases:
            out = folder / "out.h5"
            t0 = time.perf_counter()
            gpureg.run(src, out, gpureg.RunOptions(report=False, **opts), overwrite=True)
            wall = time.perf_counter() - t0
            with h5py.File(out, "r") as h5:
                attrs = h5["timings/write"].attrs
                busy, waited = float(attrs.get("write_busy_s", np.nan)), float(attrs.get("write_wait_s", np.nan))
            times[label].append((wall, busy, waited))
    rows = []
    for label, _ in cases:
        wall, busy, waited = (statistics.median(t[k] for t in times[label]) for k in range(3))
        rows.append({"case": f"gpureg run, {n_energy} reconstructed energies of {n}^3 (no FBP), {label}",
                     "size": n, "n_energy": n_energy, "run": label, "wall_ms": 1e3 * wall, "repeats": repeats,
                     "write_busy_ms": 1e3 * busy, "write_wait_ms": 1e3 * waited, "write_wait_share": waited / wall})
    base = rows[1]["wall_ms"]
    for r in rows:
        r.update(reference="--keep none", reference_ms=base, ratio=base / r["wall_ms"])
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="folder for the temporary file (default: the system's temp dir)")
    ap.add_argument("--pipeline", type=int, default=0, metavar="N",
                    help="also time gpureg run at N^3 (default codec, --keep none, gzip:1)")
    ap.add_argument("--energies", type=int, default=12, help="energies of the --pipeline series")
    args = ap.parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for name, vol in volumes(args.size).items():
            rows = {spec: measure(vol, spec, Path(tmp), args.repeats) for spec in COMPRESSIONS}
            ref = rows[REFERENCE]
            for spec, row in rows.items():
                row.update(case=f"{name} {args.size}^3 float32, chunks 16 x {args.size}^2", volume=name,
                           size=args.size, reference=REFERENCE, reference_ms=ref["write_ms"],
                           ratio_vs_gzip=ref["write_ms"] / row["write_ms"],
                           compression_vs_gzip=row["ratio"] / ref["ratio"], default=spec == DEFAULT_COMPRESSION)
                results.append(row)
    print(f"{'volume':10} {'codec':22} {'write MB/s':>10} {'read MB/s':>10} {'ratio':>6} {'x gzip':>7}")
    for r in results:
        print(f"{r['volume']:10} {r['codec']:22} {r['write_mb_s']:10.0f} {r['read_mb_s']:10.0f} {r['ratio']:6.3f} "
              f"{r['ratio_vs_gzip']:7.1f}")
    if args.pipeline:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            runs = pipeline_rows(args.pipeline, args.energies, Path(tmp), args.repeats)
        for r in runs:
            print(f"{r['case']}: {r['wall_ms'] / 1e3:.1f} s, writer busy {r['write_busy_ms'] / 1e3:.2f} s, "
                  f"waited for {r['write_wait_ms'] / 1e3:.2f} s ({100 * r['write_wait_share']:.1f} % of the wall)")
        results += runs
    save("write", "cpu", results, extra={"default": DEFAULT_COMPRESSION, "threads": os.cpu_count(),
                                        "load_average": round(os.getloadavg()[0], 2)})


if __name__ == "__main__":
    main()
