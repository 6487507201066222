"""Open a gpureg result in napari: layers, the energy read-out in eV, the spectrum dock, screenshots.

napari and Qt are imported inside the functions, so importing this module is
cheap and ``import gpureg`` never pulls in Qt.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np

from ..core.config import getenv, setenv_default
from ..core.errors import DependencyError
from .data import open_file, result_layers

__all__ = ["attach", "check_opengl", "open_result", "pick_voxel", "require_napari", "screenshot"]

_log = logging.getLogger("gpureg")


def require_napari():
    """Import napari, or raise ImportError with the install command."""
    try:
        import napari
    except ImportError as exc:
        raise ImportError(f"the viewer needs napari and a Qt binding: pip install 'gpureg[viewer]' ({exc})") from None
    # gpureg[viewer] installs PyQt5, with which napari warns at every window that only Qt6 detects the system theme
    warnings.filterwarnings("ignore", message="System theme detection requires a Qt6 backend", category=UserWarning)
    return napari


def open_result(path, viewer=None, show: bool = True):
    """Show a gpureg result in napari.

    Layers (each when the file has it): ``aligned`` (energy, z, y, x) with
    the current energy shown in eV beside the slider and in the corner;
    ``recon`` and ``aligned (global)`` (hidden); ``edge energy (eV)``
    (viridis, contrast from the 2nd-98th percentile of valid voxels);
    ``labels`` and ``clusters`` (hidden); ``fraction <reference>`` (hidden).
    A dock widget plots the spectrum of the clicked voxel and the
    registration MSE per energy. Data are read lazily (see
    :mod:`gpureg.viewer.data`); the file stays open while the layers live.

    Parameters
    ----------
    path : str or Path
        Pipeline result or ``gpureg xanes`` output.
    viewer : napari.Viewer, optional
        Add to this viewer instead of a new one.
    show : bool
        Show the window (False for scripts, tests and screenshots).

    Returns
    -------
    napari.Viewer
        Its ``window.gpureg_spectrum`` attribute is the spectrum widget.
    """
    napari = require_napari()
    result = open_file(path)
    try:
        tuples = result_layers(result)
        if viewer is None:
            check_opengl()
            viewer = napari.Viewer(title=f"gpureg: {Path(path).name}", show=show)
        layers = [getattr(viewer, f"add_{kind}")(data, **kw) for data, kw, kind in tuples]
    except Exception:
        result.close()
        raise
    attach(viewer, result, layers)
    return viewer


def attach(viewer, result, layers, *, dock: bool = True):
    """Energy read-out in eV, scale bar and the spectrum dock for gpureg ``layers`` already in ``viewer``.

    Used by :func:`open_result` and (with ``dock=False``: napari docks what a
    widget command returns) by the napari plugin's widget command.

    Returns
    -------
    SpectrumWidget or None
        None when no layer has an energy stack to read spectra from (maps only, as
        ``gpureg xanes`` writes them: no dock) or no map to pick voxels on.
    """
    from .widget import SpectrumWidget, base_layers, decorate

    stack, base = base_layers(layers)
    if dock:
        viewer.window.gpureg_spectrum = None
    if base is None:
        return None
    if stack is None:
        decorate(viewer, layers, stack)
        return None
    widget = SpectrumWidget(viewer, result, base)  # adds the "picked voxel" layer: before the energy read-out
    decorate(viewer, layers, stack)
    if dock:
        viewer.window.add_dock_widget(widget, name="gpureg spectrum", area="right")
        viewer.window.gpureg_spectrum = widget
    return widget


def pick_voxel(result):
    """A representative voxel ``(z, y, x)``: the valid edge-energy voxel deepest inside the valid region.

    Reads the middle z plane of ``/xanes/mask`` (or of finite
    ``/xanes/edge_energy``), moving outwards plane by plane until one has a
    valid voxel; the volume centre when there is none.
    """
    g, stack = result.maps(), result.stack("aligned")
    shape = stack.shape[1:] if stack is not None else g["edge_energy"].shape
    if g is None:
        return tuple(n // 2 for n in shape)
    nz = shape[0]
    for dz in range(nz):
        for z in {nz // 2 + dz, nz // 2 - dz}:
            if not 0 <= z < nz:
                continue
            ok = np.isfinite(np.asarray(g["edge_energy"][z], dtype=np.float64))
            if "mask" in g:
                ok &= np.asarray(g["mask"][z], dtype=bool)
            if ok.any():
                from scipy.ndimage import distance_transform_edt

                yy, xx = np.unravel_index(int(np.argmax(distance_transform_edt(ok))), ok.shape)
                return int(z), int(yy), int(xx)
    return tuple(n // 2 for n in shape)


def screenshot(path, png, *, size=(1500, 900), voxel=None):
    """Render a result headless to a PNG (window with layer list and spectrum dock) and close the viewer.

    Sets ``QT_QPA_PLATFORM=offscreen`` unless a platform is already chosen.
    OpenGL still needs a display server; without one (no ``DISPLAY``) run
    under ``xvfb-run``.

    Parameters
    ----------
    path : str or Path
        Result file.
    png : str or Path
        Output image.
    size : (int, int)
        Window size in pixels (width, height).
    voxel : (int, int, int), optional
        Voxel whose spectrum the dock shows, and whose z plane is drawn
        (default :func:`pick_voxel`).

    Returns
    -------
    Path
    """
    setenv_default("QT_QPA_PLATFORM", "offscreen")
    out = Path(png)
    viewer = open_result(path, show=False)
    try:
        widget = viewer.window.gpureg_spectrum
        if widget is not None:
            idx = tuple(voxel) if voxel is not None else pick_voxel(widget.result)
            axis_z = viewer.dims.ndim - 3
            viewer.dims.set_current_step(axis_z, idx[0])
            widget.show_voxel(idx)
            widget.canvas.draw()
        from napari.qt import get_qapp

        win = viewer.window._qt_window
        win.resize(*size)
        win.grab()  # a hidden window lays out (and tells the canvas its size) only when rendered
        get_qapp().processEvents()
        viewer.reset_view()
        out.parent.mkdir(parents=True, exist_ok=True)
        # the whole window: with llvmpipe (Xvfb) the canvas-only render of a hidden viewer comes out without images
        viewer.screenshot(str(out), canvas_only=False)
    finally:
        viewer.close()
    return out


# --------------------------------------------------------------------------- helpers

def check_opengl():
    """Raise RuntimeError with a fix when Qt cannot create an OpenGL context (napari would crash later)."""
    from napari.qt import get_qapp
    from qtpy.QtGui import QOffscreenSurface, QOpenGLContext

    get_qapp()
    ctx, surface = QOpenGLContext(), QOffscreenSurface()
    surface.create()
    if not (ctx.create() and ctx.makeCurrent(surface)):
        platform = getenv("QT_QPA_PLATFORM", "default")
        raise DependencyError(f"no OpenGL context (Qt platform {platform}, DISPLAY={getenv('DISPLAY', 'unset')}): "
                           "the viewer needs a display; headless, run under xvfb-run (Debian package xvfb)")
    ctx.doneCurrent()
