"""napari viewer for gpureg results (optional extra ``viewer``).

``open_result(path)`` shows the aligned stack, edge-energy map, labels and the
spectrum of a clicked voxel; ``screenshot(path, png)`` renders headless.
napari and Qt are imported only when a viewer is made, so this package and
``import gpureg`` stay light.
"""

from .app import open_result, pick_voxel, screenshot
from .data import open_file, result_layers, voxel_size_um, voxel_spectrum

__all__ = ["open_file", "open_result", "pick_voxel", "result_layers", "screenshot", "voxel_size_um", "voxel_spectrum"]
