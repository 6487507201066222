"""Reports of the validation sweep: ``validation.csv`` row by row, ``validation.json``, ``summary.md``
and the figures (error vs magnitude, time per distortion, Canny overlays of examples).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from ..core import transform as tf
from ..figures.common import DPI, new_figure, save_figure
from ..figures.plots import canny_overlay
from ..io.files import atomic_path
from .cases import same_value, summarize

__all__ = ["CsvRows", "short_row", "write_figures", "write_reports"]

_CSV_FIELDS = ("distortion", "magnitude", "noise", "mode", "filter", "method", "device", "size", "error_vox",
               "error_max_vox", "floor_vox", "mse_before", "mse_after", "mse_clean_before", "mse_clean_after",
               "seconds", "prep_seconds", "iterations", "status")


class CsvRows:
    """``validation.csv`` written row by row, so a long sweep leaves its finished cases behind."""

    def __init__(self, path):
        self.path = Path(path)
        with open(self.path, "w", newline="") as fh:
            csv.writer(fh).writerow(_CSV_FIELDS)

    def write(self, row):
        with open(self.path, "a", newline="") as fh:
            csv.writer(fh).writerow([_fmt(row.get(k, "")) for k in _CSV_FIELDS])


def short_row(r):
    """One log line for a result row."""
    return f"{r['method']} {r['distortion']} {r['magnitude']:g} noise {r['noise']:g} {r['mode']}: " + (
        f"{r['error_vox']:.3f} vox {r['seconds']:.2f} s" if r["status"] == "ok" else r["status"])


def write_reports(result, out):
    """Write ``validation.json`` and ``summary.md`` into ``out``; return their paths."""
    files = []
    path = out / "validation.json"
    doc = {"benchmark": "validation", "settings": result.settings, "summary": summarize(result.rows),
           "rows": result.rows}
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(doc, indent=1, default=_json_default) + "\n")
    files.append(path)
    path = out / "summary.md"
    with atomic_path(path) as tmp:
        Path(tmp).write_text(_markdown(result))
    files.append(path)
    return files


def write_figures(result, out, fixed_clean, examples):
    """Write the figures (error and time per distortion and mode, Canny overlays of examples); return their paths."""
    s = result.settings
    files = []
    for mode in s["modes"]:
        files.append(_error_figure(result.rows, s, mode, out / f"error_vs_magnitude_{mode}.png"))
        files.append(_time_figure(result.rows, s, mode, out / f"time_{mode}.png"))
    ex = out / "examples"
    ex.mkdir(exist_ok=True)
    # Canny overlays of the central z slice (noise-free grey volumes, for legibility), largest magnitude,
    # with the matrices estimated at the noise level closest to 10 % in the first mode.
    level = min(s["noise"], key=lambda n: abs(n - 0.10))
    mode = s["modes"][0]
    zc = fixed_clean.shape[0] // 2
    for dist in s["distortions"]:
        mag = s["magnitudes"][dist][-1]
        moving_clean = examples["_clean"][dist]
        files.append(canny_overlay(fixed_clean[zc], moving_clean[zc], ex / f"{dist}_before.png",
                                   title=f"{dist} {mag:g}: before registration"))
        for method in ("gpureg", "SimpleITK"):
            mats = examples.get((dist, method), {})
            matrix = mats.get((mag, level, mode))
            if matrix is None:
                continue
            aligned = tf.apply_affine(moving_clean, matrix, device="cpu")
            row = [r for r in result.rows if (r["distortion"], r["method"], r["mode"]) == (dist, method, mode)
                   and same_value(r["magnitude"], mag) and same_value(r["noise"], level)]
            err = f", error {row[0]['error_vox']:.2f} vox" if row and row[0]["status"] == "ok" else ""
            files.append(canny_overlay(fixed_clean[zc], aligned[zc], ex / f"{dist}_after_{method.lower()}.png",
                                       title=f"{dist} {mag:g}, {method} ({mode}, {100 * level:g} % noise{err})"))
    return files


def _fmt(v):
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return v


def _json_default(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def _markdown(result):
    s = result.settings
    methods = sorted({r["method"] for r in result.rows}, key=lambda m: m != "gpureg")
    lines = [
        "# gpureg validation: synthetic distortions of a two-particle phantom",
        "",
        f"Grid {s['size']}^3; gpureg on {s['device']}"
        + (f" ({s.get('gpu')})" if s.get("gpu") else f" ({s['cpu']}, {s['cpu_count']} cores)")
        + (f"; SimpleITK {s.get('simpleitk_version', '')} on the CPU with {s.get('simpleitk_threads')} threads"
           if s["simpleitk"] else "; SimpleITK not run") + f"; gpureg {s['gpureg_version']}.",
        "",
        "Every case: salt-and-pepper noise, then both volumes filtered ("
        + ("saturated voxels replaced (impulse filter) on the noisy cases, none at 0 %" if s["denoise"] == "auto" else str(s["denoise"] or "no filter"))
        + "), in `binarized` mode Otsu-binarized, then smoothed (Gaussian sigma "
        + f"{s['smooth_sigma']:g} voxel, gpureg's default, both modes); gpureg and SimpleITK register those "
        "same arrays (times exclude this common preparation). Error: mean distance (voxels) between the "
        "estimated and the true transform over the particle voxels; for the non-affine deformation, to the "
        "true warp (`floor` = error of the best least-squares affine, the lower bound of any affine method).",
        "",
        "Magnitudes: " + "; ".join(f"{d} {', '.join(f'{m:g}' for m in v)} ({s['magnitude_units'][d]})"
                                   for d, v in s["magnitudes"].items()) + ".",
        "",
    ]
    failures = result.failures
    lines += [f"Cases: {len({(r['distortion'], r['magnitude'], r['noise'], r['mode']) for r in result.rows})}, "
              f"registrations: {len(result.rows)}, failed: {len(failures)}.", ""]
    headline = [x for x in (0.10, 0.30) if any(same_value(x, n) for n in s["noise"])] or [max(s["noise"])]
    for level in headline:
        lines += _table(result.rows, methods, noise=level, title=f"Noise {100 * level:g} %")
    lines += ["## Mean error (voxels) over the magnitudes, every noise level", ""]
    header = "| distortion | mode | method | " + " | ".join(f"{100 * n:g} %" for n in s["noise"]) + " |"
    lines += [header, "|" + "---|" * (3 + len(s["noise"]))]
    summ = summarize(result.rows)
    for dist in s["distortions"]:
        for mode in s["modes"]:
            for method in methods:
                cells = []
                for n in s["noise"]:
                    hit = [x for x in summ if (x["distortion"], x["mode"], x["method"]) == (dist, mode, method)
                           and same_value(x["noise"], n)]
                    cells.append(f"{hit[0]['error_mean_vox']:.3f}" if hit else "")
                lines.append(f"| {dist} | {mode} | {method} | " + " | ".join(cells) + " |")
    lines.append("")
    if failures:
        lines += ["## Failed registrations", ""] + [f"- {short_row(r)}" for r in failures] + [""]
    lines += ["Full table: `validation.csv` / `validation.json`. Figures: `error_vs_magnitude_<mode>.png`, "
              "`time_<mode>.png`, `examples/*.png` (Canny edges of the central slice before/after).", ""]
    return "\n".join(lines)


def _table(rows, methods, *, noise, title):
    summ = summarize(rows, noise=noise)
    lines = [f"## {title}: error (voxels, mean / worst over magnitudes) and median time (s)", ""]
    head = "| distortion | mode | " + " | ".join(f"{m} error | {m} time" for m in methods)
    if "SimpleITK" in methods and "gpureg" in methods:
        head += " | time ratio SimpleITK/gpureg"
    lines += [head + " | affine floor |", "|" + "---|" * (2 + 2 * len(methods) + ("SimpleITK" in methods) + 1)]
    for dist, mode in dict.fromkeys((x["distortion"], x["mode"]) for x in summ):
        by = {x["method"]: x for x in summ if (x["distortion"], x["mode"]) == (dist, mode)}
        cells = []
        for m in methods:
            x = by.get(m)
            fail = f" ({x['failed']} failed)" if x and x["failed"] else ""
            cells += [f"{x['error_mean_vox']:.3f} / {x['error_worst_vox']:.3f}{fail}" if x else "",
                      f"{x['median_seconds']:.2f}" if x else ""]
        if "SimpleITK" in methods and "gpureg" in methods:
            g, r = by.get("gpureg"), by.get("SimpleITK")
            cells.append(f"{r['median_seconds'] / g['median_seconds']:.2f}" if g and r and g["median_seconds"] > 0 else "")
        x = next(iter(by.values()))
        lines.append(f"| {dist} | {mode} | " + " | ".join(cells)
                     + f" | {x['floor_mean_vox']:.3f} / {x['floor_worst_vox']:.3f} |")
    return lines + [""]


def _error_figure(rows, s, mode, path):
    dists = s["distortions"]
    fig, axes = new_figure((3.2 * len(dists), 3.4), DPI, len(dists), squeeze=False)
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    styles = {"gpureg": dict(ls="-", marker="o"), "SimpleITK": dict(ls="--", marker="s", mfc="none"),
              "gpureg deformable": dict(ls=":", marker="^")}
    for ax, dist in zip(axes, dists):
        mags = s["magnitudes"][dist]
        for k, level in enumerate(s["noise"]):
            color = cmap(k / max(1, len(s["noise"]) - 1) * 0.9)
            for method, style in styles.items():
                sel = {r["magnitude"]: r for r in rows if (r["distortion"], r["mode"], r["method"]) == (dist, mode, method)
                       and same_value(r["noise"], level) and r["status"] == "ok"}
                if not sel:
                    continue
                x = [m for m in mags if m in sel]
                ax.plot(x, [sel[m]["error_vox"] for m in x], color=color, ms=4, lw=1.2,
                        label=f"{method} {100 * level:g} %", **style)
        if dist == "deformation":
            fl = {r["magnitude"]: r["floor_vox"] for r in rows if r["distortion"] == dist}
            ax.plot(mags, [fl.get(m, math.nan) for m in mags], color="k", ls=":", lw=1.5, label="best affine")
        ax.set_yscale("log")
        ax.set_title(dist)
        ax.set_xlabel(s["magnitude_units"][dist])
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("mean displacement error (voxel)")
    handles, labels = axes[-1].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[0].get_legend_handles_labels()
    axes[-1].legend(handles, labels, fontsize=6, loc="best")
    fig.suptitle(f"{mode} registration, {s['size']}^3: solid gpureg, dashed SimpleITK; colour = salt-and-pepper noise")
    return save_figure(fig, path, DPI)


def _time_figure(rows, s, mode, path):
    fig, axes = new_figure((6.4, 3.6), DPI, 1, squeeze=False)
    ax = axes[0]
    dists = s["distortions"]
    methods = [m for m in ("gpureg", "SimpleITK") if any(r["method"] == m for r in rows)]
    width = 0.8 / len(methods)
    for k, method in enumerate(methods):
        med = []
        for dist in dists:
            t = [r["seconds"] for r in rows if (r["distortion"], r["mode"], r["method"]) == (dist, mode, method)
                 and r["status"] == "ok"]
            med.append(float(np.median(t)) if t else math.nan)
        ax.bar(np.arange(len(dists)) + (k - (len(methods) - 1) / 2) * width, med, width, label=method)
    ax.set_xticks(np.arange(len(dists)), dists)
    ax.set_ylabel("median registration time (s)")
    ax.set_title(f"{mode}, {s['size']}^3, all noise levels; gpureg on {s['device']}")
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    return save_figure(fig, path, DPI)
