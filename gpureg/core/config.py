"""One configuration for the whole package: CPU backend, threads, GPU solver, GPU use.

``gpureg.config`` is the one object that holds these settings; nothing else in
the package reads them from the environment. The environment variables below
are read **once**, when this module is imported, and give the process-wide
defaults:

=========================  ==========================  =======================================================
variable                   setting                     values (default first)
=========================  ==========================  =======================================================
``GPUREG_CPU_BACKEND``     ``config.cpu_backend``      ``numba`` (compiled, multithreaded) or ``numpy``
                                                       (the readable reference the tests compare against)
``GPUREG_THREADS``         ``config.threads``          unset: all cores; else a positive integer
``GPUREG_GPU_SOLVER``      ``config.solver``           ``device`` (Levenberg-Marquardt on the GPU) or
                                                       ``host`` (NumPy, for comparisons)
``GPUREG_DISABLE_GPU``     ``config.disable_gpu``      unset/``0``: use a GPU when one is usable; ``1``: never
=========================  ==========================  =======================================================

Change them for a block of code (the block's thread, and whatever it hands its
context to) or for the whole process::

    import gpureg
    with gpureg.config(cpu_backend="numpy", threads=1):
        gpureg.register_affine(fixed, moving)
    gpureg.config.set(threads=4)          # process-wide (what ``gpureg --threads 4`` does)
    gpureg.config.threads                 # the value in effect here

The block form is a :mod:`contextvars` variable: a thread started inside the
block does not inherit it by itself, so gpureg submits its own work to
thread pools through :func:`submit` (``contextvars.copy_context().run``), and
ships :func:`Config.get` (a picklable :class:`Settings`) to Dask workers, which
run under ``with config(settings)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from dataclasses import dataclass

__all__ = ["CPU_BACKENDS", "SOLVERS", "Config", "Settings", "config", "getenv", "setenv_default", "submit"]

CPU_BACKENDS = ("numba", "numpy")
SOLVERS = ("device", "host")


@dataclass(frozen=True)
class Settings:
    """The settings in effect (frozen, picklable: what Dask workers are given).

    Attributes
    ----------
    cpu_backend : {"numba", "numpy"}
        CPU kernels: compiled numba (multithreaded) or the NumPy/SciPy reference.
    threads : int or None
        Threads of the compiled CPU kernels (None: all cores).
    solver : {"device", "host"}
        Where the Levenberg-Marquardt steps of a GPU registration run.
    disable_gpu : bool
        Never use a GPU (``device="auto"`` runs on the CPU, ``"gpu"`` is an error).
    """

    cpu_backend: str = "numba"
    threads: int | None = None
    solver: str = "device"
    disable_gpu: bool = False

    def __post_init__(self):
        backend = str(self.cpu_backend).strip().lower()
        if backend not in CPU_BACKENDS:
            raise ValueError(f"cpu_backend must be one of {CPU_BACKENDS}, got {self.cpu_backend!r}")
        object.__setattr__(self, "cpu_backend", backend)
        solver = str(self.solver).strip().lower()
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        object.__setattr__(self, "solver", solver)
        if self.threads is not None:
            if isinstance(self.threads, bool) or int(self.threads) != self.threads or int(self.threads) < 1:
                raise ValueError(f"threads must be a positive integer or None, got {self.threads!r}")
            object.__setattr__(self, "threads", int(self.threads))
        object.__setattr__(self, "disable_gpu", bool(self.disable_gpu))


def _from_environ(environ) -> Settings:
    """The defaults given by the environment (each invalid value named in the error)."""
    out = {}
    for var, key in (("GPUREG_CPU_BACKEND", "cpu_backend"), ("GPUREG_GPU_SOLVER", "solver")):
        value = environ.get(var, "").strip()
        if value:
            out[key] = value
    threads = environ.get("GPUREG_THREADS", "").strip()
    if threads:
        try:
            out["threads"] = int(threads)
        except ValueError:
            raise ValueError(f"GPUREG_THREADS must be a positive integer, got {threads!r}") from None
        if out["threads"] < 1:
            raise ValueError(f"GPUREG_THREADS must be a positive integer, got {threads!r}")
    out["disable_gpu"] = environ.get("GPUREG_DISABLE_GPU", "").strip() not in ("", "0")
    try:
        return Settings(**out)
    except ValueError as exc:
        var = {"cpu_backend": "GPUREG_CPU_BACKEND", "solver": "GPUREG_GPU_SOLVER"}[str(exc).split()[0]]
        raise ValueError(f"{var}: {exc}") from None


try:  # read once, here; an invalid value is reported when the settings are first used
    _PROCESS, _ENV_ERROR = _from_environ(os.environ), None
except ValueError as _exc:
    _PROCESS, _ENV_ERROR = None, str(_exc)
_CURRENT: contextvars.ContextVar = contextvars.ContextVar("gpureg_config", default=None)


class Config:
    """``gpureg.config``: read a setting as an attribute, change settings with a ``with`` block or :meth:`set`.

    See the module docstring for the settings and their environment variables.
    """

    def get(self) -> Settings:
        """The :class:`Settings` in effect in this context."""
        current = _CURRENT.get()
        if current is not None:
            return current
        if _PROCESS is None:
            raise ValueError(_ENV_ERROR)
        return _PROCESS

    def __getattr__(self, name):
        if name in Settings.__dataclass_fields__:
            return getattr(self.get(), name)
        raise AttributeError(f"gpureg.config has no setting {name!r} (settings: {list(Settings.__dataclass_fields__)})")

    @contextlib.contextmanager
    def __call__(self, settings: Settings | None = None, **changes):
        """``with config(threads=2): ...``: the settings changed for this block (this context only).

        Parameters
        ----------
        settings : Settings, optional
            Settings to start from (e.g. the client's, on a Dask worker); default: those in effect.
        **changes
            Settings to change (``cpu_backend``, ``threads``, ``solver``, ``disable_gpu``).
        """
        base = self.get() if settings is None else settings
        token = _CURRENT.set(dataclasses.replace(base, **changes))
        try:
            yield _CURRENT.get()
        finally:
            _CURRENT.reset(token)

    def set(self, **changes) -> Settings:
        """Change the process-wide settings (every thread; a ``with`` block still overrides them); returns them."""
        global _PROCESS, _ENV_ERROR
        base = _PROCESS if _PROCESS is not None else Settings()
        if _PROCESS is None and not set(changes) >= _bad_env_fields():
            raise ValueError(_ENV_ERROR)
        _PROCESS, _ENV_ERROR = dataclasses.replace(base, **changes), None
        return _PROCESS

    def __repr__(self) -> str:
        try:
            return f"gpureg.config: {self.get()}"
        except ValueError as exc:
            return f"gpureg.config: invalid environment ({exc})"

    def __dir__(self):
        return [*Settings.__dataclass_fields__, "get", "set"]


def _bad_env_fields() -> set:
    names = {"GPUREG_CPU_BACKEND": "cpu_backend", "GPUREG_THREADS": "threads", "GPUREG_GPU_SOLVER": "solver"}
    return {key for var, key in names.items() if _ENV_ERROR and _ENV_ERROR.startswith(var)}


config = Config()


def submit(pool, fn, *args, **kwargs):
    """``pool.submit(fn, *args, **kwargs)`` run in a copy of the caller's context (its ``config`` included)."""
    return pool.submit(contextvars.copy_context().run, fn, *args, **kwargs)


def getenv(name: str, default: str | None = None) -> str | None:
    """An environment variable of another program (Qt, a display): the package reads the environment only here."""
    return os.environ.get(name, default)


def setenv_default(name: str, value: str) -> str:
    """Set an environment variable of another program (e.g. ``QT_QPA_PLATFORM``) unless it is set; returns its value."""
    return os.environ.setdefault(name, value)
