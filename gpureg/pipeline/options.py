"""Settings of a run as one frozen object, and the devices resolved once per run.

:class:`RunOptions` is built once (by the CLI or a Python caller) and carried
unchanged to :func:`gpureg.pipeline.run`, :func:`gpureg.pipeline.watch` and the
Dask workers (it pickles, and round-trips through JSON:
:meth:`RunOptions.to_dict` / :meth:`RunOptions.from_dict`). Choices are
:class:`enum.Enum` s whose values are the strings the CLI and the result file use.

:class:`Devices` says where each stage runs. CuPy (registration, resampling,
XANES) and ASTRA-CUDA (FBP) are probed separately: a machine with CuPy but an
ASTRA build without CUDA registers on the GPU and reconstructs on the CPU.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import warnings
from dataclasses import dataclass, field

from ..core.backend import DEVICES, HARDWARE
from ..core.errors import ParameterError
from ..core.segment import DENOISE
from ..io.results import DEFAULT_COMPRESSION, GREY_STACKS, parse_compression
from ..io.results.nexus import stack_dtype
from ..recon.fbp import FILTERS
from ..register.affine import MODELS
from ..register.prepare import PREP_KEYWORDS, Prep
from ..xanes.edge import METHODS as EDGE_METHODS
from ..xanes.uncertainty import PSF_VOXELS

__all__ = ["Denoise", "Device", "Devices", "EdgeMethod", "FBPFilter", "KEEPABLE", "Model", "parse_center", "parse_keep",
           "resolve_devices", "RunOptions"]

KEEPABLE = GREY_STACKS  # the stacks --keep chooses among (io.results owns the layout)


def _choices(name: str, values, doc: str) -> type[enum.Enum]:
    """A ``str`` :class:`enum.Enum` whose values are ``values`` (the one definition, in the layer that uses them);
    member names are the values with ``-`` as ``_`` (``FBPFilter.ram_lak.value == "ram-lak"``); ``None`` is left out."""
    members = [(v.replace("-", "_"), v) for v in values if v is not None]
    cls = enum.Enum(name, members, type=str, module=__name__, qualname=name)
    cls.__doc__ = doc
    return cls


Device = _choices("Device", DEVICES, "Where to compute: ``auto`` (GPU when usable, else CPU, logged), ``cpu`` or "
                                     "``gpu`` (an error without one) (:data:`gpureg.core.backend.DEVICES`).")
Model = _choices("Model", MODELS, "Registration model (:data:`gpureg.register.affine.MODELS`).")
Denoise = _choices("Denoise", DENOISE, "Filter before binarizing/registering: 3-voxel median (salt-and-pepper noise), "
                                       "impulse (only the saturated salt-and-pepper voxels replaced; faster and "
                                       "unbiased) or Gaussian (sigma 1) (:data:`gpureg.core.segment.DENOISE`).")
EdgeMethod = _choices("EdgeMethod", EDGE_METHODS, "Edge-energy definition: 0.5 crossing of the normalised spectrum, "
                                                  "max of dmu/dE, or both (:data:`gpureg.xanes.edge.METHODS`).")
FBPFilter = _choices("FBPFilter", FILTERS, "FBP filter (:data:`gpureg.recon.fbp.FILTERS`).")


@dataclass(frozen=True)
class Devices:
    """Devices of one run, resolved once: ``"cpu"`` or ``"gpu"`` for each stage.

    Attributes
    ----------
    registration : str
        Binarization, registration, resampling and XANES maps (CuPy).
    fbp : str
        Filtered back-projection (ASTRA-CUDA).
    """

    registration: str = "cpu"
    fbp: str = "cpu"

    def __post_init__(self):
        for name in ("registration", "fbp"):
            if getattr(self, name) not in HARDWARE:
                raise ParameterError(f"Devices.{name} must be one of {HARDWARE}, got {getattr(self, name)!r}")


def resolve_devices(device="auto") -> Devices:
    """Resolve ``"auto" | "cpu" | "gpu"`` for registration (CuPy) and FBP (ASTRA-CUDA) separately.

    ``"auto"`` picks the GPU for each stage whose library can use it and the
    CPU for the other (each fallback logged once). ``"gpu"`` needs both; a
    :class:`~gpureg.core.backend.GPUUnavailableError` names the missing one.
    """
    from ..core.backend import resolve_device
    from ..recon.fbp import fbp_device

    device = getattr(device, "value", device)
    return Devices(registration=resolve_device(device), fbp=fbp_device(device))


@dataclass(frozen=True)
class RunOptions:
    """Every setting of a pipeline run (``gpureg run``, ``watch``, ``demo``, Dask workers).

    Attributes
    ----------
    device : Device
        Where to compute (resolved per stage by :func:`resolve_devices`).
    reference : "highest", "lowest" or float
        Reference energy (eV).
    prep : Prep
        Registration input preparation (binarize, denoise, smooth); applied
        once to the reference, whose Otsu mask also gives the particle labels.
    model : Model
        Registration model.
    center : float, "auto" or None
        Rotation-axis detector column for FBP; ``"auto"``: estimated per energy
        (0/180-degree correlation); None: the detector middle.
    filter : FBPFilter
        FBP filter.
    edge : EdgeMethod
        Edge-energy definition of the XANES maps.
    per_particle : bool
        Also register every particle of the reference on its own.
    deformable : bool
        Refine every affine with a cubic B-spline deformation
        (:func:`gpureg.register.register_deformable`); the grey tomograms are
        resampled through it. With ``per_particle`` the B-spline refines the
        per-particle alignment; with ``scheduler`` the workers register it;
        with given matrices (``watch``) it refines them.
    spacing : float
        Control-point spacing (voxels) of the deformation.
    regularization : float
        Bending-energy weight of the deformation.
    allow_folding : bool
        Accept a deformation whose Jacobian determinant reaches 0 (folding)
        instead of stopping with an error.
    report : bool
        Write the report folder (figures, summary.json, report.md).
    scheduler : str, optional
        Dask distributed scheduler address (energies registered on its workers).
    references : tuple of str
        Reference spectra files (two-column text or Athena .prj): reference
        fractions per voxel (``/xanes/fractions``, ``/xanes/r_factor``).
    clusters : int, optional
        k-means clusters of the normalised voxel spectra (``/xanes/clusters``, centroids).
    denoise_spectra : "auto", int or None
        Spectral denoising before the XANES maps and fits (:mod:`gpureg.xanes.denoise`);
        recorded in ``/xanes`` attributes (``spectral_denoise``).
    psf : float
        Gaussian standard deviation (voxels) of the spatial resolution of the aligned
        stack (FBP and resampling), for the resolution term of ``/xanes/edge_energy_sigma``
        (:data:`gpureg.xanes.uncertainty.PSF_VOXELS`, 0.7, measured on ``gpureg simulate``;
        0: no resolution term). Recorded in the ``/xanes`` attribute ``psf_voxels``.
    reference_column : str, optional
        ``mu`` column of the reference files (:func:`gpureg.xanes.references.read_columns`).
    skip_bad_energies : bool
        Leave out an energy that cannot give a valid volume (all NaN, zero flat
        field), recording it in the result and report, instead of stopping.
    keep : tuple of str
        Stacks kept in the finished result: a subset of ``("recon", "aligned")``
        (both by default; the maps, matrices and report are always kept).
    series_window : int
        After every energy is registered, smooth the transforms along the
        series (:mod:`gpureg.register.consistency`: the affine's linear part,
        each particle's rigid motion relative to it, the B-spline
        coefficients) over this many energies on each side, then resample
        every energy once from its reconstruction; 0 keeps each energy's own
        fit. The maps' error against the simulated truth (48^3, 3 seeds, median
        over the particles): affine 0.15-0.24 eV with 0, 0.12-0.15 eV with 6 (at commit 9c48543).
    align_projections : bool
        Align the projections of every energy before FBP (:func:`gpureg.recon.align_projections`;
        ``/alignment`` in the result). Needs projections; not with ``scheduler``.
    compression : str
        HDF5 codec of the kept stacks, ``NAME[:LEVEL]``
        (:func:`gpureg.io.results.parse_compression`; default Blosc2 Zstandard level 1 + shuffle).
    store_dtype : str
        ``"float32"`` (exact) or ``"float16"`` (lossy, half the size): how ``/recon`` and
        ``/aligned`` are stored. The maps are computed from the stored stack, so float16 moves
        them slightly (measured in README "Result files").
    allow_limited_angles : bool
        Reconstruct projections with too few angles for the detector width or
        under 180 degrees (a warning instead of an error; see :func:`gpureg.io.base.check_angles`).
    """

    device: Device = Device.auto
    reference: str | float = "highest"
    prep: Prep = field(default_factory=Prep)
    model: Model = Model.affine
    center: float | str | None = None
    filter: FBPFilter = FBPFilter.ram_lak
    edge: EdgeMethod = EdgeMethod.half
    per_particle: bool = False
    deformable: bool = False
    spacing: float = 8.0
    regularization: float = 2.0
    allow_folding: bool = False
    report: bool = True
    scheduler: str | None = None
    references: tuple = ()
    clusters: int | None = None
    denoise_spectra: str | int | None = None
    psf: float = PSF_VOXELS
    reference_column: str | None = None
    skip_bad_energies: bool = False
    keep: tuple = KEEPABLE
    series_window: int = 6
    align_projections: bool = False
    compression: str = DEFAULT_COMPRESSION
    store_dtype: str = "float32"
    allow_limited_angles: bool = False

    def __post_init__(self):
        for name, kind in (("device", Device), ("model", Model), ("filter", FBPFilter), ("edge", EdgeMethod)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, kind(getattr(value, "value", value)))
            except ValueError:
                raise ParameterError(f"{name} must be one of {[k.value for k in kind]}, got {value!r}") from None
        if isinstance(self.prep, dict):
            object.__setattr__(self, "prep", Prep.from_dict(self.prep))
        if not isinstance(self.prep, Prep):
            raise TypeError(f"prep must be a gpureg.register.Prep, got {type(self.prep).__name__}")
        object.__setattr__(self, "reference", _reference(self.reference))
        object.__setattr__(self, "center", parse_center(self.center))
        object.__setattr__(self, "per_particle", bool(self.per_particle))
        object.__setattr__(self, "report", bool(self.report))
        object.__setattr__(self, "references", tuple(str(r) for r in (self.references or ())))
        if self.clusters is not None and (isinstance(self.clusters, bool) or int(self.clusters) != self.clusters
                                          or int(self.clusters) < 2):
            raise ParameterError(f"clusters must be an integer >= 2, got {self.clusters!r}")
        if self.clusters is not None:
            object.__setattr__(self, "clusters", int(self.clusters))
        object.__setattr__(self, "skip_bad_energies", bool(self.skip_bad_energies))
        from ..xanes.denoise import parse_denoise

        object.__setattr__(self, "denoise_spectra", parse_denoise(self.denoise_spectra))
        try:
            psf = None if isinstance(self.psf, bool) else float(self.psf)
        except (TypeError, ValueError):
            psf = None
        if psf is None or not (math.isfinite(psf) and psf >= 0):
            raise ParameterError(f"psf must be a finite width >= 0 voxels, got {self.psf!r}")
        object.__setattr__(self, "psf", psf)
        if self.reference_column is not None:
            object.__setattr__(self, "reference_column", str(self.reference_column))
        object.__setattr__(self, "allow_limited_angles", bool(self.allow_limited_angles))
        object.__setattr__(self, "keep", parse_keep(self.keep))
        name, level = parse_compression(self.compression)
        object.__setattr__(self, "compression", name if level is None else f"{name}:{level}")
        stack_dtype(self.store_dtype)
        object.__setattr__(self, "store_dtype", str(self.store_dtype))
        if isinstance(self.series_window, bool) or int(self.series_window) != self.series_window \
                or int(self.series_window) < 0:
            raise ValueError(f"series_window must be an integer >= 0 energies, got {self.series_window!r}")
        object.__setattr__(self, "series_window", int(self.series_window))
        object.__setattr__(self, "deformable", bool(self.deformable))
        object.__setattr__(self, "allow_folding", bool(self.allow_folding))
        if not (math.isfinite(float(self.spacing)) and float(self.spacing) >= 3):
            raise ParameterError(f"spacing must be at least 3 voxels, got {self.spacing!r}")
        if not (math.isfinite(float(self.regularization)) and float(self.regularization) >= 0):
            raise ParameterError(f"regularization must be >= 0, got {self.regularization!r}")
        object.__setattr__(self, "spacing", float(self.spacing))
        object.__setattr__(self, "regularization", float(self.regularization))
        object.__setattr__(self, "align_projections", bool(self.align_projections))
        if self.align_projections and self.scheduler:
            raise ParameterError("align_projections=True runs on one machine: not with scheduler=")
        if self.per_particle and self.scheduler:
            raise ParameterError("per_particle registration runs on one machine and registers: not with scheduler or matrices")

    def replace(self, **changes) -> RunOptions:
        """A copy with some settings changed (``opts.replace(prep=Prep(binarize=False))``).

        ``binarize=``, ``denoise=``, ``smooth=``, ``ramp=`` (deprecated) change those of ``prep``.
        """
        prep = {k: changes.pop(k) for k in PREP_KEYWORDS if k in changes}
        if prep:
            warnings.warn(f"RunOptions.replace: {', '.join(prep)} are deprecated; pass prep=dataclasses.replace("
                          f"options.prep, ...) instead", DeprecationWarning, stacklevel=2)
            changes["prep"] = dataclasses.replace(changes.get("prep", self.prep), **prep)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain JSON-able dict (enum values as strings); :meth:`from_dict` reads it back."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out = {k: getattr(v, "value", v) for k, v in out.items()}
        out["prep"] = self.prep.to_dict()
        return out

    @classmethod
    def from_dict(cls, d: dict) -> RunOptions:
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> RunOptions:
        return cls.from_dict(json.loads(text))

    def parameters(self, devices: Devices, matrices=None) -> dict:
        """The result file's ``parameters`` (JSON): what decides its content (not ``report``, ``scheduler``,
        ``skip_bad_energies``, ``keep``, ``compression``, ``allow_limited_angles``).

        A run resumes an interrupted one only when these are equal (so a run
        stopped by a bad energy resumes with ``skip_bad_energies``).
        """
        out = self.to_dict()
        for key in ("report", "scheduler", "skip_bad_energies", "keep", "compression", "allow_limited_angles"):
            out.pop(key)
        if out["store_dtype"] == "float32":  # absent when exact: results of earlier versions resume
            out.pop("store_dtype")
        out["references"] = list(out["references"])
        for key, default in (("references", []), ("clusters", None), ("align_projections", False),
                             ("denoise_spectra", None), ("reference_column", None), ("psf", PSF_VOXELS)):
            # absent when unused: results unchanged
            if out[key] == default:
                out.pop(key)
        out.update(device=devices.registration, fbp_device=devices.fbp, matrices=matrices)
        return out


def parse_keep(keep) -> tuple:
    """The stacks to keep: a subset of ``("recon", "aligned")`` from a tuple or ``"recon,aligned"`` text."""
    if isinstance(keep, str):
        keep = [k.strip() for k in keep.split(",") if k.strip() and k.strip() != "none"]
    unknown = set(keep) - set(KEEPABLE)
    if unknown:
        raise ParameterError(f"keep must name some of {list(KEEPABLE)}, got {sorted(unknown)}")
    return tuple(k for k in KEEPABLE if k in set(keep))


def parse_center(center):
    """FBP rotation-axis centre: None (detector middle), ``"auto"`` (estimated) or a finite column (from text too)."""
    if center is None:
        return None
    if isinstance(center, str):
        if center.strip().lower() == "auto":
            return "auto"
        try:
            center = float(center)
        except ValueError:
            raise ParameterError(f"center must be a detector column, 'auto' or None, got {center!r}") from None
    value = float(center)
    if not math.isfinite(value):
        raise ParameterError(f"center must be a finite detector column, got {center!r}")
    return value


def _reference(ref):
    if isinstance(ref, str) and ref in ("highest", "lowest"):
        return ref
    try:
        value = float(ref)
    except (TypeError, ValueError):
        raise ParameterError(f"reference must be 'highest', 'lowest' or an energy in eV, got {ref!r}") from None
    if not math.isfinite(value):
        raise ParameterError(f"reference energy must be finite, got {ref!r}")
    return value
