"""napari plugin (npe2) commands: the reader for result files and the spectrum widget.

Declared in ``napari.yaml`` beside this module, found by napari through the
``napari.manifest`` entry point, so ``napari RESULT.h5`` opens the same
layers as :func:`gpureg.viewer.open_result`; the spectrum dock comes from the
Plugins menu ("gpureg: voxel spectrum").
"""

from __future__ import annotations

import logging
from pathlib import Path

from .data import open_file, result_layers

__all__ = ["get_reader", "read_result"]

_log = logging.getLogger("gpureg")


def get_reader(path):
    """The reader function for ``path`` when it is a gpureg result, else None (napari tries other readers)."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    try:
        open_file(path).close()
    except (OSError, ValueError) as exc:
        _log.debug("gpureg reader: %s is not a gpureg result (%s)", path, exc)
        return None
    return read_result


def read_result(path):
    """Layer data tuples of a result (the file stays open while the layers use it)."""
    if isinstance(path, (list, tuple)):
        path = path[0]
    return result_layers(open_file(Path(path)))
