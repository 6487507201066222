"""Command-line interface (typer): a thin adapter over the public API."""

from .app import app, main

__all__ = ["app", "main"]
