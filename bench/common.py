"""Shared benchmark plumbing: device description, timing, JSON results (DESIGN.md schema)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    """Processor model and core count of this machine."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def device_name(device: str) -> str:
    """GPU name for ``device="gpu"``, else the CPU description."""
    if device == "gpu":
        from gpureg.core.backend import gpu_name

        return gpu_name() or "gpu"
    return cpu_name()


def synchronize(device: str) -> None:
    """Wait for queued GPU work (no-op on the CPU)."""
    if device == "gpu":
        from gpureg.core.backend import cupy_or_none

        cupy_or_none().cuda.Device().synchronize()


def median_time(fn, *, repeats: int = 5, warmup: int = 1, device: str = "cpu"):
    """Median wall time (ms) of ``fn()`` over ``repeats`` after ``warmup`` calls; returns (ms, last result)."""
    out = None
    for _ in range(warmup):
        out = fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), out


def save(benchmark: str, device: str, results: list, *, extra: dict | None = None, out_dir=None) -> Path:
    """Print and write ``<benchmark>-<device-short>-<date>.json`` under bench/results/ (or ``$GPUREG_BENCH_OUT``)."""
    import gpureg

    date = _dt.date.today().isoformat()
    doc = {"benchmark": benchmark, "device": device_name(device), "cpu": cpu_name(),
           "gpureg_version": gpureg.__version__, "git_sha": _git_sha(), "date": date, **(extra or {}),
           "results": results}
    short = "gpu" if device == "gpu" else "cpu"
    if device == "gpu":
        short = "".join(ch for ch in device_name(device).split()[1].lower() if ch.isalnum()) or "gpu"
    # GPUREG_BENCH_OUT: one folder for every JSON of a run (bench/gpu_check.sh sets it to $OUT on a lent GPU).
    path = Path(out_dir or os.environ.get("GPUREG_BENCH_OUT") or RESULTS) / f"{benchmark}-{short}-{date}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(doc, indent=2)
    path.write_text(text + "\n")
    print(text)
    print(f"saved {path}")
    return path


def _git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
