"""SIGINT and SIGTERM at random points of `gpureg run` (issue 24): exit code, time to stop, lock, resume.

Simulates a small scan once, times one uninterrupted `gpureg run` (a separate process, as a user runs it), then,
for each signal, starts the same command ``--tries`` times and sends the signal at a uniformly random moment
in the first 80 % of the time the uninterrupted run took after its first progress line. Per try: exit code (must be 128 + signum;
0 only when the run had already finished), seconds from the signal to the exit, the one stderr line, whether
the lock is gone and a `.partial` is left; every ``--resume-every``-th try also reruns the command and compares
the result with the uninterrupted one bit for bit. A signal that arrives in the interpreter's own teardown
(after the result is renamed and the lock released; Python restores the default handlers there) ends the
process by the default action: counted apart (``killed_in_teardown_output_complete``).

    python bench/signals.py                  # 20 tries per signal, 24^3 x 25 angles x 9 energies
    python bench/signals.py --tries 40 --size 32
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
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

ROOT = Path(__file__).resolve().parents[1]
ENERGIES = [6500.0, 6530.0, 6540.0, 6548.0, 6552.0, 6556.0, 6570.0, 6600.0, 6650.0]


def _start(scan, out):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "gpureg", "run", str(scan), str(out), "--no-report"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)


def _first_line(proc):
    """Wait for the first progress line; seconds since start."""
    t0 = time.perf_counter()
    while True:
        line = proc.stderr.readline()
        if not line or line.startswith("run: ["):
            return time.perf_counter() - t0


def _same(a, b):
    with h5py.File(a) as x, h5py.File(b) as y:
        return all(np.array_equal(x[k][...], y[k][...], equal_nan=True)
                   for k in ("recon", "aligned", "registration/matrix", "xanes/edge_energy"))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tries", type=int, default=20)
    ap.add_argument("--size", type=int, default=24)
    ap.add_argument("--angles", type=int, default=25)
    ap.add_argument("--resume-every", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        scan = gpureg.simulate(tmp / "scan.h5", size=args.size, n_angles=args.angles, energies=ENERGIES)
        clean = tmp / "clean.h5"
        proc = _start(scan, clean)
        t_first = _first_line(proc)
        t0 = time.perf_counter()
        proc.communicate()
        span = time.perf_counter() - t0
        assert proc.returncode == 0 and clean.exists()
        print(f"uninterrupted: first progress line after {t_first:.2f} s, then {span:.2f} s to the end")
        for sig in (signal.SIGINT, signal.SIGTERM):
            for k in range(args.tries):
                out = tmp / f"{sig.name}_{k}.h5"
                proc = _start(scan, out)
                _first_line(proc)
                delay = rng.uniform(0.0, 0.8 * span)  # inside the run (later ones mostly land after it ended)
                time.sleep(delay)
                sent = time.perf_counter()
                finished_before = proc.poll() is not None
                proc.send_signal(sig)
                _, err = proc.communicate(timeout=600)
                stop_s = time.perf_counter() - sent
                lines = [ln for ln in err.splitlines() if ln.startswith("gpureg: interrupted")]
                row = {"signal": sig.name, "try": k, "delay_s": round(delay, 3), "exit_code": proc.returncode,
                       "stop_s": round(stop_s, 3), "finished_before_signal": finished_before,
                       "one_line": len(lines) == 1 and "Traceback" not in err and "Exception ignored" not in err,
                       "lock_released": not out.with_name(out.name + ".lock").exists(),
                       "partial_left": out.with_name(out.name + ".partial").exists(), "output_exists": out.exists()}
                if proc.returncode != 128 + sig:
                    row["stderr_tail"] = err[-1500:]
                if k % args.resume_every == 0 and not out.exists() and row["partial_left"]:
                    r = subprocess.run([sys.executable, "-m", "gpureg", "run", str(scan), str(out), "--no-report"],
                                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                       check=False)
                    row["resumed_ok"] = r.returncode == 0 and _same(out, clean)
                rows.append(row)
                print(row, flush=True)
    summary = {}
    for name in ("SIGINT", "SIGTERM"):
        rs = [r for r in rows if r["signal"] == name]
        num = signal.Signals[name].value
        sent = [r for r in rs if not r["finished_before_signal"]]  # the others had exited before the signal
        handled = [r for r in sent if r["exit_code"] == 128 + num]
        # -num: killed by the default action in the interpreter's own teardown (Python restores it there), after
        # the result was renamed and the lock released; the shell reports 128 + num as well.
        teardown = [r for r in sent if r["exit_code"] == -num]
        stops = sorted(r["stop_s"] for r in sent)
        summary[name] = {"tries": len(rs), "finished_before_signal": len(rs) - len(sent),
                         "exit_0_after_signal": sum(r["exit_code"] == 0 for r in sent),
                         "exit_128_plus_signal": len(handled), "killed_in_teardown_output_complete": len(teardown),
                         "teardown_outputs_complete": all(r["output_exists"] and not r["partial_left"]
                                                          for r in teardown),
                         "other_exit": sorted({r["exit_code"] for r in sent} - {128 + num, -num}),
                         "one_line_when_handled": sum(r["one_line"] for r in handled),
                         "lock_released": sum(r["lock_released"] for r in rs),
                         "partial_left_when_stopped_before_rename": sum(r["partial_left"] for r in handled
                                                                        if not r["output_exists"]),
                         "stopped_before_rename": sum(not r["output_exists"] for r in handled),
                         "stop_s_median": stops[len(stops) // 2], "stop_s_max": stops[-1],
                         "resumed_ok": [r["resumed_ok"] for r in rs if "resumed_ok" in r]}
    save("signals", "cpu", rows, extra={"size": args.size, "angles": args.angles, "energies": len(ENERGIES),
                                        "uninterrupted_s": round(span, 3), "summary": summary})


if __name__ == "__main__":
    main()
