"""Single-step commands: ``gpureg register``, ``xanes``, ``plot``, ``view``, ``recon``, ``simulate``."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Optional

import typer

from ..core.errors import GpuregError, InputError
from ..pipeline.options import Denoise, Device, EdgeMethod, FBPFilter, Model, parse_center
from .app import (
    ApiKeyFileOpt,
    CenterOpt,
    ClustersOpt,
    DenoiseOpt,
    DenoiseSpectraOpt,
    DeviceOpt,
    EdgeOpt,
    FilterOpt,
    ModelOpt,
    PsfOpt,
    RampOpt,
    RawOpt,
    ReferenceColumnOpt,
    ReferencesOpt,
    SmoothOpt,
    app,
    cli_prep,
    flag,
    friendly,
    split_references,
    use_api_key_file,
)

__all__ = ["export", "plot", "recon", "register", "report", "simulate", "view", "xanes"]


@app.command()
@friendly
def register(
    fixed: Path = typer.Argument(..., help="Reference volume (.npy or HDF5)."),
    moving: Path = typer.Argument(..., help="Moving volume (.npy or HDF5), same shape."),
    output: Path = typer.Option(Path("matrix.json"), "--output", "-o", help="Matrix file (.json or .h5)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="HDF5 dataset of the volumes."),
    aligned: Optional[Path] = typer.Option(None, "--aligned", help="Also write the aligned moving volume (.npy/.h5)."),
    raw: bool = RawOpt,
    denoise: Optional[Denoise] = DenoiseOpt,
    smooth: float = SmoothOpt,
    ramp: float = RampOpt,
    model: Model = ModelOpt,
    device: Device = DeviceOpt,
    overwrite: bool = flag(False, "--overwrite", help="Replace existing output files."),
):
    """Register MOVING to FIXED (affine, MSE; Otsu-binarized like `gpureg run` unless --raw); write the 4x4
    moving_from_reference matrix."""
    from ..core.transform import apply_affine
    from ..io.files import HDF5_SUFFIXES, check_new_output, check_suffix, load_volume, save_matrix, save_volume
    from ..register.affine import register_affine

    check_new_output(check_suffix(output, (".json",) + HDF5_SUFFIXES, "-o/--output (the matrix)"),
                     inputs=(fixed, moving), overwrite=overwrite)
    if aligned is not None:
        check_new_output(check_suffix(aligned, (".npy",) + HDF5_SUFFIXES, "--aligned (the volume)"),
                         inputs=(fixed, moving, output), overwrite=overwrite)
    f = load_volume(fixed, dataset, finite=True)
    m = load_volume(moving, dataset, finite=True)
    prep = cli_prep(raw=raw, denoise=denoise, smooth=smooth, ramp=ramp)
    res = register_affine(f, m, prep=prep, device=device.value, model=model.value)
    meta = {"mse_before": res.mse_before, "mse_after": res.mse_after, "iterations": res.iterations,
            "seconds": res.seconds, "device": res.device, "fixed": str(fixed), "moving": str(moving),
            "binarize": not raw, "prep": prep.to_dict()}
    save_matrix(output, res.matrix, attrs=meta if output.suffix == ".json" else {k: json.dumps(v) for k, v in meta.items()})
    if aligned is not None:
        save_volume(aligned, apply_affine(m, res.matrix, device=device.value), dataset="aligned")
    typer.echo(f"MSE {res.mse_before:.4g} -> {res.mse_after:.4g} in {res.seconds:.2f} s on {res.device} "
               f"({'grey levels' if raw else 'binarized'}; passes per level {res.iterations}); matrix written to {output}")


@app.command()
@friendly
def xanes(
    aligned: Path = typer.Argument(..., help="HDF5 with /aligned + /energy, or /exchange/recon + /exchange/energy."),
    output: Path = typer.Argument(..., help="New HDF5 file for /energy and the /xanes group."),
    edge: EdgeMethod = EdgeOpt,
    min_jump: Optional[float] = typer.Option(None, "--min-jump", help="Edge-jump threshold (default: automatic)."),
    min_voxels: int = typer.Option(64, "--min-voxels", help="Smallest particle kept in the labels."),
    slab: int = typer.Option(16, "--slab", help="z-planes per slab (memory bound)."),
    dataset: Optional[str] = typer.Option(None, "--dataset", help="Stack dataset (n_energy, Z, Y, X)."),
    energy_dataset: Optional[str] = typer.Option(None, "--energy-dataset", help="Energy dataset (eV)."),
    overwrite: bool = flag(False, "--overwrite", help="Replace OUTPUT if it exists."),
    device: Device = DeviceOpt,
    references: Optional[list[str]] = ReferencesOpt,
    clusters: Optional[int] = ClustersOpt,
    denoise_spectra: str = DenoiseSpectraOpt,
    reference_column: Optional[str] = ReferenceColumnOpt,
    psf: float = PsfOpt,
    pre: Optional[str] = typer.Option(None, "--pre", metavar="LO,HI",
                                      help="Pre-edge fit range in eV (default: from the data, as Larch)."),
    post: Optional[str] = typer.Option(None, "--post", metavar="LO,HI",
                                       help="Post-edge fit range in eV; energies must lie between --pre and --post."),
):
    """Edge-energy, edge-jump and white-line maps, particle labels and particle spectra of an aligned stack;
    with --references / --clusters also reference fractions and k-means clusters."""
    from ..core.errors import EnergyGridError
    from ..pipeline.files import map_xanes_file
    from ..xanes.denoise import parse_denoise

    try:
        s = map_xanes_file(aligned, output, dataset=dataset, energy_dataset=energy_dataset, method=edge.value,
                           min_jump=min_jump, min_voxels=min_voxels, slab=slab, device=device.value,
                           overwrite=overwrite, references=split_references(references) or None, clusters=clusters,
                           denoise=parse_denoise(denoise_spectra), column=reference_column, psf=psf,
                           pre=_energy_range(pre, "--pre"), post=_energy_range(post, "--post"))
    except EnergyGridError as exc:  # the grid, not the data: say how to choose ranges that fit it
        raise EnergyGridError(f"{str(exc).splitlines()[0]}; give --pre LO,HI and --post LO,HI (eV) with energies "
                              "between them, or scan more energies across the edge") from None
    typer.echo(f"{s['valid']} of {s['voxels']} voxels mapped, {s['particles']} particles, median edge energy "
               f"{s['edge_energy_median']:.2f} eV (pre {s['pre']}, post {s['post']} eV); written to {output}")
    if "fraction_medians" in s:
        typer.echo("median fractions: " + ", ".join(f"{k} {v:.3f}" for k, v in s["fraction_medians"].items()))
    if "cluster_counts" in s:
        typer.echo(f"clusters (voxels): {s['cluster_counts']}")


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


@app.command()
@friendly
def report(
    result: Path = typer.Argument(..., help="Result HDF5 of `gpureg run`/`watch`/`demo`."),
    outdir: Optional[Path] = typer.Option(None, "--outdir", help="Report folder (default: RESULT_report/ beside it)."),
):
    """(Re)build the whole report folder of a result: figures, summary.json and report.md."""
    from ..io.results import ResultFile, report_dir_for
    from ..pipeline.report import write_report

    with ResultFile(result) as rf:
        if not rf.has_registration():
            raise InputError(f"{result}: not a pipeline result (no /registration/matrix); use `gpureg plot` for figures")
    folder = report_dir_for(result) if outdir is None else outdir
    figures = write_report(result, folder)
    typer.echo(f"report: {folder / 'report.md'} ({len(figures)} figures in {folder})")


@app.command()
@friendly
def export(
    result: Path = typer.Argument(..., help="Result HDF5 of `gpureg run`/`watch`/`demo`."),
    zarr: Path = typer.Option(..., "--zarr", help="OME-Zarr folder to write (NGFF 0.4, multiscale): the aligned "
                                                 "stack, particle labels and maps, with the voxel size as scale."),
    overwrite: bool = flag(False, "--overwrite", help="Replace an existing OUT.zarr."),
):
    """Export a result for napari (napari-ome-zarr), neuroglancer and other OME-Zarr viewers."""
    from ..pipeline.export import export_zarr

    out = export_zarr(result, zarr, overwrite=overwrite)
    typer.echo(f"OME-Zarr: {out} (open with: napari {out})")


@app.command()
@friendly
def view(
    result: Path = typer.Argument(..., help="Pipeline or `gpureg xanes` output HDF5."),
    screenshot: Optional[Path] = typer.Option(None, "--screenshot", help="Render headless to this PNG and exit."),
):
    """Browse RESULT in napari: aligned stack by energy (eV), edge-energy map, particles, voxel spectra.

    Needs the extra: pip install 'gpureg\\[viewer]'.
    """
    from ..viewer import app as viewer

    try:
        napari = viewer.require_napari() if screenshot is None else None
    except ImportError as exc:
        raise GpuregError(str(exc)) from None
    if screenshot is not None:
        try:
            png = viewer.screenshot(result, screenshot)
        except ImportError as exc:
            raise GpuregError(str(exc)) from None
        typer.echo(f"screenshot: {png}")
        return
    viewer.open_result(result, show=True)
    napari.run()


@app.command()
@friendly
def simulate(
    output: Path = typer.Argument(..., help="Data Exchange HDF5 to write (projections, flats, darks and /truth)."),
    size: int = typer.Option(48, "--size", help="Volume size (voxels per side)."),
    energies: str = typer.Option("default", "--energies",
                                 help="'default' (Mn K-edge grid, 29 energies, 3 eV across the edge), 'fine' (34 energies, "
                                      "1.5 eV across the edge), a comma list or start:stop:step (eV)."),
    angles: int = typer.Option(181, "--angles", help="Projection angles over -90..90 degrees."),
    noise: float = typer.Option(1.0, "--noise", help="Noise scale: 0 noise-free, 1 Poisson at --photons + read noise."),
    photons: float = typer.Option(1e4, "--photons", help="Flat-field counts per pixel."),
    salt_pepper: float = typer.Option(0.0, "--salt-pepper", help="Fraction of dead/saturated projection pixels."),
    relative_motion: bool = flag(False, "--relative-motion", help="Particle 2 also moves relative to particle 1."),
    motion: str = typer.Option("default", "--motion", help="default | none"),
    seed: int = typer.Option(0, "--seed", help="Geometry, motion and noise seed."),
    mixture: bool = flag(False, "--mixture", help="Voxels are MnO/Mn2O3 mixtures with known fractions "
                                                  "(/truth/fractions); references written to OUTPUT_references/."),
    deformation: float = typer.Option(0.0, "--deformation",
                                      help="Also deform the sample smoothly: at most this many voxels (at 64^3, "
                                           "scaled) far from the reference; exact truth in /truth."),
    jitter: float = typer.Option(0.0, "--jitter", metavar="PX",
                                 help="Per-projection shifts (stage wobble), RMS pixels per axis, random per energy "
                                      "and angle; truth in /truth/projection_shifts."),
    overwrite: bool = flag(False, "--overwrite", help="Replace OUTPUT if it exists."),
):
    """Simulate a Mn K-edge TXM-XANES scan: two particles, known per-energy motion and edge energies."""
    from ..io.files import check_new_output
    from ..synth.scan import check_simulation
    from ..synth.scan import simulate as simulate_scan
    from ..synth.spectra import parse_energies

    check_new_output(output, overwrite=overwrite)
    grid = parse_energies(energies)
    check_simulation(size=size, energies=grid, n_angles=angles, noise=noise, photons=photons, salt_pepper=salt_pepper,
                     deformation=deformation, relative_motion=relative_motion)  # before the progress bar
    with _step_progress("simulate", grid.size) as step:
        simulate_scan(output, size=size, energies=grid, n_angles=angles, noise=noise, photons=photons,
                      salt_pepper=salt_pepper, relative_motion=relative_motion, motion=motion, seed=seed,
                      deformation=deformation, progress=step, mixture=mixture, jitter=jitter)
    typer.echo(f"{grid.size} energies x {angles} angles of a {size}^3 sample written to {output}")
    if mixture:
        refs = output.with_name(output.stem + "_references")
        typer.echo(f"reference spectra: {refs / 'MnO.txt'}, {refs / 'Mn2O3.txt'}")


@app.command()
@friendly
def recon(
    input: str = typer.Argument(..., help="Data Exchange HDF5, a folder/glob of per-energy HDF5 or TIFF files, or a "
                                         "Tiled URI."),
    output: Path = typer.Argument(..., help="HDF5 with /exchange/recon (n_energy, nz, ny, nx), energies and /truth."),
    center: Optional[str] = CenterOpt,
    fbp_filter: FBPFilter = FilterOpt,
    device: Device = DeviceOpt,
    api_key_file: Optional[Path] = ApiKeyFileOpt,
    overwrite: bool = flag(False, "--overwrite", help="Replace OUTPUT if it exists."),
    allow_limited_angles: bool = flag(False, "--allow-limited-angles",
                                      help="Reconstruct with too few angles or under 180 degrees (refused by default)."),
):
    """Flat/dark-correct and FBP-reconstruct every energy (ASTRA; CUDA when available)."""
    from ..io.files import check_new_output
    from ..pipeline.files import reconstruct_file

    use_api_key_file(api_key_file)
    check_new_output(output, inputs=(input,), overwrite=overwrite)
    done = []
    with _step_progress("recon", None) as step:
        reconstruct_file(input, output, center=parse_center(center), filter=fbp_filter.value, device=device.value,
                         allow_limited_angles=allow_limited_angles, progress=lambda i, n, e: (done.append(e), step(i, n, e)))
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


def _energy_range(text, option):
    """``LO,HI`` (eV) of ``--pre``/``--post`` as a pair of floats, or None."""
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter(f"expected LO,HI in eV (e.g. 6500,6530), got {text!r}", param_hint=option) from None
    return lo, hi
