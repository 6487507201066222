"""Following a live Bluesky run through Tiled (issue 28): latency per energy, a 10 s server outage, equality.

A ``RunEngine`` with ``ophyd.sim`` devices writes an energy x angle scan through ``TiledWriter`` into a
``tiled serve catalog`` (tests/tiled_servers.py, tests/bluesky_scan.py) while ``gpureg watch URI`` follows it
in another process; before energy ``--outage-at`` the server is stopped for ``--outage`` seconds and started
again on the same port. Per energy: ``after_last_frame_s`` (the energy's last frame, by the run's time stamp
-> registered, as the watcher prints it), ``processing_s`` (read + reconstruct + register) and ``slack_s`` =
``after_last_frame_s - processing_s`` (the issue asks <= 2 s). Then: the live result against the same command on
the finished run, and ``gpureg run`` on a file served by ``tiled serve directory`` against ``gpureg run`` on the
file (matrix corner displacement, voxels; edge map, eV). Needs ``pip install '.[live-test]'``.

Usage: ``python bench/live_tiled.py [--energies 6] [--angles 31] [--size 24] [--outage 10]``
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import bluesky_scan  # noqa: E402
import tiled_servers  # noqa: E402

from bench.common import save  # noqa: E402

LINE = re.compile(r"^([\d.]+) eV: registered ([\d.]+) s after its last frame \(processing ([\d.]+) s")


def _corner_shift(m1, m2, n):
    corners = np.array([[z, y, x, 1.0] for z in (0, n - 1) for y in (0, n - 1) for x in (0, n - 1)])
    return float(max(np.max(np.linalg.norm(corners @ (a - b).T, axis=1)) for a, b in zip(m1, m2)))


def _compare(a_path, b_path, n):
    import h5py

    with h5py.File(a_path) as a, h5py.File(b_path) as b:
        shift = _corner_shift(a["registration/matrix"][()], b["registration/matrix"][()], n)
        ea, eb = a["xanes/edge_energy"][()], b["xanes/edge_energy"][()]
    return {"matrix_corner_shift_vox": shift, "edge_map_max_abs_ev": float(np.nanmax(np.abs(ea - eb)))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--energies", type=int, default=6)
    ap.add_argument("--angles", type=int, default=31)
    ap.add_argument("--size", type=int, default=24)
    ap.add_argument("--outage", type=float, default=10.0)
    ap.add_argument("--outage-at", type=int, default=3)
    args = ap.parse_args()
    from tiled.client import from_uri

    import gpureg

    energies = list(np.linspace(6500.0, 6600.0, args.energies).round(1))
    work = Path(tempfile.mkdtemp(prefix="gpureg-live-bench-"))
    (work / "frames").mkdir()
    a = bluesky_scan.scan_arrays(work / "scan.h5", energies=energies, n_angles=args.angles, size=args.size)
    a["data_white"], a["data_dark"] = a["data_white"][:, :3], a["data_dark"][:2]
    server = tiled_servers.catalog(work / "catalog", work / "frames", work / "tiled.log")
    env = {**os.environ, "TILED_API_KEY": tiled_servers.KEY, "PYTHONPATH": str(ROOT)}
    env.pop("TILED_RETRY_ATTEMPTS", None)
    out, procs, times = work / "live.h5", [], {}

    def on_start(uid):
        times["uid"] = uid
        procs.append(subprocess.Popen([sys.executable, "-m", "gpureg", "watch", f"{server.uri}/{uid}", str(out),
                                       "--no-report", "--device", "cpu"], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))

    def before_energy(k):
        if k == args.outage_at:
            server.stop()
            time.sleep(args.outage)
            t0 = time.monotonic()
            server.start()
            times["restart_s"] = time.monotonic() - t0

    t0 = time.monotonic()
    try:
        uid = bluesky_scan.run_scan(from_uri(server.uri, api_key=tiled_servers.KEY), a, work / "frames",
                                    on_start=on_start, before_energy=before_energy)
        scan_s = time.monotonic() - t0
        log, _ = procs[0].communicate(timeout=900)
        rows = []
        for line in log.splitlines():
            m = LINE.match(line)
            if m:
                e, after, proc = map(float, m.groups())
                rows.append({"energy_ev": e, "after_last_frame_s": after, "processing_s": proc,
                             "slack_s": round(after - proc, 3)})
        os.environ["TILED_API_KEY"] = tiled_servers.KEY
        from gpureg.pipeline.live import follow_run

        follow_run(f"{server.uri}/{uid}", work / "batch.h5", report=False, device="cpu")
        live_vs_finished = _compare(out, work / "batch.h5", args.size)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        server.stop()
    (work / "files").mkdir()
    gpureg.simulate(work / "files" / "scan.h5", size=args.size, energies=energies, n_angles=args.angles, seed=3)
    srv = tiled_servers.directory(work / "files", work / "dir.log")
    try:
        gpureg.run(work / "files" / "scan.h5", work / "file.h5", report=False, device="cpu")
        gpureg.run(f"{srv.uri}/scan", work / "uri.h5", report=False, device="cpu")
    finally:
        srv.stop()
    extra = {"scan": f"{args.energies} energies x {args.angles} angles at {args.size}^2, 3 flats per energy, 2 darks",
             "load_average_1min": os.getloadavg()[0], "scan_s": round(scan_s, 1), "outage_s": args.outage,
             "server_restart_s": round(times.get("restart_s", float("nan")), 1),
             "outage_lines": [line for line in log.splitlines() if "retrying (up to" in line or "back after" in line],
             "energies_in_result": len(rows), "live_vs_finished_run": live_vs_finished,
             "run_uri_vs_run_file": _compare(work / "file.h5", work / "uri.h5", args.size)}
    save("live_tiled", "cpu", rows, extra=extra)


if __name__ == "__main__":
    main()
