"""The report of a finished run: figures, ``summary.json`` and ``report.md`` in ``RESULT_report/``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..figures.particles import edge_maps_figure, particle_mse_figure
from ..io.results import ResultFile, ResultSummary, read_result

__all__ = ["PipelineResult", "write_report"]

@dataclass
class PipelineResult(ResultSummary):
    """What a finished run produced: the result file's summary, where it is, and what this call did."""

    output: Path | None = None
    report_dir: Path | None = None
    resumed: int = 0  # energies taken from an interrupted run
    figures: list = field(default_factory=list)


def write_report(result_h5, outdir, *, name: str | None = None) -> list:
    """Figures (PNG), ``summary.json`` and ``report.md`` for a finished result file (the whole folder).

    Parameters
    ----------
    result_h5 : str or Path
        The result (or the complete ``.partial`` file about to be renamed onto it).
    outdir : str or Path
        The report folder (created; its PNGs, ``summary.json`` and ``report.md`` replaced).
    name : str, optional
        The result's name in the report (default: ``result_h5``'s name).

    Returns
    -------
    list of Path
        The figures.

    ``report.md`` is written last: while it is missing, the folder is incomplete
    (``gpureg report RESULT.h5`` rebuilds it).
    """
    from ..core.version import __version__
    from ..figures.common import median_mse_ratio
    from ..figures.result import plot_result
    from ..io.files import atomic_path

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    (outdir / "report.md").unlink(missing_ok=True)  # incomplete until rewritten below
    figures = [Path(p) for p in plot_result(result_h5, outdir)]
    pp_figures, pp_summary, pp_lines = _per_particle_report(result_h5, outdir)  # nothing unless per_particle
    figures += pp_figures + _chemistry_figures(result_h5, outdir) + _uncertainty_figures(result_h5, outdir)
    df_figures, df_summary, df_lines = _deformable_report(result_h5, outdir)  # nothing unless deformable
    figures += df_figures
    al_figures, al_summary, al_lines = _alignment_report(result_h5, outdir)  # nothing without --align-projections
    figures += al_figures
    md_figures, md_summary, md_lines = _mode_report(result_h5, outdir)  # nothing without /xanes_global
    figures += md_figures
    res = read_result(result_h5)
    attrs = res.attrs
    with ResultFile(result_h5) as rf:
        maps = rf.xanes(maps_only=True)
        storage, write = rf.storage(), rf.write_timing()
        repairs = rf.repairs()
        ambiguous = int(np.count_nonzero(rf.h5["xanes/edge_ambiguous"][...])) if "xanes/edge_ambiguous" in rf.h5 \
            else None
    xanes = {}
    if maps is not None and "labels" in maps:
        e0, labels, mask = maps["edge_energy"], maps["labels"], maps["mask"].astype(bool)
        for lab in np.unique(labels[labels > 0]):
            sel = (labels == lab) & mask & np.isfinite(e0)
            if sel.any():
                xanes[f"particle {int(lab)}"] = {"voxels": int(sel.sum()), "edge_energy_median_ev": float(np.median(e0[sel])),
                                                 "edge_energy_iqr_ev": float(np.subtract(*np.percentile(e0[sel], [75, 25])))}
    summary = {
        "gpureg_version": __version__, "input": attrs.get("input"), "input_checksum": attrs.get("input_checksum"),
        "input_checksum_method": attrs.get("input_checksum_method"),
        "device": attrs.get("device"), "parameters": attrs.get("parameters", {}),
        "reference_energy_ev": float(res.energies[res.reference_index]),
        "energies_ev": res.energies.tolist(), "mse_before": res.mse_before.tolist(), "mse_after": res.mse_after.tolist(),
        "matrices": res.matrices.tolist(), "timings_s": {k: v.tolist() for k, v in res.timings.items()},
        "total_s": {k: float(np.sum(v)) for k, v in res.timings.items()}, "particles": xanes,
        "figures": [p.name for p in figures], "voxel_size_nm": attrs.get("voxel_size_nm"),
        "excluded_energies": [{"energy_ev": e, "reason": r} for e, r in sorted(res.excluded.items())],
        "skipped_inputs": attrs.get("skipped_inputs") or {},
        "repairs": [{"energy_ev": e, **r} for e, r in sorted(repairs.items())],
        "suspect_energies": suspect_energies(res.energies, res.mse_after, res.reference_index, res.excluded),
        "mse_ratio_median": median_mse_ratio(res.mse_before, res.mse_after),
        "storage": storage, "background_write_s": write,
        "edge_ambiguous_voxels": ambiguous,  # masked: more than one 0.5 crossing (gpureg.xanes.edge_energy)
        "xanes_skipped": res.xanes_skipped,  # why there are no edge maps (the energy grid), or None
    }
    summary.update(pp_summary)
    summary.update(df_summary)
    summary.update(al_summary)
    summary.update(md_summary)
    with atomic_path(outdir / "summary.json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2))
    used = ~np.isin(res.energies, list(res.excluded))
    lines = [f"# gpureg report: {name or Path(result_h5).name}", "",
             f"- input: `{summary['input']}` (checksum {summary['input_checksum']}"
             + (f"; {attrs['input_checksum_method']})" if attrs.get("input_checksum_method") else ")"),
             f"- device: {summary['device']}; reference energy {summary['reference_energy_ev']:.1f} eV; "
             f"{int(used.sum())} energies" + (f" of {len(res.energies)}" if not used.all() else "")
             + (f"; voxel size {summary['voxel_size_nm']:.4g} nm" if summary["voxel_size_nm"] else ""),
             f"- MSE vs reference ({_compared(summary['parameters'])}), median over energies: before "
             f"{np.nanmedian(res.mse_before[used]):.4g}, after {np.nanmedian(res.mse_after[used]):.4g}; "
             f"median over energies of MSE before/after: x{summary['mse_ratio_median']:.3g}",
             "- time per stage (s, all energies; reading the next energy runs beside the registration, so the "
             "stages add up to more than the wall time): " + ", ".join(f"{k} {v:.1f}" for k, v in summary["total_s"].items())
             + (f" (written in the background, overlapping the other stages: writing added "
                f"{write['write_wait_s']:.1f} s)" if "write_wait_s" in write else ""),
             *[f"- /{k} stored as {v.get('store_dtype', 'float32')} ({v.get('storage_error', 'exact')}), "
               f"compression {v.get('compression', 'gzip:1')}" for k, v in storage.items()],
             ""]
    if res.xanes_skipped:
        lines.append(f"- **no edge maps**: {res.xanes_skipped} (registration and aligned stack only; more energies "
                     "across the edge give maps, see `gpureg xanes --pre/--post`)")
    for e, r in sorted(res.excluded.items()):
        lines.append(f"- **energy {e:g} eV left out** (--skip-bad-energies): {r}")
    for f, r in sorted(summary["skipped_inputs"].items()):
        lines.append(f"- **input file {f} left out** (watch): {r}")
    for s in summary["suspect_energies"]:
        lines.append(f"- **energy {s['energy_ev']:g} eV: registration MSE after {s['mse_after']:.3g} is "
                     f"{s['ratio']:.1f}x its neighbours'** (largest {s['neighbours_max']:.3g}): check its projections")
    for r in summary["repairs"]:
        what = [f"{r['invalid_pixels']} dead/NaN" if r["invalid_pixels"] else "",
                f"{r['outlier_pixels']} outlier" if r["outlier_pixels"] else ""]
        text = " and ".join(w for w in what if w)
        proj = f"; projections {r['projections']} replaced by their neighbours" if r["projections"] else ""
        lines.append(f"- energy {r['energy_ev']:g} eV: {text + ' detector pixels repaired' if text else ''}{proj}")
    for pname, st in xanes.items():
        lines.append(f"- {pname}: {st['voxels']} voxels, edge energy median {st['edge_energy_median_ev']:.2f} eV "
                     f"(IQR {st['edge_energy_iqr_ev']:.2f} eV)")
    lines += pp_lines + df_lines + al_lines + md_lines
    lines += ["", "## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures]
    lines += ["", "Numbers: [summary.json](summary.json)", ""]
    with atomic_path(outdir / "report.md") as tmp:
        Path(tmp).write_text("\n".join(lines))
    return figures


def _mode_report(result_h5, outdir):
    """The map of a per-particle or deformable run against the affine-only map of the same run (``/xanes_global``).

    ``edge_energy_mode_minus_affine.png``: the difference map; summary ``mode_vs_affine``: per particle the
    median edge energy of each map (and of the truth, for simulated data), the difference's median and
    95th percentile, and each map's error against the truth where both maps have a value.
    """
    from ..figures.particles import difference_map_figure

    with ResultFile(result_h5) as rf:
        h5 = rf.h5
        if "xanes_global/edge_energy" not in h5 or "xanes/edge_energy" not in h5:
            return [], {}, []
        mode = " + ".join(name for name, key in (("per-particle", "registration/particle_mse"),
                                                 ("deformable", "registration/bspline_coefficients")) if key in h5)
        maps = {name: np.where(h5[f"{grp}/mask"][...].astype(bool), h5[f"{grp}/edge_energy"][...], np.nan)
                for name, grp in (("affine", "xanes_global"), (mode, "xanes"))}
        labels = h5["xanes/labels"][...] if "xanes/labels" in h5 else None
        flagged = {name: int(np.count_nonzero(h5[f"{grp}/edge_ambiguous"][...]))
                   for name, grp in (("affine", "xanes_global"), (mode, "xanes")) if f"{grp}/edge_ambiguous" in h5}
        truth = h5["truth/edge_energy"][...] if "truth/edge_energy" in h5 else None
    both = np.isfinite(maps["affine"]) & np.isfinite(maps[mode])
    diff = np.where(both, maps[mode] - maps["affine"], np.nan)
    out = {"mode": mode, "difference_median_ev": float(np.median(diff[both])) if both.any() else float("nan"),
           "difference_abs_p95_ev": float(np.percentile(np.abs(diff[both]), 95)) if both.any() else float("nan"),
           "particles": {}, "edge_ambiguous_voxels": flagged}
    for lab in ([] if labels is None else np.unique(labels[labels > 0])):
        sel = both & (labels == lab)
        if sel.any():
            out["particles"][f"particle {int(lab)}"] = {
                "voxels": int(sel.sum()), **{f"{k}_median_ev": float(np.median(m[sel])) for k, m in maps.items()},
                **({"truth_median_ev": float(np.nanmedian(truth[sel]))} if truth is not None else {})}
    lines = [f"- {mode} map vs the affine map of the same run: difference median {out['difference_median_ev']:+.3f} "
             f"eV, 95th percentile of |difference| {out['difference_abs_p95_ev']:.3f} eV; per particle, median "
             "edge energy affine -> " + mode + ": " + ", ".join(
                 f"{k} {v['affine_median_ev']:.2f} -> {v[mode + '_median_ev']:.2f} eV" for k, v in out["particles"].items())]
    if flagged:
        lines.append("- voxels without a single edge (more than one 0.5 crossing: masked, /xanes*/edge_ambiguous): "
                     + ", ".join(f"{k} {v}" for k, v in flagged.items()))
    if truth is not None and truth.shape == diff.shape:
        sel = both & np.isfinite(truth)
        if sel.any():
            err = {k: np.abs(m[sel] - truth[sel]) for k, m in maps.items()}
            out["truth_error_ev"] = {k: {"median": float(np.median(v)), "p95": float(np.percentile(v, 95))}
                                     for k, v in err.items()}
            lines.append("- edge energy vs ground truth (same voxels), median / 95th percentile |error|: " + ", ".join(
                f"{k} {v['median']:.3f} / {v['p95']:.3f} eV" for k, v in out["truth_error_ev"].items()))
    path = difference_map_figure(diff, Path(outdir) / "edge_energy_mode_minus_affine.png",
                                 title=f"{mode} minus affine edge energy")
    return [Path(path)], {"mode_vs_affine": out}, lines
SUSPECT_RATIO = 3.0  # MSE after above this many times both neighbours' (larger one) flags an energy


def suspect_energies(energies, mse_after, ref, excluded=None) -> list:
    """Energies whose registration MSE after is an outlier among their neighbours (in energy order).

    An energy is flagged when its MSE after registration exceeds ``SUSPECT_RATIO`` times the
    larger of its two neighbours' (the nearest used energies below and above; one at the ends):
    a bad projection or detector defect at one energy, not the edge (where neighbours change too).
    """
    e = np.asarray(energies, dtype=np.float64)
    m = np.asarray(mse_after, dtype=np.float64)
    used = [int(i) for i in np.argsort(e) if i != ref and e[i] not in (excluded or {}) and np.isfinite(m[i])]
    out = []
    for k, i in enumerate(used):
        near = [m[j] for j in used[max(k - 1, 0):k] + used[k + 1:k + 2]]
        top = max(near) if near else np.nan
        if near and top > 0 and m[i] > SUSPECT_RATIO * top:
            out.append({"energy_ev": float(e[i]), "mse_after": float(m[i]), "neighbours_max": float(top),
                        "ratio": float(m[i] / top)})
    return out


def _chemistry_figures(result_h5, outdir):
    """Fraction maps and cluster map when the result has ``/xanes/fractions`` or ``/xanes/clusters``."""
    from ..figures.chemistry import cluster_map, fraction_maps

    with ResultFile(result_h5) as rf:
        chem = rf.chemistry()
    if chem is None:
        return []
    figures = []
    if "fractions" in chem:
        figures.append(fraction_maps(chem["fractions"], outdir / "reference_fractions.png",
                                     names=chem["reference_names"] or None, labels=chem.get("labels")))
    if "clusters" in chem:
        figures.append(cluster_map(chem["clusters"], chem["cluster_centroids"], chem["energies"],
                                   outdir / "clusters.png"))
    return figures


def _uncertainty_figures(result_h5, outdir):
    """Edge-energy sigma map and the scree plot of the spectral basis, when the result has them."""
    import numpy as np

    from ..figures.chemistry import scree_plot
    from ..figures.maps import edge_energy_slice

    with ResultFile(result_h5) as rf:
        unc = rf.uncertainty()
    if unc is None:
        return []
    figures = []
    sigma = unc["edge_energy_sigma"]
    if sigma is not None and np.isfinite(sigma).any():
        figures.append(edge_energy_slice(sigma, outdir / "edge_energy_sigma.png", mask=unc["mask"],
                                         title=f"edge-energy 1-sigma (eV), median {np.nanmedian(sigma):.3f} eV"))
    sd = unc["spectral_denoise"]
    if sd is not None and sd.get("eigenvalues"):
        ev = np.asarray(sd["eigenvalues"], dtype=np.float64)
        state = "applied" if sd.get("applied") else "noise estimate only"
        figures.append(scree_plot(ev / max(ev.sum(), 1e-30), outdir / "spectral_scree.png",
                                  title=f"spectral PCA: {sd['components']} components kept ({state})"))
    return figures


def _compared(parameters):
    prep = (parameters or {}).get("prep", {})
    return "grey values" if prep.get("binarize") is False else "binarized, smoothed volumes"


def _per_particle_report(result_h5, outdir):
    """Figures, summary entries and report lines of a per-particle run (nothing for other runs).

    ``particle_mse_per_energy.png``: residual MSE of each particle per energy
    after the global and after the per-particle registration.
    ``edge_energy_global_vs_particles.png``: the edge-energy slice from the
    global alignment beside the one from the per-particle alignment (and the
    ground truth for simulated data), one colour scale.
    """
    with ResultFile(result_h5) as rf:
        pp = rf.particles()
    if pp is None:
        return [], {}, []
    energies, mse_g, mse_p, maps, truth = (pp[k] for k in ("energies", "mse_global", "mse_particle", "maps", "truth"))
    if truth is not None and truth.shape == next(iter(maps.values()), truth).shape:
        maps["ground truth"] = truth
    else:
        truth = None
    outdir = Path(outdir)
    figures = [particle_mse_figure(energies, mse_g, mse_p, outdir / "particle_mse_per_energy.png")]
    if len(maps) >= 2:
        figures.append(edge_maps_figure(maps, outdir / "edge_energy_global_vs_particles.png"))
    ratio = np.nanmedian(mse_g[:, 1:] / np.where(mse_p[:, 1:] > 0, mse_p[:, 1:], np.nan), axis=0) \
        if mse_g.shape[1] > 1 else np.array([])
    summary = {"per_particle": {"particles": int(mse_g.shape[1] - 1), "mse_global": mse_g.tolist(),
                                "mse_particle": mse_p.tolist(),
                                "median_mse_ratio_global_over_particle": [float(r) for r in ratio]}}
    lines = ["- per-particle registration: residual MSE inside each particle, global / per-particle (median over "
             "energies): " + ", ".join(f"particle {k + 1} x{r:.2f}" for k, r in enumerate(ratio))]
    if truth is not None:
        err = {}
        for name in ("global alignment", "per-particle alignment"):
            if name in maps:
                d = np.abs(maps[name] - truth)
                err[name] = float(np.nanmedian(d)) if np.isfinite(d).any() else float("nan")
        summary["per_particle"]["edge_energy_abs_error_median_ev"] = err
        lines.append("- edge energy vs ground truth, median |error|: "
                     + ", ".join(f"{k} {v:.2f} eV" for k, v in err.items()))
    return figures, summary, lines


def _deformable_report(result_h5, outdir):
    """Figure, summary entries and report lines of a deformable run (nothing for other runs).

    ``deformation.png``: for the energy whose deformation is largest, the
    displacement magnitude of the B-spline part and the Jacobian determinant
    of the whole transform (folding, det <= 0, outlined and counted).
    """
    from ..figures.deformation import deformation_figure
    from .deform import deformation_maps

    with ResultFile(result_h5) as rf:
        d = rf.deformation()
        if d is None:
            return [], {}, []
        coeffs = d["coefficients"][...]
        shape = rf.stack("aligned").shape[1:]
    energies = read_result(result_h5).energies
    i = int(np.argmax(np.abs(coeffs).reshape(len(coeffs), -1).max(axis=1)))
    base = d["matrices"][i] if d["base"] == "affine" else np.eye(4)  # piecewise: the B-spline's own Jacobian
    magnitude, jac = deformation_maps(coeffs[i], base, shape, d["spacing"])
    path = deformation_figure(magnitude, jac, Path(outdir) / "deformation.png",
                              title=f"Deformation at {energies[i]:g} eV (spacing {d['spacing']:g} vox)")
    summary = {"deformable": {"spacing": d["spacing"], "min_jacobian": d["min_jacobian"].tolist(),
                              "mse_affine": d["mse_affine"].tolist(), "shown_energy_ev": float(energies[i]),
                              "max_displacement_vox": float(magnitude.max()), "folded_voxels": int((jac <= 0).sum())}}
    lines = [f"- deformable refinement (spacing {d['spacing']:g} voxels): smallest Jacobian determinant "
             f"{float(np.min(d['min_jacobian'])):.3f} over energies"
             + (" (FOLDING: accepted with --allow-folding)" if np.min(d["min_jacobian"]) <= 0 else ", no folding")
             + f"; largest B-spline displacement {float(magnitude.max()):.2f} voxels at {energies[i]:g} eV"]
    return [Path(path)], summary, lines


def _alignment_report(result_h5, outdir):
    """Figure, summary entries and report lines of a run with ``--align-projections`` (nothing otherwise).

    ``projection_alignment.png``: row and column shift of every projection
    (energy x angle) and the reprojection error per energy before and after.
    """
    from ..figures.alignment import alignment_figure

    with ResultFile(result_h5) as rf:
        al = rf.alignment()
    if al is None:
        return [], {}, []
    path = alignment_figure(al["theta"], al["energies"], al["estimated"], al["error_before"], al["error_after"],
                            Path(outdir) / "projection_alignment.png", status=al["status"])
    done = np.isfinite(al["error_before"])
    rms = np.sqrt(np.nanmean(al["estimated"] ** 2, axis=(1, 2)))
    summary = {"projection_alignment": {
        "status": al["status"], "reasons": al["reasons"], "iterations": al["iterations"].tolist(),
        "error_before": al["error_before"].tolist(), "error_after": al["error_after"].tolist(),
        "shift_rms_px": rms.tolist(), "seconds": al["seconds"].tolist()}}
    lines = [f"- projection alignment: {sum(s == 'aligned' for s in al['status'])} of {int(done.sum())} energies "
             f"aligned (shift RMS median {np.nanmedian(rms):.2f} px); reprojection error median "
             f"{np.nanmedian(al['error_before']):.4f} -> {np.nanmedian(al['error_after']):.4f}"]
    if al["truth"] is not None and al["truth"].shape == al["estimated"].shape:
        err = float(np.sqrt(np.nanmean((al["estimated"][done] - al["truth"][done]) ** 2)))
        summary["projection_alignment"]["shift_error_rms_px"] = err
        lines.append(f"- projection shifts vs simulated truth: {err:.3f} px RMS")
    lines += [f"- **{e} eV: projection alignment not applied**: {r}" for e, r in al["reasons"].items()]
    return [Path(path)], summary, lines
