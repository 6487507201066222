"""The ``gpureg`` typer application: error handling, ``--version``/``--verbose``, shared options.

Every command turns what users cause (the ``GpuregError`` family: bad input, missing GPU,
unwritable output) into one line on stderr and exit code 2, never a traceback; anything
else is a bug: one line and exit code 1, the traceback under ``--verbose``. Commands
live in :mod:`~gpureg.cli.pipeline_cmds` (run, demo, watch),
:mod:`~gpureg.cli.tools` (register, xanes, plot, recon, simulate) and
:mod:`~gpureg.cli.admin` (info, bench, validate); one option name means one
choice in all of them (defined here).
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import traceback
import warnings
from typing import Optional

import typer

from ..pipeline.options import Device, EdgeMethod, FBPFilter, Model
from ..xanes.uncertainty import PSF_VOXELS

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


PsfOpt = typer.Option(PSF_VOXELS, "--psf", min=0.0, metavar="VOXELS",
                      help="Spatial resolution of the aligned stack (Gaussian sigma, voxels) for the resolution term "
                           f"of the edge-energy uncertainty map; {PSF_VOXELS} is measured on gpureg simulate, 0 leaves it "
                           "out.")


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


# Library messages name parameters (``overwrite=True``, ``reference=``); the CLI names its flags instead.
_FLAGS = ("align_projections", "allow_folding", "allow_limited_angles", "clusters", "dataset", "deformable",
          "denoise_spectra", "device", "energy_dataset", "keep", "overwrite", "per_particle", "psf", "reference",
          "references",
          "regularization", "scheduler", "skip_bad_energies", "spacing")
_PARAM_RE = re.compile(r"\b(" + "|".join(_FLAGS) + r")=(True\b|\"[^\"]*\"|'[^']*'|[\w.]+)?")


def cli_message(message: str) -> str:
    """A library message in the CLI's words: ``overwrite=True`` -> ``--overwrite``, ``device="cpu"`` -> ``--device cpu``."""

    def flag(m):
        name, value = "--" + m.group(1).replace("_", "-"), m.group(2)
        return name if value in (None, "True") else f"{name} {value.strip(chr(34) + chr(39))}"

    return _PARAM_RE.sub(flag, message)


def friendly(fn):
    """Decorator: what users cause becomes one line and exit code 2; anything else (a bug) one line and exit 1.

    User-caused: the :class:`~gpureg.core.errors.GpuregError` family (bad input, output, parameter, missing GPU,
    too little memory), ``OSError`` from the system (a file that cannot be read or written, a full disk) and
    running out of memory. Anything else is a bug: one line, "run with --verbose for the traceback", exit 1;
    under ``--verbose`` the traceback is printed.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from ..core.errors import GpuregError

        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt as exc:  # SIGINT / SIGTERM: main() says so in one line
            raise typer.Exit(getattr(exc, "exit_code", INTERRUPTED)) from None
        except (typer.Exit, typer.Abort):
            raise
        except (GpuregError, OSError, MemoryError) as exc:
            typer.echo(f"gpureg: error: {cli_message(_first_line(exc))}", err=True)
            raise typer.Exit(USER_ERROR) from None
        except Exception as exc:
            if any(c.__name__ == "ClickException" for c in type(exc).__mro__):  # typer.BadParameter...: main() says it
                raise
            if type(exc).__name__ == "OutOfMemoryError":  # CuPy's (not importable without CuPy)
                typer.echo(f"gpureg: error: out of memory: {_first_line(exc)} (try a smaller volume, --device cpu, "
                           "or free GPU memory)", err=True)
                raise typer.Exit(USER_ERROR) from None
            if _VERBOSE["on"]:
                traceback.print_exc()
                typer.echo(f"gpureg: internal error: {type(exc).__name__}: {_first_line(exc)}", err=True)
            else:
                typer.echo(f"gpureg: internal error: {type(exc).__name__}: {_first_line(exc)} "
                           "(run with --verbose for the traceback)", err=True)
            raise typer.Exit(BUG) from None

    return wrapper


_VERBOSE = {"on": False}  # --verbose of the command being run
USER_ERROR = 2  # exit code of an error the user can fix (and of usage errors, as click)
BUG = 1  # exit code of an internal error


def _first_line(exc) -> str:
    msg = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, MemoryError):
        msg = f"out of memory: {msg} (try a smaller volume)"
    return msg


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
    _VERBOSE["on"] = verbose
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")  # other libraries
    logging.getLogger("gpureg").setLevel(logging.INFO if verbose else logging.WARNING)
    if threads is not None:
        from ..core.config import config

        config.set(threads=threads)


INTERRUPTED = 130  # exit code after Ctrl-C (128 + SIGINT), as shells report it
TERMINATED = 143   # after SIGTERM (batch schedulers)


def main(argv=None):
    """Entry point of the ``gpureg`` command.

    Exits (``SystemExit``) with the command's code, like click's standalone mode.
    Usage errors (unknown option, a value that is not one of the choices) are
    one line too: ``gpureg: error: Invalid value for '--model': ...``, exit code 2.
    """
    log = logging.getLogger("gpureg")  # gpureg's lines go to the current stderr, also when main() runs in-process
    saved, handler = (log.level, log.propagate), _Stderr()
    log.addHandler(handler)
    log.propagate = False
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            _main(argv)
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]


def _main(argv):
    from ..core import signals

    command_line = argv is None  # the `gpureg` command itself (not a call from Python)
    interrupted = ("gpureg: interrupted ({name}); finished outputs are kept, and `gpureg run` / `gpureg watch` "
                   "resume where they stopped when run again")
    signalled = None
    try:
        with signals.handled(then_exit=interrupted if command_line else None):
            try:
                rc = app(args=argv, prog_name="gpureg", standalone_mode=False)
            except (typer.Abort, KeyboardInterrupt):
                rc = INTERRUPTED
            signalled = signals.received()
            if signalled is not None:  # never exit 0 after a signal, even one Python swallowed
                rc = 128 + signalled
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
    if rc in (INTERRUPTED, TERMINATED):  # click returns (or raises Abort) without a word
        typer.echo(interrupted.format(name=signals.signal_name(rc - 128)), err=True)
        if command_line and signalled is not None:
            signals.exit_now(rc)  # outputs closed, lock released: stop now, not after a second of teardown
    raise SystemExit(rc or 0)  # as click's standalone mode: main() always exits


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """A warning as one line, ``gpureg: warning: ...``; under ``--verbose`` Python's form (where it was raised)."""
    if _VERBOSE["on"]:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))
    else:
        sys.stderr.write(f"gpureg: warning: {' '.join(str(message).split())}\n")


class _Stderr(logging.StreamHandler):
    """``%(message)s`` lines, in the CLI's words (:func:`cli_message`), to whatever ``sys.stderr`` is when a record
    is emitted."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))

    def format(self, record):  # library lines name parameters; on the command line they are flags
        return cli_message(super().format(record))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):  # StreamHandler.__init__ sets it; the current sys.stderr is used instead
        pass
