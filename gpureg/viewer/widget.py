"""The spectrum dock widget: one voxel's normalised spectrum and the registration MSE per energy.

Imports Qt (through qtpy, as napari does) and matplotlib's Qt canvas at module
level, so only :mod:`gpureg.viewer.app` imports this module, inside functions.
"""

from __future__ import annotations

import logging

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QCheckBox, QLabel, QVBoxLayout, QWidget

from ..core.errors import InputError
from .data import open_file, registration_mse, voxel_spectrum

__all__ = ["SpectrumDock", "SpectrumWidget", "base_layers", "decorate", "overlay"]

_log = logging.getLogger("gpureg")

_HOVER_MS = 150  # cursor must rest this long before a spectrum is read (a read touches every energy)


def base_layers(layers):
    """``(stack, base)``: the gpureg energy stack (or None) and the layer voxels are picked on (or None)."""
    stack = next((ly for ly in layers if ly.ndim == 4 and "energy" in (ly.metadata or {})), None)
    base = stack or next((ly for ly in layers if ly.ndim == 3), None)
    return stack, base


def decorate(viewer, layers, stack):
    """Scale bar (when the voxel size is known), energy read-out in eV, edge-energy colour bar."""
    meta = (stack or layers[0]).metadata or {}
    overlay(viewer, "scale_bar").visible = meta.get("voxel_size_um") is not None
    if stack is not None and meta.get("energy") is not None:
        energy_readout(viewer, stack, np.asarray(meta["energy"]))
    for ly in layers:
        if ly.name == "edge energy (eV)":
            ly.colorbar.visible = True
            viewer.layers.selection.active = ly


def overlay(viewer, name):
    """The canvas overlay ``name`` ("text", "scale_bar"): ``viewer.canvas.overlays`` (napari >= 0.9) or the old attribute."""
    canvas = getattr(viewer, "canvas", None)
    overlays = getattr(canvas, "overlays", None)
    if overlays is not None and hasattr(overlays, name):
        return getattr(overlays, name)
    return getattr(viewer, f"{name}_overlay" if name == "text" else name)


def energy_readout(viewer, stack, energy):
    """Show the current energy (eV) as the slider's label and in the top-left corner."""
    def update(event=None):
        axis = viewer.dims.ndim - stack.ndim  # the stack's first axis in world dimensions
        k = int(viewer.dims.current_step[axis])
        if not 0 <= k < energy.size:
            return
        label = f"{energy[k]:.1f} eV"
        for ly in viewer.layers:  # napari derives the slider labels from the layers' labels
            if ly.ndim == 4 and (ly.metadata or {}).get("energy") is not None and ly.axis_labels[0] != label:
                ly.axis_labels = (label, *ly.axis_labels[1:])
        labels = list(viewer.dims.axis_labels)
        if labels[axis] != label:
            labels[axis] = label
            viewer.dims.axis_labels = labels
        text.text = f"E = {energy[k]:.1f} eV ({k + 1}/{energy.size})"

    text = overlay(viewer, "text")
    text.visible = True
    text.position = "top_left"
    viewer.dims.events.current_step.connect(update)
    viewer.layers.events.inserted.connect(update)  # a new layer resets the axis labels
    update()


class SpectrumWidget(QWidget):
    """Spectrum of the voxel clicked (or, with "follow cursor", under the cursor).

    Parameters
    ----------
    viewer : napari.Viewer
    result : gpureg.io.results.ResultFile
        The open result the viewer's layers read from.
    layer : napari.layers.Layer
        The layer whose data coordinates define the voxel (``aligned``, or the
        first gpureg layer); its last three axes are ``(z, y, x)``.
    """

    def __init__(self, viewer, result, layer, parent=None):
        super().__init__(parent)
        self.viewer, self.result, self.layer = viewer, result, layer
        self.spectrum = None
        self.figure = Figure(figsize=(4.2, 5.0), dpi=90, layout="constrained")
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.ax_mu, self.ax_mse = self.figure.subplots(2, 1, height_ratios=(3, 2))
        self.label = QLabel("click a voxel to see its spectrum")
        self.follow = QCheckBox("follow cursor")
        layout = QVBoxLayout(self)
        layout.addWidget(self.label)
        layout.addWidget(self.follow)
        layout.addWidget(self.canvas)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self._pick_cursor)
        viewer.mouse_drag_callbacks.append(self._on_press)
        viewer.cursor.events.position.connect(self._on_move)
        viewer.dims.events.current_step.connect(self._mark_energy)
        self._energy_line = None
        selected = viewer.layers.selection.active
        self.marker = viewer.add_points(np.empty((0, 3)), name="picked voxel", scale=tuple(layer.scale[-3:]),
                                        units=tuple(layer.units[-3:]), axis_labels=("z", "y", "x"), symbol="cross",
                                        size=3, face_color="red", border_width=0, out_of_slice_display=False)
        viewer.layers.selection.active = selected  # keep the user's layer controls
        self._draw_mse(registration_mse(result))

    def voxel_at(self, position):
        """Voxel ``(z, y, x)`` of ``self.layer`` at a world position, or None outside the volume."""
        data = np.asarray(self.layer.world_to_data(position), dtype=np.float64)[-3:]
        idx = tuple(round(float(v)) for v in data)
        shape = self.layer.data.shape[-3:]
        return idx if all(0 <= i < n for i, n in zip(idx, shape)) else None

    def show_voxel(self, index) -> dict:
        """Read and plot the spectrum of voxel ``(z, y, x)``; returns :func:`voxel_spectrum`'s dict."""
        spec = voxel_spectrum(self.result, index)
        self.spectrum = spec
        ax = self.ax_mu
        ax.clear()
        e = spec["energy"]
        norm_ok = np.isfinite(spec["norm"]).any()
        y = spec["norm"] if norm_ok else spec["mu"]
        ax.plot(e, y, "o-", ms=3, lw=1.2, color="k", label="normalised mu" if norm_ok else "mu (not normalisable)")
        if spec["fit"] is not None:
            ax.plot(e, spec["fit"], "-", lw=1.5, color="tab:red", label="fit")
            for name, comp in spec["components"].items():
                ax.plot(e, comp, "--", lw=0.8, label=name)
        if np.isfinite(spec["edge_energy"]):
            ax.axvline(spec["edge_energy"], color="tab:blue", lw=1,
                       label=f"edge {spec['edge_energy']:.1f} eV")
            if norm_ok:
                ax.axhline(0.5, color="0.7", lw=0.6)
        ax.set_xlabel("energy (eV)")
        ax.set_ylabel("normalised mu" if norm_ok else spec["dataset"])
        z, yy, x = spec["index"]
        ax.set_title(f"voxel z={z} y={yy} x={x}", fontsize=9)
        ax.legend(fontsize=7, loc="best")
        self.label.setText(f"voxel (z, y, x) = {spec['index']}")
        self._mark_voxel(spec["index"])
        self._draw_mse(spec)
        return spec

    # ------------------------------------------------------------------ events

    def _on_press(self, viewer, event):
        if event.type != "mouse_press":
            return
        start = np.asarray(event.position, dtype=float)
        moved = False
        yield
        while event.type == "mouse_move":
            moved = moved or np.abs(np.asarray(event.position, dtype=float) - start).max() > 0.5
            yield
        if not moved:
            idx = self.voxel_at(start)
            if idx is not None:
                self.show_voxel(idx)

    def _on_move(self, event=None):
        if self.follow.isChecked():
            self._timer.start(_HOVER_MS)

    def _pick_cursor(self):
        idx = self.voxel_at(self.viewer.cursor.position)
        if idx is not None and (self.spectrum is None or idx != self.spectrum["index"]):
            self.show_voxel(idx)

    def _mark_voxel(self, index):
        """A cross on the picked voxel (layer ``picked voxel``, drawn on its z plane only)."""
        self.marker.data = np.asarray([index], dtype=np.float64)

    def _draw_mse(self, spec):
        ax = self.ax_mse
        ax.clear()
        self._energy_line = None
        if spec is None or spec.get("mse_before") is None:
            ax.text(0.5, 0.5, "no registration MSE in this result", ha="center", va="center", transform=ax.transAxes,
                    fontsize=8)
            ax.set_axis_off()
        else:
            ax.set_axis_on()
            e = spec["energy"]
            ax.semilogy(e, spec["mse_before"], "o-", ms=2, lw=1, color="0.5", label="before")
            ax.semilogy(e, spec["mse_after"], "o-", ms=2, lw=1, color="tab:green", label="after")
            ax.set_xlabel("energy (eV)")
            ax.set_ylabel("registration MSE")
            ax.legend(fontsize=7)
            self._mark_energy()
        self.canvas.draw_idle()

    def _mark_energy(self, event=None):
        energy = (self.layer.metadata or {}).get("energy")
        if energy is None or self.ax_mse.get_legend() is None or self.layer.ndim != 4:
            return
        step = self.viewer.dims.current_step
        axis = self.viewer.dims.ndim - 4  # the energy axis of a 4D layer
        k = int(step[axis]) if 0 <= axis < len(step) else 0
        if not 0 <= k < len(energy):
            return
        if self._energy_line is not None:
            self._energy_line.remove()
        self._energy_line = self.ax_mse.axvline(energy[k], color="tab:orange", lw=1)
        self.canvas.draw_idle()


class SpectrumDock(SpectrumWidget):
    """The napari plugin's dock ("gpureg: voxel spectrum") for a result opened with ``napari RESULT.h5``.

    napari passes the viewer as ``napari_viewer``; the result is the file
    named in the gpureg layers' metadata (reopened read-only).
    """

    def __init__(self, napari_viewer, parent=None):
        layers = [ly for ly in napari_viewer.layers if "gpureg_result" in (ly.metadata or {})]
        if not layers:
            raise InputError("no gpureg result is open in this viewer: open a RESULT.h5 first")
        path = layers[0].metadata["gpureg_result"]
        layers = [ly for ly in layers if ly.metadata["gpureg_result"] == path]
        stack, base = base_layers(layers)
        if base is None:
            raise InputError(f"{path}: no energy stack or map to pick voxels on")
        super().__init__(napari_viewer, open_file(path), base, parent)
        decorate(napari_viewer, layers, stack)
