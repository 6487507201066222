"""Following a live Bluesky run through Tiled (issue 28): latency per energy, a 10 s server outage, equality.

A ``RunEngine`` with ``ophyd.sim`` devices writes an energy x angle scan through ``TiledWriter`` into a
Tiled catalog server (tests/tiled_servers.py, tests/bluesky_scan.py) while ``gpureg watch URI`` follows it
in another process; before energy ``--outage-at`` the server is stopped for ``--outage`` seconds and started
again on the same port. Per energy: ``after_last_frame_s`` (the energy's last frame, by the run's time stamp
-> registered, as the watcher prints it), ``processing_s`` (read + reconstruct + register) and ``slack_s`` =
``after_last_frame_s - processing_s`` (the issue asks <= 2 s). Then: the live result against the same command on
the finished run, and ``gpureg run`` on a file served by ``tiled serve directory`` against ``gpureg run`` on the
file (matrix corner displacement, voxels; edge map, eV). Needs ``pip install '.[live-test]'``.

Per energy it also gives the last frame's and the registration's times (seconds from the run's start),
``written_after_s`` (the last frame -> TiledWriter had written it to the server: the writer's share),
``found_after_s`` (the last frame -> the watcher found the energy complete) and ``in_outage`` (its last frame ->
registered interval overlaps the server outage; such energies are reported but not held to the bar). The run's
start document records ``num_angles`` (an energy is processed once its projections are in); ``--no-plan``
leaves it out (an energy is processed once the next one starts, after the monochromator's move: ``--move``
seconds, 3 by default). The server streams updates (the watcher's
subscription wakes it); ``--no-streaming`` serves the run without (the watcher only polls). The load average
(``uptime``) before and after is saved: the machine may be shared.

Usage: ``python bench/live_tiled.py [--energies 6] [--angles 31] [--size 24] [--outage 10] [--no-plan]
[--no-streaming] [--move 3]``
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

LINE = re.compile(r"^([\d.]+) eV: registered ([\d.]+) s after its last frame \(found after ([\d.]+) s, "
                  r"processing ([\d.]+) s")


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
    ap.add_argument("--move", type=float, default=3.0, help="seconds the monochromator takes between energies")
    ap.add_argument("--no-plan", action="store_true", help="leave num_angles out of the start document")
    ap.add_argument("--no-streaming", action="store_true", help="a server without a streaming cache (polling only)")
    args = ap.parse_args()
    from tiled.client import from_uri

    from gpureg.io import open_input

    load_before = os.getloadavg()
    import gpureg

    energies = list(np.linspace(6500.0, 6600.0, args.energies).round(1))
    work = Path(tempfile.mkdtemp(prefix="gpureg-live-bench-"))
    (work / "frames").mkdir()
    a = bluesky_scan.scan_arrays(work / "scan.h5", energies=energies, n_angles=args.angles, size=args.size)
    a["data_white"], a["data_dark"] = a["data_white"][:, :3], a["data_dark"][:2]
    server = tiled_servers.catalog(work / "catalog", work / "frames", work / "tiled.log",
                                   streaming=not args.no_streaming)
    env = {**os.environ, "TILED_API_KEY": tiled_servers.KEY, "PYTHONPATH": str(ROOT)}
    env.pop("TILED_RETRY_ATTEMPTS", None)
    out, procs, times = work / "live.h5", [], {}

    def on_start(uid):
        times["uid"] = uid
        procs.append(subprocess.Popen([sys.executable, "-m", "gpureg", "watch", f"{server.uri}/{uid}", str(out),
                                       "--no-report", "--device", "cpu"], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))

    written = {}  # event time -> when TiledWriter had written it (primary stream)
    descriptors = {}

    def after_write(name, doc):
        if name == "descriptor":
            descriptors[doc["uid"]] = doc["name"]
        elif name == "event" and descriptors.get(doc["descriptor"]) == "primary":
            written[round(doc["time"], 6)] = time.time()

    def before_energy(k):
        if k > 0:  # the monochromator moving to the next energy: nothing written meanwhile
            time.sleep(args.move)
        if k == args.outage_at:
            times["outage_from"] = time.time()
            server.stop()
            time.sleep(args.outage)
            t0 = time.monotonic()
            server.start()
            times["restart_s"] = time.monotonic() - t0
            times["outage_to"] = time.time()

    t0 = time.monotonic()
    try:
        uid = bluesky_scan.run_scan(from_uri(server.uri, api_key=tiled_servers.KEY), a, work / "frames",
                                    on_start=on_start, before_energy=before_energy, record_plan=not args.no_plan,
                                    after_write=after_write)
        scan_s = time.monotonic() - t0
        log, _ = procs[0].communicate(timeout=900)
        rows = []
        for line in log.splitlines():
            m = LINE.match(line)
            if m:
                e, after, found, proc = map(float, m.groups())
                rows.append({"energy_ev": e, "after_last_frame_s": after, "found_after_s": found,
                             "processing_s": proc, "slack_s": round(after - proc, 3)})
        os.environ["TILED_API_KEY"] = tiled_servers.KEY
        t_start = float(from_uri(f"{server.uri}/{uid}", api_key=tiled_servers.KEY).metadata["start"]["time"])
        with open_input(f"{server.uri}/{uid}") as run:
            last = {round(float(e), 1): run.last_frame_time(i) for i, e in enumerate(run.energies)}
        for r in rows:
            t_last = last[round(r["energy_ev"], 1)]
            r["last_frame_at_s"] = round(t_last - t_start, 2)
            r["written_after_s"] = round(written.get(round(t_last, 6), float("nan")) - t_last, 2)
            r["registered_at_s"] = round(r["last_frame_at_s"] + r["after_last_frame_s"], 2)
            lo, hi = times["outage_from"] - t_start, times["outage_to"] - t_start
            r["in_outage"] = bool(r["last_frame_at_s"] < hi and r["registered_at_s"] > lo)
            r["meets_bar"] = r["slack_s"] <= 2.0
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
    clean = [r for r in rows if not r["in_outage"]]
    extra = {"scan": f"{args.energies} energies x {args.angles} angles at {args.size}^2, 3 flats per energy, 2 darks",
             "completion": "next energy starts (no num_angles)" if args.no_plan else "planned projections (num_angles)",
             "server_streams": not args.no_streaming, "monochromator_move_s": args.move,
             "watcher_woken_by_streaming": any("the server streams the run's updates" in line
                                               for line in log.splitlines()),
             "load_average_before": [round(v, 2) for v in load_before],
             "load_average_after": [round(v, 2) for v in os.getloadavg()],
             "bar": "after_last_frame_s - processing_s <= 2 s, energies outside the outage",
             "bar_met": bool(clean) and all(r["meets_bar"] for r in clean),
             "max_slack_outside_outage_s": max((r["slack_s"] for r in clean), default=None),
             "scan_s": round(scan_s, 1), "outage_s": args.outage,
             "server_restart_s": round(times.get("restart_s", float("nan")), 1),
             "outage_lines": [line for line in log.splitlines() if "retrying (up to" in line or "back after" in line],
             "energies_in_result": len(rows), "live_vs_finished_run": live_vs_finished,
             "run_uri_vs_run_file": _compare(work / "file.h5", work / "uri.h5", args.size)}
    name = "live_tiled_" + ("next_energy" if args.no_plan else "planned") + ("_polling" if args.no_streaming else "")
    save(name, "cpu", rows, extra=extra)


if __name__ == "__main__":
    main()
