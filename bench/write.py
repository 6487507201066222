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

Usage: ``python bench/write.py [--size 256] [--repeats 3] [--dir /tmp]``
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="folder for the temporary file (default: the system's temp dir)")
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
    save("write", "cpu", results, extra={"default": DEFAULT_COMPRESSION, "threads": os.cpu_count()})


if __name__ == "__main__":
    main()
