"""``gpureg run``, ``demo`` and ``watch``: the pipeline commands, all built on one :class:`RunOptions`."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer

from ..io.results import DEFAULT_COMPRESSION
from ..pipeline.options import Denoise, Device, EdgeMethod, FBPFilter, Model, RunOptions, parse_keep
from ..xanes.uncertainty import PSF_VOXELS
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
    ReferenceOpt,
    ReferencesOpt,
    SmoothOpt,
    app,
    cli_prep,
    flag,
    friendly,
    split_references,
    use_api_key_file,
)

__all__ = ["demo", "run_cmd", "run_options", "watch_cmd"]

NoReportOpt = flag(False, "--no-report", help="Skip figures and report.")
SkipBadOpt = flag(False, "--skip-bad-energies", help="Leave out an energy that cannot give a valid volume (all NaN, "
                                                    "zero flat field), recorded in the result and report, instead "
                                                    "of stopping.")
KeepOpt = typer.Option("recon,aligned", "--keep", metavar="<recon,aligned|none>",
                       help="Stacks kept in the result (the maps, matrices and report are always kept).")
NoKeepOpt = typer.Option("", "--no-keep", metavar="<recon,aligned>", help="Stacks not to keep (e.g. --no-keep "
                                                                           "aligned).")
CompressionOpt = typer.Option(DEFAULT_COMPRESSION, "--compression", metavar="NAME[:LEVEL]",
                              help="Codec of the kept stacks: blosc2-zstd (default, level 0-9), blosc2-lz4, lz4 "
                                   "(bitshuffle), zstd (bitshuffle, 1-22), gzip (1-9; any HDF5 reader), none.")
StoreDtypeOpt = typer.Option("float32", "--store-dtype", metavar="float32|float16",
                             help="float16 halves the stacks (lossy: relative error <= 2^-11; the maps are computed "
                                  "from the stored stack).")
PerParticleOpt = flag(False, "--per-particle", help="Also register every particle on its own (particles that move "
                                                    "relative to each other); stores per-particle transforms.")
DeformableOpt = flag(False, "--deformable", help="Refine every affine with a cubic B-spline deformation (sample "
                                                "deformed during the scan); stores the coefficients, report adds "
                                                "displacement and Jacobian maps.")
SpacingOpt = typer.Option(8.0, "--spacing", help="B-spline control-point spacing (voxels, >= 3) with --deformable.")
RegularizationOpt = typer.Option(2.0, "--regularization", help="Bending-energy weight (>= 0) with --deformable.")
AlignProjectionsOpt = flag(False, "--align-projections",
                           help="Align the projections of every energy before FBP (per-projection shifts from "
                                "iterative reprojection; stage wobble); stored in /alignment. Off by default.")
SeriesWindowOpt = typer.Option(6, "--series-window", min=0,
                               help="Smooth the transforms along the energies over this many energies on each side "
                                    "(affine linear part, per-particle corrections, B-spline coefficients) before "
                                    "resampling; 0: each energy's own fit.")
AllowLimitedOpt = flag(False, "--allow-limited-angles", help="Reconstruct projections with too few angles for the "
                                                             "detector width or covering under 180 degrees "
                                                             "(refused by default).")
AllowFoldingOpt = flag(False, "--allow-folding", help="With --deformable: keep a deformation whose Jacobian "
                                                      "determinant reaches 0 (folding) instead of stopping.")


def run_options(*, device: Device, reference: str, raw: bool, denoise: Optional[Denoise], smooth: float, ramp: float,
                model: Model, center: Optional[str], fbp_filter: FBPFilter, edge: EdgeMethod, no_report: bool = False,
                per_particle: bool = False, scheduler: Optional[str] = None, references=None,
                clusters: Optional[int] = None, skip_bad_energies: bool = False, keep: str = "recon,aligned",
                no_keep: str = "", deformable: bool = False, spacing: float = 8.0, regularization: float = 2.0,
                allow_folding: bool = False, align_projections: bool = False,
                compression: str = DEFAULT_COMPRESSION, store_dtype: str = "float32", denoise_spectra: str = "off",
                reference_column: Optional[str] = None, series_window: int = 6,
                allow_limited_angles: bool = False, psf: float = PSF_VOXELS) -> RunOptions:
    """The :class:`RunOptions` of the shared command-line options (the only place they are mapped)."""
    kept = tuple(k for k in parse_keep(keep) if k not in parse_keep(no_keep))
    prep = cli_prep(raw=raw, denoise=denoise, smooth=smooth, ramp=ramp)
    return RunOptions(device=device, reference=reference, prep=prep, model=model, center=center, filter=fbp_filter,
                      edge=edge, per_particle=per_particle, report=not no_report, scheduler=scheduler, references=split_references(references),
                      clusters=clusters, skip_bad_energies=skip_bad_energies, keep=kept, deformable=deformable,
                      spacing=spacing, regularization=regularization, allow_folding=allow_folding,
                      align_projections=align_projections, compression=compression, store_dtype=store_dtype,
                      denoise_spectra=denoise_spectra, reference_column=reference_column, series_window=series_window,
                      allow_limited_angles=allow_limited_angles, psf=psf)


@app.command("run")
@friendly
def run_cmd(
    input: str = typer.Argument(..., help="Data Exchange HDF5 (projections or /exchange/recon), folder of per-energy "
                                         "files, or a Tiled URI (http://HOST:PORT/api/v1/metadata/PATH)."),
    output: Path = typer.Argument(..., help="Result HDF5 (a report folder RESULT_report/ is written beside it)."),
    device: Device = DeviceOpt,
    reference: str = ReferenceOpt,
    raw: bool = RawOpt,
    denoise: Optional[Denoise] = DenoiseOpt,
    smooth: float = SmoothOpt,
    ramp: float = RampOpt,
    model: Model = ModelOpt,
    center: Optional[str] = CenterOpt,
    fbp_filter: FBPFilter = FilterOpt,
    edge: EdgeMethod = EdgeOpt,
    overwrite: bool = flag(False, "--overwrite", help="Replace a finished OUTPUT (and discard a partial run)."),
    no_report: bool = NoReportOpt,
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Dask scheduler address (multi-GPU/multi-node)."),
    per_particle: bool = PerParticleOpt,
    references: Optional[list[str]] = ReferencesOpt,
    clusters: Optional[int] = ClustersOpt,
    skip_bad_energies: bool = SkipBadOpt,
    keep: str = KeepOpt,
    no_keep: str = NoKeepOpt,
    deformable: bool = DeformableOpt,
    spacing: float = SpacingOpt,
    regularization: float = RegularizationOpt,
    allow_folding: bool = AllowFoldingOpt,
    align_projections: bool = AlignProjectionsOpt,
    compression: str = CompressionOpt,
    store_dtype: str = StoreDtypeOpt,
    api_key_file: Optional[Path] = ApiKeyFileOpt,
    denoise_spectra: str = DenoiseSpectraOpt,
    reference_column: Optional[str] = ReferenceColumnOpt,
    series_window: int = SeriesWindowOpt,
    allow_limited_angles: bool = AllowLimitedOpt,
    psf: float = PsfOpt,
):
    """Projections -> FBP -> binarize -> register -> align -> edge-energy maps -> report (resumable)."""
    from ..pipeline.runner import run

    use_api_key_file(api_key_file)
    options = run_options(device=device, reference=reference, raw=raw, denoise=denoise, smooth=smooth, ramp=ramp,
                          model=model,
                          center=center, fbp_filter=fbp_filter, edge=edge, no_report=no_report,
                          per_particle=per_particle, scheduler=scheduler, references=references,
                          clusters=clusters, skip_bad_energies=skip_bad_energies, keep=keep, no_keep=no_keep,
                          deformable=deformable, spacing=spacing, regularization=regularization,
                          allow_folding=allow_folding, align_projections=align_projections,
                          compression=compression, store_dtype=store_dtype, denoise_spectra=denoise_spectra,
                          reference_column=reference_column, series_window=series_window,
                          allow_limited_angles=allow_limited_angles, psf=psf)
    devices = _announce_devices(options)
    with _energy_progress("run") as on_energy:
        res = run(input, output, options, overwrite=overwrite, progress=on_energy, devices=devices)
    _print_result(res)


@app.command()
@friendly
def demo(
    outdir: Path = typer.Argument(Path("gpureg-demo"), help="Folder for the simulated input, result and figures."),
    size: int = typer.Option(48, "--size", help="Volume size (voxels per side)."),
    angles: int = typer.Option(91, "--angles", help="Projection angles over -90..90 degrees."),
    device: Device = DeviceOpt,
    center: Optional[str] = CenterOpt,
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = flag(True, "--overwrite/--no-overwrite",
                           help="Replace an earlier demo result in OUTDIR (--no-overwrite: refuse)."),
    per_particle: bool = flag(False, "--per-particle",
                              help="Simulate particle 2 tilting relative to particle 1 and register each particle on "
                                   "its own (report: global vs per-particle)."),
    deformable: bool = flag(False, "--deformable",
                            help="Simulate a smooth deformation (up to 3 voxels at 64^3) and register with a "
                                 "B-spline refinement after the affine."),
):
    """Simulate a small Mn K-edge TXM-XANES experiment and run the whole pipeline on it."""
    from ..pipeline.runner import run
    from ..synth.scan import simulate

    if per_particle and deformable:
        raise typer.BadParameter("choose --per-particle or --deformable, not both")
    options = RunOptions(device=device, center=center, per_particle=per_particle, deformable=deformable)
    devices = _announce_devices(options)
    outdir.mkdir(parents=True, exist_ok=True)
    raw = outdir / "demo_input.h5"
    typer.echo(f"simulating {size}^3 x {angles} angles -> {raw}")
    simulate(raw, size=size, n_angles=angles, seed=seed, relative_motion=per_particle,
             deformation=3.0 if deformable else 0.0)
    with _energy_progress("demo") as on_energy:
        res = run(raw, outdir / "demo_result.h5", options, overwrite=overwrite, progress=on_energy, devices=devices)
    _print_result(res)


@app.command("watch")
@friendly
def watch_cmd(
    directory: str = typer.Argument(..., help="Folder the acquisition writes per-energy files into, or the Tiled URI "
                                             "of a Bluesky run (http://HOST:PORT/api/v1/metadata/UID)."),
    output: Path = typer.Argument(..., help="Result HDF5 written when the series ends."),
    pattern: str = typer.Option("*.h5", "--pattern", help="Glob of the per-energy files."),
    expect: Optional[int] = typer.Option(None, "--expect", help="Stop after this many energies."),
    idle_timeout: Optional[float] = typer.Option(None, "--idle-timeout", help="Stop after this many seconds without a "
                                                                              "new energy."),
    settle: float = typer.Option(2.0, "--settle", help="Seconds a file must stay unchanged before it is read."),
    poll: Optional[float] = typer.Option(None, "--poll", help="Seconds between folder scans (default 1); for a Tiled "
                                                              "run the interval between reads while frames come in "
                                                              "(default 0.25), backing off to 2 s after 10 s "
                                                              "without a new frame."),
    angles: Optional[int] = typer.Option(None, "--angles", min=1,
                                         help="Tiled run: projections per energy; an energy is processed as soon as "
                                              "this many (and its open-beam frames) are in. Default: the run's start "
                                              "document (angles_per_energy, num_angles or n_angles, also in "
                                              "plan_args); without either, once the next energy starts."),
    device: Device = DeviceOpt,
    reference: str = typer.Option("highest", "--reference",
                                  help="Final reference energy: highest | lowest | energy in eV (while watching, "
                                       "energies register to the first one)."),
    raw: bool = RawOpt,
    denoise: Optional[Denoise] = DenoiseOpt,
    smooth: float = SmoothOpt,
    ramp: float = RampOpt,
    model: Model = ModelOpt,
    center: Optional[str] = CenterOpt,
    fbp_filter: FBPFilter = FilterOpt,
    edge: EdgeMethod = EdgeOpt,
    overwrite: bool = flag(False, "--overwrite", help="Replace a finished OUTPUT and forget an earlier watch's state."),
    no_report: bool = NoReportOpt,
    keep: str = KeepOpt,
    no_keep: str = NoKeepOpt,
    align_projections: bool = AlignProjectionsOpt,
    compression: str = CompressionOpt,
    store_dtype: str = StoreDtypeOpt,
    denoise_spectra: str = DenoiseSpectraOpt,
    psf: float = PsfOpt,
    publish: Optional[str] = typer.Option(None, "--publish", metavar="URI",
                                          help="Tiled container to publish the result into (edge-energy map, aligned "
                                               "stack, registration table; metadata links the run's uid)."),
    outage_timeout: float = typer.Option(600.0, "--outage-timeout", help="Tiled run: seconds an unreachable server "
                                                                         "is retried before the watch stops "
                                                                         "(resumable)."),
    api_key_file: Optional[Path] = ApiKeyFileOpt,
    allow_limited_angles: bool = AllowLimitedOpt,
    keep_work: bool = flag(False, "--keep-work", help="Keep OUTPUT.watch/ (per-energy volumes) once the result is "
                                                      "complete (removed by default)."),
    deformable: bool = flag(False, "--deformable", help="When the series ends, refine every energy's re-referenced "
                                                        "affine with a cubic B-spline deformation."),
    spacing: float = SpacingOpt,
    regularization: float = RegularizationOpt,
    allow_folding: bool = AllowFoldingOpt,
):
    """Process energies as their files appear, or as a Bluesky run in Tiled acquires them; ends on --expect, a DONE
    file (folder) or the run's stop document, --idle-timeout or Ctrl-C (the same command resumes). Folder: hidden
    and temporary names (.*, ~*, *.tmp, *.part) are ignored; unreadable files are skipped with a warning and tried
    again."""
    from ..io.base import is_uri
    from ..pipeline.watch import watch_folder

    use_api_key_file(api_key_file)
    live = is_uri(directory)
    if publish is not None and not live:
        raise typer.BadParameter("--publish is for a Tiled run (watch URI ...)", param_hint="--publish")
    if angles is not None and not live:
        raise typer.BadParameter("--angles is for a Tiled run (watch URI ...)", param_hint="--angles")
    options = run_options(device=device, reference=reference, raw=raw, denoise=denoise, smooth=smooth, ramp=ramp,
                          model=model,
                          center=center, fbp_filter=fbp_filter, edge=edge, no_report=no_report, keep=keep,
                          no_keep=no_keep, align_projections=align_projections, compression=compression,
                          store_dtype=store_dtype, denoise_spectra=denoise_spectra,
                          allow_limited_angles=allow_limited_angles, deformable=deformable, spacing=spacing,
                          regularization=regularization, allow_folding=allow_folding, psf=psf)
    _announce_devices(options)

    def on_energy(ev):
        count = f"{ev['count']} energ{'y' if ev['count'] == 1 else 'ies'} so far"
        if ev["mse_before"] == 0 and ev["mse_after"] == 0:  # the first file: the provisional reference
            typer.echo(f"{ev['source']}: {ev['energy']:.1f} eV read in {ev['latency_s']:.2f} s (provisional "
                       f"reference; {count})")
            return
        typer.echo(f"{ev['source']}: {ev['energy']:.1f} eV registered in {ev['latency_s']:.2f} s "
                   f"(MSE {ev['mse_before']:.4g} -> {ev['mse_after']:.4g}; {count})")

    def on_run_energy(ev):
        typer.echo(f"{ev['source']}: registered {ev['after_last_frame_s']:.2f} s after its last frame (found after "
                   f"{ev['found_after_s']:.2f} s, processing {ev['processing_s']:.2f} s; MSE {ev['mse_before']:.4g} -> {ev['mse_after']:.4g}; "
                   f"{ev['count']} energies so far)")

    if live:
        from ..pipeline.live import follow_run

        res = follow_run(directory, output, options, expect=expect, idle_timeout=idle_timeout, overwrite=overwrite,
                         on_energy=on_run_energy, poll=0.25 if poll is None else poll, publish=publish,
                         outage_timeout=outage_timeout, angles=angles)
    else:
        res = watch_folder(Path(directory), output, options, pattern=pattern, expect=expect, idle_timeout=idle_timeout,
                           overwrite=overwrite, on_energy=on_energy, settle=settle, poll=1.0 if poll is None else poll,
                           keep_work=keep_work)
    _print_result(res)


def _announce_devices(options):
    """Resolve the devices once and say which (always, on stderr)."""
    from ..pipeline.options import resolve_devices

    devices = resolve_devices(options.device)
    typer.echo(f"gpureg: devices: registration on {devices.registration}, FBP on {devices.fbp}", err=True)
    return devices


@contextlib.contextmanager
def _energy_progress(label):
    """A rich progress bar fed by the pipeline's per-energy events; plain lines when stderr is not a terminal."""
    import sys

    if not sys.stderr.isatty():
        from ..pipeline.steps import energy_line

        yield lambda ev: typer.echo(f"{label}: {energy_line(ev)}", err=True)
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
                  transient=False) as bar:
        task = bar.add_task(label, total=None, status="")

        def on_energy(ev):
            bar.update(task, total=ev["total"], completed=ev["done"],
                       status=f"{ev['energy']:.1f} eV: " + (f"left out ({ev['excluded']})" if ev.get("excluded") else
                                                           f"MSE {ev['mse_before']:.3g} -> {ev['mse_after']:.3g} "
                                                           f"({ev['seconds']:.1f} s)"))

        yield on_energy


def _print_result(res):
    typer.echo(f"result: {res.output}")
    if res.resumed:
        typer.echo(f"resumed an interrupted run ({res.resumed} energies were already done)")
    if res.report_dir is not None:
        typer.echo(f"report: {res.report_dir / 'report.md'} ({len(res.figures)} figures in {res.report_dir})")
