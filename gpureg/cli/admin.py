"""Housekeeping commands: ``gpureg info``, ``bench``, ``validate``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ..core.errors import GpuregError, ParameterError
from ..pipeline.options import Device
from .app import ApiKeyFileOpt, DeviceOpt, app, flag, friendly, use_api_key_file

__all__ = ["bench", "info", "validate"]


@app.command()
@friendly
def info(path: Optional[str] = typer.Argument(None, metavar="FILE_OR_FOLDER",
                                              help="Describe this input (file, folder or quoted glob): layout, "
                                                   "shapes, energies, angles, pixel size, what was guessed."),
         as_json: bool = flag(False, "--json", help="With FILE_OR_FOLDER: print the description as JSON."),
         api_key_file: Optional[Path] = ApiKeyFileOpt):
    """Describe an input's layout (a file, folder, glob or Tiled URI); without one: versions, and whether CuPy/GPU
    and ASTRA-CUDA are usable."""
    use_api_key_file(api_key_file)
    if path is not None:
        import json

        from ..io.detect import describe_input
        from ..io.results import describe_result, is_result

        if is_result(path):
            d = describe_result(path)
            typer.echo(json.dumps(d, indent=1) if as_json else _format_result(d))
            return
        d = describe_input(path)
        if d["kind"] == "projections":
            d["wobble"] = _wobble(path)
        typer.echo(json.dumps(d, indent=1) if as_json else format_description(d) + _wobble_line(d.get("wobble")))
        return
    import platform

    import numpy
    import scipy

    from ..core.backend import cupy_probe, gpu_name
    from ..core.version import __version__
    from ..pipeline.options import resolve_devices
    from ..recon.fbp import astra_cuda_probe

    rows = {"gpureg": __version__, "python": platform.python_version(), "numpy": numpy.__version__,
            "scipy": scipy.__version__}
    cp, why = cupy_probe()
    rows["cupy"] = cp.__version__ if cp is not None else f"unavailable ({why})"
    rows["gpu"] = gpu_name() or "none"
    try:
        import astra

        ok, why = astra_cuda_probe()
        rows["astra"] = f"{astra.__version__} (CUDA: {'yes' if ok else 'no, ' + why})"
    except Exception as exc:  # astra missing or broken
        rows["astra"] = f"unavailable ({type(exc).__name__})"
    devices = resolve_devices("auto")
    rows["--device auto"] = f"registration on {devices.registration}, FBP on {devices.fbp}"
    from ..core.backend import cpu_engine
    from ..core.config import config

    cfg = config.get()
    rows["config"] = (f"cpu_backend={cpu_engine()}, threads={cfg.threads or 'all cores'}, solver={cfg.solver}, "
                      f"disable_gpu={cfg.disable_gpu} (gpureg.config; GPUREG_* variables)")
    width = max(map(len, rows))
    for k, v in rows.items():
        typer.echo(f"{k:<{width}}  {v}")


@app.command()
@friendly
def bench(
    names: Optional[list[str]] = typer.Argument(None, help="Benchmarks to run (default: all in bench/)."),
    quick: bool = flag(False, "--quick", help="Small sizes, one repeat."),
    out: Path = typer.Option(Path("."), "--out", help="Folder for the JSON results (default: the current folder)."),
):
    """Run the benchmarks in bench/ (source checkout); each prints and saves its JSON in --out."""
    import os
    import subprocess

    from ..io.files import check_file_target

    out.mkdir(parents=True, exist_ok=True)
    check_file_target(out / "bench.json")  # a writable folder

    folder = next((p for p in (Path(__file__).resolve().parents[2] / "bench", Path.cwd() / "bench") if p.is_dir()), None)
    if folder is None:
        raise GpuregError("bench/ not found: gpureg bench runs from a source checkout of gpureg")
    scripts = sorted(p for p in folder.glob("*.py") if p.stem != "common")
    if names:
        unknown = set(names) - {p.stem for p in scripts}
        if unknown:
            raise ParameterError(f"unknown benchmark(s) {sorted(unknown)}; available: {[p.stem for p in scripts]}")
        scripts = [p for p in scripts if p.stem in names]
    failed = []
    for script in scripts:
        typer.echo(f"== {script.stem}")
        rc = subprocess.call([sys.executable, str(script), *(["--quick"] if quick else [])],
                             env={**os.environ, "GPUREG_BENCH_OUT": str(out.resolve())})
        if rc != 0:
            failed.append(script.stem)
    if failed:
        typer.echo(f"gpureg: error: benchmark(s) failed: {failed}", err=True)
        raise typer.Exit(1)


@app.command()
@friendly
def validate(
    outdir: Path = typer.Argument(Path("gpureg-validation"), help="Output folder: validation.csv/.json, summary.md, figures."),
    size: int = typer.Option(64, "--size", help="Grid edge of the synthetic tomogram (voxels)."),
    noise: str = typer.Option("0,2,5,10,30", "--noise", help="Salt-and-pepper levels in percent, comma-separated."),
    distortions: str = typer.Option("translation,rotation,scale,shear,deformation", "--distortions",
                                    help="Comma-separated subset of translation,rotation,scale,shear,deformation."),
    modes: str = typer.Option("binarized,raw", "--modes", help="Comma-separated subset of binarized,raw."),
    sitk: Optional[bool] = typer.Option(None, "--sitk/--no-sitk", metavar="",
                                        help="Also run SimpleITK (default: when installed, the 'bench' extra)."),
    quick: bool = flag(False, "--quick", help="32^3, largest magnitudes, 0 and 10 % noise, binarized "
                                              "(overrides --size, --noise, --modes)."),
    figures: bool = flag(True, "--figures/--no-figures", help="Write the PNG figures."),
    deformable: bool = flag(False, "--deformable", help="Also register the deformation cases with the B-spline "
                                                        "refinement (rows 'gpureg deformable')."),
    device: Device = DeviceOpt,
):
    """Registration accuracy on known synthetic distortions x noise (reference study's Fig. S1-S3), vs SimpleITK."""
    from ..validate.cases import QUICK
    from ..validate.sweep import run_validation

    def split(text, option):
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise ParameterError(f"{option} needs at least one comma-separated value, got {text!r}")
        return items

    try:
        levels = [float(x) / 100 for x in split(noise, "--noise")]
    except ValueError:
        raise ParameterError(f"--noise must be percentages separated by commas (e.g. 0,10,30), got {noise!r}") from None
    kw = dict(size=size, noise=levels, modes=split(modes, "--modes"))
    if quick:
        kw = dict(QUICK)

    def progress(done, total, rows):
        typer.echo(f"[{done}/{total}] " + " | ".join(
            f"{r['method']} {r['distortion']} {r['magnitude']:g} noise {100 * r['noise']:g}% {r['mode']}: "
            + (f"{r['error_vox']:.3f} vox, {r['seconds']:.2f} s" if r["status"] == "ok" else r["status"])
            for r in rows))

    res = run_validation(outdir, device=device.value, distortions=split(distortions, "--distortions"), sitk=sitk,
                         figures=figures, deformable=deformable, progress=progress, **kw)
    typer.echo(f"{len(res.rows)} registrations ({len(res.failures)} failed) on {res.settings['device']}; "
               f"summary in {outdir / 'summary.md'}")
    if res.failures:
        raise typer.Exit(1)


def _wobble(path):
    """Centre-of-mass residuals of the middle energy's projections (:func:`gpureg.recon.align.input_wobble`)."""
    from ..io.readers import open_input
    from ..recon.align import input_wobble

    with open_input(path) as reader:
        return input_wobble(reader)


def _wobble_line(w):
    if not w:
        return ""
    if w["row_rms"] != w["row_rms"]:  # NaN: the projection totals differ, centre of mass not trusted
        return (f"\n  wobble      not estimated at {w['energy']:.2f} eV (projection totals vary by "
                f"{100 * w['total_spread']:.1f} %: sample leaves the field of view?)")
    hint = "; try --align-projections" if w["suggest"] else ""
    return (f"\n  wobble      centre-of-mass residuals at {w['energy']:.2f} eV: rows {w['row_rms']:.2f} px, "
            f"columns {w['column_rms']:.2f} px RMS (max {w['max']:.2f}){hint}")
def _format_result(d: dict) -> str:
    """The text ``gpureg info RESULT.h5`` prints for :func:`gpureg.io.results.describe_result`'s dict."""
    e = d["energies_ev"]
    lines = [d["path"], f"  result      gpureg {d['gpureg_version']}, {'complete' if d['complete'] else 'partial'}",
             f"  energies    {d['n_energy']}: {e[0]:.2f} .. {e[-1]:.2f} eV" if e else "  energies    none"]
    px = d["voxel_size_nm"]
    lines.append(f"  voxel size  {px:.4g} nm" if px is not None else "  voxel size  unknown")
    for name, s in d["stacks"].items():
        lines.append(f"  /{name:<14} {tuple(s['shape'])} {s['dtype']}, {s['filter']}, {s['stored_mb']:.1f} MB stored"
                     + ("" if s["storage_error"] == "exact" else f" ({s['storage_error']})"))
    if d["dropped"]:
        lines.append("  dropped     " + ", ".join(d["dropped"]))
    lines.append("  maps        " + (", ".join(d["maps"]) or "none")
                 + (f" (skipped: {d['xanes_skipped']})" if d.get("xanes_skipped") else ""))
    return "\n".join(lines)


def format_description(d: dict) -> str:
    """The text ``gpureg info`` prints for :func:`describe_input`'s dict."""
    e = d["energies_ev"]
    lines = [f"{d['path']}", f"  layout      {d['layout']} ({d['kind']})",
             f"  energies    {d['n_energy']}: {e[0]:.2f} .. {e[-1]:.2f} eV" if len(e) > 1
             else f"  energies    1: {e[0]:.2f} eV"]
    if len(e) <= 12:
        lines.append("              " + ", ".join(f"{v:.2f}" for v in e) + " eV")
    axes = "(n_angle, ny, nx)" if d["kind"] == "projections" else "(nz, ny, nx)"
    lines.append(f"  per energy  {tuple(d['shape'])} {axes}; reconstructs to {tuple(d['recon_shape'])}")
    a = d["angles"]
    if a is not None:
        lines.append(f"  angles      {a['n']}: {a['first']:.3f} .. {a['last']:.3f} {a['units']} "
                     f"(step {a['step']:.4g})")
    if d["flat_frames"] is not None:
        lines.append(f"  flat/dark   {d['flat_frames']} / {d['dark_frames']} frames (first energy)")
    px = d["pixel_size_nm"]
    lines.append(f"  pixel size  {px:.4g} nm" if px is not None else "  pixel size  unknown")
    lines.append("  guessed     " + ("; ".join(d["guessed"]) if d["guessed"] else "nothing"))
    return "\n".join(lines)
