"""The pipeline: streaming resumable run, watch mode, Dask scheduling, the report, the single-stage file workflows
(``recon``, ``xanes``); one RunOptions for all."""

from .distributed import register_energies_dask
from .files import map_xanes_file, reconstruct_file
from .options import Denoise, Device, Devices, EdgeMethod, FBPFilter, Model, RunOptions, resolve_devices
from .report import PipelineResult, write_report
from .runner import file_checksum, run
from .watch import WatchState, rereference, watch_folder

__all__ = ["Denoise", "Device", "Devices", "EdgeMethod", "FBPFilter", "file_checksum", "map_xanes_file", "Model", "PipelineResult", "reconstruct_file",
           "register_energies_dask", "rereference", "resolve_devices", "run", "RunOptions", "watch_folder",
           "WatchState", "write_report"]
