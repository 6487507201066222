"""The pipeline: streaming resumable run, watch mode, Dask scheduling and the report."""

from .distributed import register_energies_dask
from .report import PipelineResult, report_dir_for, write_report
from .runner import file_checksum, reference_prep, run
from .watch import WatchState, rereference, watch

__all__ = ["file_checksum", "PipelineResult", "reference_prep", "register_energies_dask", "report_dir_for", "rereference", "run", "watch", "WatchState", "write_report"]
