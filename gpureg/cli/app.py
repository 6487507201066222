"""The ``gpureg`` typer application: error handling, ``--version``/``--verbose``, shared options.

Every command turns expected failures (bad input, missing GPU, unwritable
output) into one line on stderr and exit code 2, never a traceback. Commands
live in :mod:`~gpureg.cli.pipeline_cmds` (run, demo, watch),
:mod:`~gpureg.cli.tools` (register, xanes, plot, recon, simulate) and
:mod:`~gpureg.cli.admin` (info, bench, validate); one option name means one
choice in all of them (defined here).
"""

from __future__ import annotations

import functools
import logging
from typing import Optional

import typer

from ..pipeline.options import Device, EdgeMethod, FBPFilter, Model

__all__ = ["app", "ApiKeyFileOpt", "CenterOpt", "DenoiseOpt", "DeviceOpt", "EdgeOpt", "FilterOpt", "flag", "friendly", "main",
           "ModelOpt", "RawOpt", "ReferenceOpt", "SmoothOpt", "use_api_key_file"]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="gpureg: GPU engine for TXM-XANES spectro-tomography (FBP, 3D affine registration, "
                       "edge-energy maps).")


def flag(default: bool, *names: str, help: str):
    """A plain boolean flag (``--raw``, or ``--on/--off``): no value, no ``<bool>`` in ``--help``."""
    return typer.Option(default, *names, help=help, metavar="")


def device_opt():
    return typer.Option(Device.auto, "--device", help="Where to compute ('gpu' without a usable GPU is an error; "
                                                      "'auto' picks the GPU for each stage that can use it).")


DeviceOpt = device_opt()
ReferenceOpt = typer.Option("highest", "--reference", help="Reference energy: highest | lowest | energy in eV.")
RawOpt = flag(False, "--raw", help="Register grey levels instead of Otsu-binarized tomograms.")
DenoiseOpt = typer.Option(None, "--denoise", help="Filter before binarizing/registering (impulse or median: salt-and-pepper).")
SmoothOpt = typer.Option(1.0, "--smooth", help="Gaussian sigma (voxels) applied to both volumes before "
                                               "registering (0: none).")
RampOpt = typer.Option(3.0, "--ramp", help="Width (voxels) of the partial-volume ramp across the Otsu surface of the "
                                           "binarization (0: hard 0/1; ignored with --raw).")


def cli_prep(*, raw: bool, denoise, smooth: float, ramp: float):
    """The :class:`gpureg.Prep` of the shared options ``--raw``, ``--denoise``, ``--smooth``, ``--ramp``."""
    from ..register.prepare import Prep

    return Prep(binarize=not raw, denoise=denoise, smooth=smooth, ramp=ramp)
ModelOpt = typer.Option(Model.affine, "--model", help="Registration model.")
CenterOpt = typer.Option(None, "--center", metavar="<column|auto>", help="Rotation-axis detector column for FBP, or 'auto' (0/180-degree "
                                                "correlation); default: the detector middle.")
FilterOpt = typer.Option(FBPFilter.ram_lak, "--filter", help="FBP filter.")
EdgeOpt = typer.Option(EdgeMethod.half, "--edge", help="Edge energy: half (0.5 crossing) | derivative (max dmu/dE) "
                                                       "| both.")

ReferencesOpt = typer.Option(None, "--references", metavar="FILE[,FILE...]",
                             help="Reference spectra (two-column text: energy eV, mu; or Athena .prj) for "
                                  "linear-combination fractions per voxel; repeat or comma-separate.")
ClustersOpt = typer.Option(None, "--clusters", min=2, help="k-means clusters of the normalised voxel spectra.")
ReferenceColumnOpt = typer.Option(None, "--reference-column", metavar="NAME",
                                  help="mu column of the reference files (a header name or a 1-based number); "
                                       "default: mu by name, or from I0/It/If.")
DenoiseSpectraOpt = typer.Option("off", "--denoise-spectra", metavar="auto|K|off",
                                 help="Spectral denoising before the XANES maps and fits: truncated PCA of the "
                                      "energy x voxel matrix with components chosen from the data (auto) or K "
                                      "components.")


ApiKeyFileOpt = typer.Option(None, "--api-key-file", metavar="FILE",
                             help="For a Tiled URI: file holding the API key (default: $TILED_API_KEY); the key is "
                                  "never printed or logged.")


def use_api_key_file(path) -> None:
    """Apply ``--api-key-file`` (when given) for the Tiled client."""
    if path is not None:
        from ..io.tiled import use_api_key_file as use

        use(path)


def split_references(values) -> tuple:
    """``--references`` values (repeated and/or comma-separated) as a tuple of paths."""
    return tuple(p.strip() for v in (values or ()) for p in str(v).split(",") if p.strip())


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
                gpu = type(exc).__name__ == "OutOfMemoryError"  # CuPy's; numpy raises MemoryError
                msg = f"out of memory: {msg} " + ("(try a smaller volume, --device cpu, or free GPU memory)" if gpu
                                                  else "(try a smaller volume)")
            typer.echo(f"gpureg: error: {msg}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _version(value: bool):
    if value:
        from ..core.version import __version__

        typer.echo(f"gpureg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(verbose: bool = flag(False, "--verbose", "-v", help="Log progress details."),
          version: bool = typer.Option(False, "--version", help="Print the version and exit.", metavar="",
                                       callback=_version, is_eager=True),
          threads: Optional[int] = typer.Option(None, "--threads", min=1,
                                                help="CPU threads of the compiled kernels (default: all cores, or "
                                                     "GPUREG_THREADS).")):
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    if threads is not None:
        from ..core.config import config

        config.set(threads=threads)


INTERRUPTED = 130  # exit code after Ctrl-C (128 + SIGINT), as shells report it


def main(argv=None):
    """Entry point of the ``gpureg`` command.

    Exits (``SystemExit``) with the command's code, like click's standalone mode.
    Usage errors (unknown option, a value that is not one of the choices) are
    one line too: ``gpureg: error: Invalid value for '--model': ...``, exit code 2.
    """
    try:
        rc = app(args=argv, prog_name="gpureg", standalone_mode=False)
    except typer.Abort:
        rc = INTERRUPTED
    except Exception as exc:
        # click's UsageError (typer >= 0.2x vendors click, so it is matched by name, not imported)
        if not any(c.__name__ == "UsageError" for c in type(exc).__mro__):
            raise
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            typer.echo(ctx.get_help())
            raise SystemExit(2) from None
        where = f" (see {ctx.command_path} --help)" if ctx is not None else ""
        typer.echo(f"gpureg: error: {' '.join(exc.format_message().split())}{where}", err=True)
        raise SystemExit(2) from None
    if rc == INTERRUPTED:  # Ctrl-C: click returns (or raises Abort) without a word
        typer.echo("gpureg: interrupted; finished outputs are kept, and `gpureg run` / `gpureg watch` resume "
                   "where they stopped when run again", err=True)
    raise SystemExit(rc or 0)  # as click's standalone mode: main() always exits
