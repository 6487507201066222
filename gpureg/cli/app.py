"""Command-line interface (typer): a thin adapter over the public API.

Every command turns expected failures (bad input, missing GPU, unwritable
output) into one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer

__all__ = ["app", "main"]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="gpureg: GPU engine for TXM-XANES spectro-tomography (FBP, 3D affine registration, "
                       "edge-energy maps).")


DeviceOpt = typer.Option("auto", "--device", help="auto | cpu | gpu ('gpu' without a usable GPU is an error).")


def friendly(fn):
    """Decorator: expected errors become ``gpureg: error: ...`` and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..core.backend import GPUUnavailableError

        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError, OSError, KeyError, GPUUnavailableError, RuntimeError, MemoryError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if type(exc).__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError):
                msg = f"out of memory: {msg} (try a smaller volume, --device cpu, or free GPU memory)"
            typer.echo(f"gpureg: error: {msg}", err=True)
            raise typer.Exit(2) from None

    return wrapper


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details.")):
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")


@app.command()
@friendly
def info():
    """Versions, and whether CuPy/GPU and ASTRA-CUDA are usable."""
    import platform

    import numpy
    import scipy

    from ..core.backend import _cupy_probe, gpu_name
    from ..core.version import __version__

    rows = {"gpureg": __version__, "python": platform.python_version(), "numpy": numpy.__version__,
            "scipy": scipy.__version__}
    cp, why = _cupy_probe()
    rows["cupy"] = cp.__version__ if cp is not None else f"unavailable ({why})"
    rows["gpu"] = gpu_name() or "none"
    try:
        import astra

        rows["astra"] = f"{astra.__version__} (CUDA: {'yes' if astra.use_cuda() else 'no'})"
    except Exception as exc:  # astra missing or broken
        rows["astra"] = f"unavailable ({type(exc).__name__})"
    width = max(map(len, rows))
    for k, v in rows.items():
        typer.echo(f"{k:<{width}}  {v}")


@app.command()
@friendly
def register(
    fixed: Path = typer.Argument(..., help="Reference volume (.npy or HDF5)."),
    moving: Path = typer.Argument(..., help="Moving volume (.npy or HDF5), same shape."),
    output: Path = typer.Option(Path("matrix.json"), "--output", "-o", help="Matrix file (.json or .h5)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="HDF5 dataset of the volumes."),
    aligned: Optional[Path] = typer.Option(None, "--aligned", help="Also write the aligned moving volume (.npy/.h5)."),
    binarize: bool = typer.Option(False, "--binarize/--raw", help="Register Otsu-binarized volumes (reference method)."),
    model: str = typer.Option("affine", "--model", help="affine | translation"),
    device: str = DeviceOpt,
):
    """Register MOVING to FIXED (affine, MSE); write the 4x4 moving_from_reference matrix."""
    from ..core.transform import apply_affine
    from ..io.files import load_volume, save_matrix, save_volume
    from ..register.affine import register_affine

    f = load_volume(fixed, dataset)
    m = load_volume(moving, dataset)
    res = register_affine(f, m, device=device, binarize=binarize, model=model)
    meta = {"mse_before": res.mse_before, "mse_after": res.mse_after, "iterations": res.iterations,
            "seconds": res.seconds, "device": res.device, "fixed": str(fixed), "moving": str(moving)}
    save_matrix(output, res.matrix, attrs=meta if output.suffix == ".json" else {k: json.dumps(v) for k, v in meta.items()})
    if aligned is not None:
        save_volume(aligned, apply_affine(m, res.matrix, device=device), dataset="aligned")
    typer.echo(f"MSE {res.mse_before:.4g} -> {res.mse_after:.4g} in {res.seconds:.2f} s on {res.device} "
               f"(passes per level {res.iterations}); matrix written to {output}")


@app.command()
@friendly
def xanes(
    aligned: Path = typer.Argument(..., help="HDF5 with /aligned + /energy, or /exchange/recon + /exchange/energy."),
    output: Path = typer.Argument(..., help="New HDF5 file for /energy and the /xanes group."),
    method: str = typer.Option("half", "--method", help="half (0.5 crossing) | derivative (max dmu/dE) | both"),
    min_jump: Optional[float] = typer.Option(None, "--min-jump", help="Edge-jump threshold (default: automatic)."),
    min_voxels: int = typer.Option(64, "--min-voxels", help="Smallest particle kept in the labels."),
    slab: int = typer.Option(16, "--slab", help="z-planes per slab (memory bound)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Stack dataset (n_energy, Z, Y, X)."),
    energy_dataset: Optional[str] = typer.Option(None, "--energy-dataset", help="Energy dataset (eV)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it exists."),
    device: str = DeviceOpt,
):
    """Edge-energy, edge-jump and white-line maps, particle labels and particle spectra of an aligned stack."""
    from ..xanes.write import write_xanes

    s = write_xanes(aligned, output, dataset=dataset, energy_dataset=energy_dataset, method=method,
                    min_jump=min_jump, min_voxels=min_voxels, slab=slab, device=device, overwrite=overwrite)
    typer.echo(f"{s['valid']} of {s['voxels']} voxels mapped, {s['particles']} particles, median edge energy "
               f"{s['edge_energy_median']:.2f} eV (pre {s['pre']}, post {s['post']} eV); written to {output}")


@app.command()
@friendly
def plot(
    result: Path = typer.Argument(..., help="Pipeline or `gpureg xanes` output HDF5."),
    outdir: Path = typer.Argument(..., help="Folder for the PNG figures (created)."),
):
    """Every figure the RESULT file has data for (edge-energy maps, spectra, registration checks)."""
    from ..figures.result import plot_result

    paths = plot_result(result, outdir)
    typer.echo(f"{len(paths)} figure(s) written to {outdir}: " + ", ".join(p.name for p in paths))


@app.command("run")
@friendly
def run_cmd(
    input: Path = typer.Argument(..., help="Data Exchange HDF5 (projections or /exchange/recon) or folder of per-energy files."),
    output: Path = typer.Argument(..., help="Result HDF5 (a report folder RESULT_report/ is written beside it)."),
    device: str = DeviceOpt,
    reference: str = typer.Option("highest", "--reference", help="Reference energy: highest | lowest | energy in eV."),
    raw: bool = typer.Option(False, "--raw", help="Register grey levels instead of Otsu-binarized tomograms."),
    denoise: Optional[str] = typer.Option(None, "--denoise", help="median | gaussian filter before binarizing."),
    model: str = typer.Option("affine", "--model", help="affine | translation"),
    center: Optional[float] = typer.Option(None, "--center", help="Rotation-axis detector column for FBP."),
    fbp_filter: str = typer.Option("ram-lak", "--filter", help="FBP filter."),
    xanes_method: str = typer.Option("half", "--edge", help="Edge energy: half (0.5 crossing) | derivative (max dmu/dE)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished OUTPUT (and discard a partial run)."),
    no_report: bool = typer.Option(False, "--no-report", help="Skip figures and report."),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Dask scheduler address (multi-GPU/multi-node)."),
    per_particle: bool = typer.Option(False, "--per-particle",
                                      help="Also register every particle on its own (particles that move "
                                           "relative to each other); stores per-particle transforms."),
):
    """Projections -> FBP -> binarize -> register -> align -> edge-energy maps -> report (resumable)."""
    from ..pipeline.runner import run

    with _energy_progress("run") as on_energy:
        res = run(input, output, device=device, reference=reference, binarize=not raw, denoise=denoise, model=model,
                  center=center, filter=fbp_filter, xanes_method=xanes_method, overwrite=overwrite,
                  report=not no_report, progress=on_energy, scheduler=scheduler, per_particle=per_particle)
    _print_result(res)


@app.command()
@friendly
def demo(
    outdir: Path = typer.Argument(Path("gpureg-demo"), help="Folder for the simulated input, result and figures."),
    size: int = typer.Option(48, "--size", help="Volume size (voxels per side)."),
    angles: int = typer.Option(91, "--angles", help="Projection angles over -90..90 degrees."),
    device: str = DeviceOpt,
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(True, "--overwrite/--keep", help="Replace an earlier demo result in OUTDIR."),
    per_particle: bool = typer.Option(False, "--per-particle",
                                      help="Simulate particle 2 tilting relative to particle 1 and register "
                                           "each particle on its own (report: global vs per-particle)."),
):
    """Simulate a small Mn K-edge TXM-XANES experiment and run the whole pipeline on it."""
    from ..pipeline.runner import run
    from ..synth.scan import simulate

    outdir.mkdir(parents=True, exist_ok=True)
    raw = outdir / "demo_input.h5"
    typer.echo(f"simulating {size}^3 x {angles} angles -> {raw}")
    simulate(raw, size=size, n_angles=angles, seed=seed, relative_motion=per_particle)
    with _energy_progress("demo") as on_energy:
        res = run(raw, outdir / "demo_result.h5", device=device, overwrite=overwrite, progress=on_energy,
                  per_particle=per_particle)
    _print_result(res)


@app.command("watch")
@friendly
def watch_cmd(
    directory: Path = typer.Argument(..., help="Folder the acquisition writes per-energy files into."),
    output: Path = typer.Argument(..., help="Result HDF5 written when the series ends."),
    pattern: str = typer.Option("*.h5", "--pattern", help="Glob of the per-energy files."),
    expect: Optional[int] = typer.Option(None, "--expect", help="Stop after this many energies."),
    idle_timeout: Optional[float] = typer.Option(None, "--idle-timeout", help="Stop after this many idle seconds."),
    device: str = DeviceOpt,
    raw: bool = typer.Option(False, "--raw", help="Register grey levels instead of binarized tomograms."),
    overwrite: bool = typer.Option(False, "--overwrite"),
):
    """Process energies as their files appear (stop with --expect, --idle-timeout or a DONE file)."""
    from ..pipeline.watch import watch

    def on_energy(ev):
        typer.echo(f"{ev['source']}: {ev['energy']:.1f} eV registered in {ev['latency_s']:.2f} s "
                   f"(MSE {ev['mse_before']:.4g} -> {ev['mse_after']:.4g}; {ev['count']} energies so far)")

    res = watch(directory, output, pattern=pattern, expect=expect, idle_timeout=idle_timeout, device=device,
                binarize=not raw, overwrite=overwrite, on_energy=on_energy)
    _print_result(res)


@app.command()
@friendly
def bench(
    names: Optional[list[str]] = typer.Argument(None, help="Benchmarks to run (default: all in bench/)."),
    quick: bool = typer.Option(False, "--quick", help="Small sizes, one repeat."),
):
    """Run the benchmarks in bench/ (source checkout); each prints and saves JSON in bench/results/."""
    import subprocess

    folder = next((p for p in (Path(__file__).resolve().parents[1] / "bench", Path.cwd() / "bench") if p.is_dir()), None)
    if folder is None:
        raise ValueError("bench/ not found: gpureg bench runs from a source checkout of gpureg")
    scripts = sorted(p for p in folder.glob("*.py") if p.stem != "common")
    if names:
        unknown = set(names) - {p.stem for p in scripts}
        if unknown:
            raise ValueError(f"unknown benchmark(s) {sorted(unknown)}; available: {[p.stem for p in scripts]}")
        scripts = [p for p in scripts if p.stem in names]
    failed = []
    for script in scripts:
        typer.echo(f"== {script.stem}")
        rc = subprocess.call([sys.executable, str(script), *(["--quick"] if quick else [])])
        if rc != 0:
            failed.append(script.stem)
    if failed:
        raise RuntimeError(f"benchmark(s) failed: {failed}")


@contextlib.contextmanager
def _energy_progress(label):
    """A rich progress bar fed by the pipeline's per-energy events."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[status]}"), transient=False) as bar:
        task = bar.add_task(label, total=None, status="")

        def on_energy(ev):
            bar.update(task, total=ev["total"], completed=ev["done"],
                       status=f"{ev['energy']:.1f} eV: MSE {ev['mse_before']:.3g} -> {ev['mse_after']:.3g} "
                              f"({ev['seconds']:.1f} s)")

        yield on_energy


def _print_result(res):
    typer.echo(f"result: {res.output}")
    if res.resumed:
        typer.echo(f"resumed an interrupted run ({res.resumed} energies were already done)")
    if res.report_dir is not None:
        typer.echo(f"report: {res.report_dir / 'report.md'} ({len(res.figures)} figures in {res.report_dir})")


@app.command()
@friendly
def simulate(
    output: Path = typer.Argument(..., help="Data Exchange HDF5 to write (projections, flats, darks and /truth)."),
    size: int = typer.Option(48, "--size", help="Volume size (voxels per side)."),
    energies: str = typer.Option("default", "--energies",
                                 help="'default' (Mn K-edge grid, 29 energies), a comma list or start:stop:step (eV)."),
    angles: int = typer.Option(181, "--angles", help="Projection angles over -90..90 degrees."),
    noise: float = typer.Option(1.0, "--noise", help="Noise scale: 0 noise-free, 1 Poisson at --photons + read noise."),
    photons: float = typer.Option(1e4, "--photons", help="Flat-field counts per pixel."),
    salt_pepper: float = typer.Option(0.0, "--salt-pepper", help="Fraction of dead/saturated projection pixels."),
    relative_motion: bool = typer.Option(False, "--relative-motion", help="Particle 2 also moves relative to particle 1."),
    motion: str = typer.Option("default", "--motion", help="default | none"),
    seed: int = typer.Option(0, "--seed", help="Geometry, motion and noise seed."),
):
    """Simulate a Mn K-edge TXM-XANES scan: two particles, known per-energy motion and edge energies."""
    from ..synth.scan import simulate as simulate_scan
    from ..synth.spectra import parse_energies

    grid = parse_energies(energies)
    with _step_progress("simulate", grid.size) as step:
        simulate_scan(output, size=size, energies=grid, n_angles=angles, noise=noise, photons=photons,
                      salt_pepper=salt_pepper, relative_motion=relative_motion, motion=motion, seed=seed,
                      progress=step)
    typer.echo(f"{grid.size} energies x {angles} angles of a {size}^3 sample written to {output}")


@app.command()
@friendly
def recon(
    input: Path = typer.Argument(..., help="Data Exchange HDF5, or a folder/glob of per-energy HDF5 or TIFF files."),
    output: Path = typer.Argument(..., help="HDF5 with /exchange/recon (n_energy, nz, ny, nx), energies and /truth."),
    center: Optional[str] = typer.Option(None, "--center",
                                         help="Rotation-axis detector column, or 'auto' (0/180-degree correlation); "
                                              "default: the detector middle."),
    fbp_filter: str = typer.Option("ram-lak", "--filter", help="ram-lak | shepp-logan | cosine | hamming | hann | none"),
    device: str = DeviceOpt,
):
    """Flat/dark-correct and FBP-reconstruct every energy (ASTRA; CUDA when available)."""
    from ..recon.fbp import reconstruct_file

    axis = center
    if center is not None and center.strip().lower() != "auto":
        try:
            axis = float(center)
        except ValueError:
            raise ValueError(f"--center must be a detector column or 'auto', got {center!r}") from None
    done = []
    with _step_progress("recon", None) as step:
        reconstruct_file(input, output, center=axis, filter=fbp_filter, device=device,
                         progress=lambda i, n, e: (done.append(e), step(i, n, e)))
    typer.echo(f"{len(done)} energies reconstructed to {output}")


@contextlib.contextmanager
def _step_progress(label, total):
    """A rich progress bar advanced by ``step(i, n, energy_ev)`` callbacks."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[status]}")) as bar:
        task = bar.add_task(label, total=total, status="")

        def step(i, n, energy):
            bar.update(task, total=n, completed=i + 1, status=f"{energy:.1f} eV")

        yield step


@app.command()
@friendly
def validate(
    outdir: Path = typer.Argument(Path("gpureg-validation"), help="Output folder: validation.csv/.json, summary.md, figures."),
    size: int = typer.Option(64, "--size", help="Grid edge of the synthetic tomogram (voxels)."),
    noise: str = typer.Option("0,2,5,10,30", "--noise", help="Salt-and-pepper levels in percent, comma-separated."),
    distortions: str = typer.Option("translation,rotation,scale,shear,deformation", "--distortions",
                                    help="Comma-separated subset of translation,rotation,scale,shear,deformation."),
    modes: str = typer.Option("binarized,raw", "--modes", help="Comma-separated subset of binarized,raw."),
    sitk: Optional[bool] = typer.Option(None, "--sitk/--no-sitk",
                                        help="Also run SimpleITK (default: when installed, the 'bench' extra)."),
    quick: bool = typer.Option(False, "--quick", help="32^3, largest magnitudes, 0 and 10 % noise, binarized "
                                                      "(overrides --size, --noise, --modes)."),
    figures: bool = typer.Option(True, "--figures/--no-figures", help="Write the PNG figures."),
    device: str = DeviceOpt,
):
    """Registration accuracy on known synthetic distortions x noise (reference study's Fig. S1-S3), vs SimpleITK."""
    from ..validate.cases import QUICK
    from ..validate.sweep import run_validation

    def split(text, option):
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise ValueError(f"{option} needs at least one comma-separated value, got {text!r}")
        return items

    try:
        levels = [float(x) / 100 for x in split(noise, "--noise")]
    except ValueError:
        raise ValueError(f"--noise must be percentages separated by commas (e.g. 0,10,30), got {noise!r}") from None
    kw = dict(size=size, noise=levels, modes=split(modes, "--modes"))
    if quick:
        kw = dict(QUICK)

    def progress(done, total, rows):
        typer.echo(f"[{done}/{total}] " + " | ".join(
            f"{r['method']} {r['distortion']} {r['magnitude']:g} noise {100 * r['noise']:g}% {r['mode']}: "
            + (f"{r['error_vox']:.3f} vox, {r['seconds']:.2f} s" if r["status"] == "ok" else r["status"])
            for r in rows))

    res = run_validation(outdir, device=device, distortions=split(distortions, "--distortions"), sitk=sitk,
                         figures=figures, progress=progress, **kw)
    typer.echo(f"{len(res.rows)} registrations ({len(res.failures)} failed) on {res.settings['device']}; "
               f"summary in {outdir / 'summary.md'}")
    if res.failures:
        raise typer.Exit(1)


def main(argv=None):
    """Entry point of the ``gpureg`` command."""
    return app(args=argv, prog_name="gpureg")




if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
