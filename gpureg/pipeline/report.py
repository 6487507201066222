"""The pipeline: projections -> FBP -> binarize -> register -> align -> XANES -> report.

Energies stream one at a time: the reference is reconstructed first, then the
others in order of distance from it; while one registers, the next is read
and reconstructed in a worker thread. Everything is written to
``OUTPUT.partial`` as it completes (flushed per energy, with a ``done`` flag),
so rerunning the same command after an interruption resumes where it stopped
and gives the same result; the finished file is renamed onto ``OUTPUT``
(atomic) and never overwritten without ``overwrite=True``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..figures.particles import edge_maps_figure, particle_mse_figure

__all__ = ["PipelineResult", "report_dir_for", "write_report"]

@dataclass
class PipelineResult:
    """What a finished run produced."""

    output: Path
    report_dir: Path | None
    energies: np.ndarray
    reference_index: int
    matrices: np.ndarray
    mse_before: np.ndarray
    mse_after: np.ndarray
    timings: dict = field(default_factory=dict)  # stage -> (n_energy,) seconds
    resumed: int = 0  # energies taken from an interrupted run
    figures: list = field(default_factory=list)


def report_dir_for(output) -> Path:
    """Report folder of a result file: ``RESULT_report/`` beside it."""
    output = Path(output)
    return output.with_name(output.stem + "_report")


def write_report(result_h5, outdir) -> list:
    """Figures (PNG), ``summary.json`` and ``report.md`` for a finished result file."""
    from ..core.version import __version__
    from ..figures.result import plot_result
    from ..io.files import atomic_path

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    figures = [Path(p) for p in plot_result(result_h5, outdir)]
    pp_figures, pp_summary, pp_lines = _per_particle_report(result_h5, outdir)  # nothing unless per_particle
    figures += pp_figures
    res = read_result(result_h5, 0)
    import h5py

    with h5py.File(result_h5, "r") as h5:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in h5.attrs.items()}
        xanes = {}
        if "xanes/edge_energy" in h5:
            e0 = h5["xanes/edge_energy"][...]
            labels = h5["xanes/labels"][...]
            mask = h5["xanes/mask"][...].astype(bool)
            for lab in np.unique(labels[labels > 0]):
                sel = (labels == lab) & mask & np.isfinite(e0)
                if sel.any():
                    xanes[f"particle {int(lab)}"] = {"voxels": int(sel.sum()), "edge_energy_median_ev": float(np.median(e0[sel])),
                                                     "edge_energy_iqr_ev": float(np.subtract(*np.percentile(e0[sel], [75, 25])))}
    summary = {
        "gpureg_version": __version__, "input": attrs.get("input"), "input_checksum": attrs.get("input_checksum"),
        "device": attrs.get("device"), "parameters": json.loads(attrs.get("parameters", "{}")),
        "reference_energy_ev": float(res.energies[res.reference_index]),
        "energies_ev": res.energies.tolist(), "mse_before": res.mse_before.tolist(), "mse_after": res.mse_after.tolist(),
        "matrices": res.matrices.tolist(), "timings_s": {k: v.tolist() for k, v in res.timings.items()},
        "total_s": {k: float(np.sum(v)) for k, v in res.timings.items()}, "particles": xanes,
        "figures": [p.name for p in figures],
    }
    summary.update(pp_summary)
    with atomic_path(outdir / "summary.json") as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=2))
    lines = [f"# gpureg report: {Path(result_h5).name}", "",
             f"- input: `{summary['input']}` (checksum {summary['input_checksum']})",
             f"- device: {summary['device']}; reference energy {summary['reference_energy_ev']:.1f} eV; "
             f"{len(res.energies)} energies",
             f"- MSE before -> after registration (median over energies): {np.median(res.mse_before):.4g} -> "
             f"{np.median(res.mse_after):.4g}",
             "- time per stage (s, all energies): " + ", ".join(f"{k} {v:.1f}" for k, v in summary["total_s"].items()),
             ""]
    for name, st in xanes.items():
        lines.append(f"- {name}: {st['voxels']} voxels, edge energy median {st['edge_energy_median_ev']:.2f} eV "
                     f"(IQR {st['edge_energy_iqr_ev']:.2f} eV)")
    lines += pp_lines
    lines += ["", "## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures]
    lines += ["", "Numbers: [summary.json](summary.json)", ""]
    with atomic_path(outdir / "report.md") as tmp:
        Path(tmp).write_text("\n".join(lines))
    return figures


def read_result(path, resumed):
    import h5py

    with h5py.File(path, "r") as h5:
        return PipelineResult(
            output=Path(path), report_dir=None, energies=h5["energy"][...], reference_index=int(h5.attrs["reference_index"]),
            matrices=h5["registration/matrix"][...], mse_before=h5["registration/mse_before"][...],
            mse_after=h5["registration/mse_after"][...], timings={k: h5[f"timings/{k}"][...] for k in h5["timings"]},
            resumed=resumed)


def _per_particle_report(result_h5, outdir):
    """Figures, summary entries and report lines of a per-particle run (nothing for other runs).

    ``particle_mse_per_energy.png``: residual MSE of each particle per energy
    after the global and after the per-particle registration.
    ``edge_energy_global_vs_particles.png``: the edge-energy slice from the
    global alignment beside the one from the per-particle alignment (and the
    ground truth for simulated data), one colour scale.
    """
    import h5py

    with h5py.File(result_h5, "r") as h5:
        if "registration/particle_mse" not in h5:
            return [], {}, []
        energies = h5["energy"][...]
        mse_g, mse_p = h5["registration/particle_mse_global"][...], h5["registration/particle_mse"][...]
        maps = {name: np.where(h5[f"{grp}/mask"][...].astype(bool), h5[f"{grp}/edge_energy"][...], np.nan)
                for name, grp in (("global alignment", "xanes_global"), ("per-particle alignment", "xanes"))
                if f"{grp}/edge_energy" in h5}
        truth = h5["truth/edge_energy"][...] if "truth/edge_energy" in h5 else None
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
