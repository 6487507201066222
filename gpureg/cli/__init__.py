"""Command-line interface (typer): a thin adapter over the public API."""

from . import admin, pipeline_cmds, tools  # noqa: F401 - each registers its commands on ``app``
from .app import app, main

__all__ = ["app", "main"]
