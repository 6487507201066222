"""The pipeline: streaming resumable run, watch mode, Dask scheduling, the report; one RunOptions for all."""

from ..io.results import report_dir_for
from ..register.prepare import Prep
from .distributed import register_energies_dask
from .options import Denoise, Device, Devices, EdgeMethod, FBPFilter, Model, RunOptions, resolve_devices
from .report import PipelineResult, write_report
from .runner import file_checksum, run
from .watch import WatchState, rereference, watch

__all__ = ["Denoise", "Device", "Devices", "EdgeMethod", "FBPFilter", "file_checksum", "Model", "PipelineResult", "Prep",
           "register_energies_dask", "report_dir_for", "rereference", "resolve_devices", "run", "RunOptions", "watch",
           "WatchState", "write_report"]
