"""The napari viewer (issue 19): layers, the voxel spectrum, laziness, screenshots, the npe2 reader.

The layer data and spectra (``gpureg.viewer.data``) need no napari and always
run. The Qt tests skip cleanly when napari is not installed (extra
``viewer``) or no OpenGL context can be made; headless, they use
``QT_QPA_PLATFORM=offscreen`` and, when ``DISPLAY`` is unset and ``Xvfb`` is
on the PATH, start their own Xvfb (Qt5's offscreen platform gets OpenGL only
through an X server).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess

import h5py
import numpy as np
import pytest

from gpureg.io.results import write_result_file
from gpureg.viewer import open_file, result_layers, voxel_size_um, voxel_spectrum
from gpureg.viewer.data import registration_mse
from gpureg.xanes import normalize, synthetic_spectra

SHAPE = (12, 16, 20)  # (z, y, x), all different so a swapped axis shows
E = np.concatenate([np.arange(6500.0, 6540.0, 10.0), np.arange(6540.0, 6570.0, 2.0), np.arange(6570.0, 6660.0, 15.0)])


def _make_result(path, *, voxel_nm=250.0, fractions=True):
    """A small pipeline-like result, energies stored in *decreasing* order (the viewer sorts them)."""
    z, y, x = np.indices(SHAPE, dtype=np.float64)
    inside = (z - 6) ** 2 + (y - 8) ** 2 + (x - 10) ** 2 < 5.0 ** 2
    e0 = 6548.0 + 0.5 * (x - 10)                       # a gradient of edge positions along x
    spectra = synthetic_spectra(E, e0[inside])         # (n_e, n_inside)
    stack = np.zeros((E.size, *SHAPE), np.float32)
    stack[:, inside] = spectra
    stack += np.float32(0.01) * np.arange(E.size, dtype=np.float32)[:, None, None, None]
    order = np.arange(E.size)[::-1]
    chem = None
    if fractions:
        f = np.stack([np.where(inside, 0.25, 0.0), np.where(inside, 0.75, 0.0)]).astype(np.float32)
        refs = np.stack([np.linspace(0, 1, E.size), np.linspace(1, 2, E.size)])[:, order]  # file energy order
        chem = {"fractions": f, "reference_names": ["MnO", "Mn2O3"], "references": refs.T,
                "r_factor": np.zeros(SHAPE, np.float32), "residual": np.zeros(SHAPE, np.float32)}
    write_result_file(path, E[order], stacks={"aligned": stack[order], "recon": 2 * stack[order]},
                      mse=(np.linspace(1.0, 2.0, E.size)[order], np.linspace(0.1, 0.2, E.size)[order]),
                      maps={"edge_energy": np.where(inside, e0, np.nan).astype(np.float32), "mask": inside},
                      labels=inside.astype(np.int32), chemistry=chem,
                      attrs={} if voxel_nm is None else {"voxel_size_nm": voxel_nm})
    return stack, inside


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    path = tmp_path_factory.mktemp("viewer") / "result.h5"
    stack, inside = _make_result(path)
    return path, stack, inside


# ----------------------------------------------------------------------------- no napari needed

def test_layers_names_shapes_scales(result):
    path, stack, _ = result
    with open_file(path) as rf:
        layers = {kw["name"]: (data, kw, kind) for data, kw, kind in result_layers(rf)}
        assert list(layers) == ["aligned", "recon", "edge energy (eV)", "labels", "fraction MnO", "fraction Mn2O3"]
        data, kw, kind = layers["aligned"]
        assert kind == "image" and data.shape == (E.size, *SHAPE) and kw["visible"]
        assert kw["scale"] == (1.0, 0.25, 0.25, 0.25) and kw["units"] == ("pixel", "um", "um", "um")
        np.testing.assert_array_equal(np.asarray(data[:, 5]), stack[:, 5])   # increasing energy, as in `stack`
        np.testing.assert_array_equal(kw["metadata"]["energy"], E)
        lo, hi = kw["contrast_limits"]
        assert stack.min() <= lo < hi <= stack.max()
        assert not layers["recon"][1]["visible"]
        edge, kw, _ = layers["edge energy (eV)"]
        assert edge.shape == SHAPE and kw["scale"] == (0.25, 0.25, 0.25) and kw["colormap"] == "viridis"
        lo, hi = kw["contrast_limits"]
        assert 6545.0 <= lo < hi <= 6551.0            # percentiles of the valid voxels only (NaN outside)
        assert layers["labels"][2] == "labels" and layers["labels"][0].shape == SHAPE
        assert layers["fraction Mn2O3"][0].shape == SHAPE
        assert float(layers["fraction Mn2O3"][0][6, 8, 10].compute()) == pytest.approx(0.75)


def test_voxel_size_from_input_file_or_none(tmp_path):
    src = tmp_path / "input.h5"
    with h5py.File(src, "w") as h5:
        h5.attrs["voxel_size_nm"] = 40.0
    res = tmp_path / "res.h5"
    _make_result(res, voxel_nm=None, fractions=False)
    with open_file(res) as rf:
        assert voxel_size_um(rf) is None
        names = [kw["name"] for _, kw, _ in result_layers(rf)]
        assert "fraction MnO" not in names and result_layers(rf)[0][1]["scale"] == (1.0, 1.0, 1.0, 1.0)
    with h5py.File(res, "a") as h5:
        h5.attrs["input"] = str(src)
    with open_file(res) as rf:
        assert voxel_size_um(rf) == pytest.approx(0.04)


def test_voxel_spectrum_is_that_voxels_spectrum(result):
    path, stack, _ = result
    idx = (6, 9, 12)
    with open_file(path) as rf:
        spec = voxel_spectrum(rf, idx)
        mse = registration_mse(rf)
    np.testing.assert_array_equal(spec["energy"], E)
    np.testing.assert_array_equal(spec["mu"], stack[:, 6, 9, 12].astype(np.float64))
    expect = normalize(stack[:, 6, 9, 12][:, None], E)[:, 0]
    np.testing.assert_allclose(spec["norm"], expect, atol=1e-5)
    # model: 0 on the pre-edge line; post-edge line 1 + post_slope (E - e0), post_slope = -1e-3/eV, e0 = 6549
    assert spec["norm"][0] == pytest.approx(0.0, abs=0.02)
    assert spec["norm"][-1] == pytest.approx(1.0 - 1e-3 * (E[-1] - 6549.0), abs=0.03)
    assert spec["edge_energy"] == pytest.approx(6548.0 + 0.5 * 2)
    np.testing.assert_allclose(spec["fit"], 0.25 * np.linspace(0, 1, E.size) + 0.75 * np.linspace(1, 2, E.size))
    np.testing.assert_allclose(spec["mse_before"], np.linspace(1.0, 2.0, E.size))   # sorted like the energies
    np.testing.assert_allclose(mse["mse_after"], np.linspace(0.1, 0.2, E.size))
    with open_file(path) as rf:
        assert np.isnan(voxel_spectrum(rf, (0, 0, 0))["edge_energy"])      # masked background
        with pytest.raises(ValueError, match="outside"):
            voxel_spectrum(rf, (12, 0, 0))


def _big_result(path, n_e=60, n=256):
    """A 60 x 256^3 result with unallocated (sparse) chunks: a few kB on disk, cheap to make."""
    with h5py.File(path, "w") as h5:
        h5["energy"] = np.linspace(6500.0, 6700.0, n_e)
        for name in ("aligned", "recon"):
            h5.create_dataset(name, shape=(n_e, n, n, n), dtype="f4", chunks=(1, 16, n, n), fillvalue=1.0)
        h5["registration/mse_before"] = np.ones(n_e)
        h5["registration/mse_after"] = np.ones(n_e)
        g = h5.create_group("xanes")
        g.create_dataset("edge_energy", shape=(n, n, n), dtype="f4", chunks=(1, n, n), fillvalue=6550.0)
        g.create_dataset("mask", shape=(n, n, n), dtype=bool, chunks=(1, n, n), fillvalue=True)
        g.create_dataset("labels", shape=(n, n, n), dtype="i4", chunks=(1, n, n), fillvalue=1)
    return n ** 3


@pytest.fixture
def count_reads(monkeypatch):
    """Elements returned by every h5py dataset read (the counting wrapper)."""
    counter = {"elements": 0}
    original = h5py.Dataset.__getitem__

    def counting(self, args, new_dtype=None):
        out = original(self, args, new_dtype) if new_dtype is not None else original(self, args)
        counter["elements"] += int(np.size(out))
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", counting)
    return counter


def test_layers_of_a_large_result_read_less_than_one_energy(tmp_path, count_reads):
    path = tmp_path / "big.h5"
    volume = _big_result(path)
    with open_file(path) as rf:
        layers = result_layers(rf)
        for data, kw, _ in layers:                 # what a 2D draw reads: one plane of each visible layer
            if kw.get("visible", True):
                np.asarray(data[(data.ndim - 3) * (30,) + (128,)])
    # contrast limits from <= 8 planes of each stack and of the map/mask, plus one plane per drawn layer
    assert 0 < count_reads["elements"] <= volume // 4, count_reads


# ----------------------------------------------------------------------------- napari

_XVFB = []  # the server this module started, if any (kept referenced while it runs)


def _stop_xvfb(proc):
    """At exit: Qt's X connection first (deleting the application closes it), then the server, waited for.

    Run by ``atexit`` before the interpreter's own teardown, where Qt would otherwise close its connection
    after the server had gone (Qt's X I/O error handler then exits with status 1). Without PyQt5's ``sip``
    the application cannot be deleted here: the server is left to the parent-death signal.
    """
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    if app is not None:
        try:
            from PyQt5 import sip
        except ImportError:
            return
        app.closeAllWindows()
        app.processEvents()
        sip.delete(app)
    proc.terminate()
    proc.wait(timeout=10)


def _die_with_parent():
    import ctypes
    import signal

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@pytest.fixture(scope="module")
def qt(tmp_path_factory):
    """napari with a working OpenGL context, or skip."""
    napari = pytest.importorskip("napari")
    pytest.importorskip("qtpy")
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    if not os.environ.get("DISPLAY") and shutil.which("Xvfb"):
        read, write = os.pipe()
        # Stopped at exit, after Qt's X connection is closed (_stop_xvfb): Qt keeps it until the interpreter
        # exits, and a server that goes away first makes Qt's X I/O error handler exit the process with status 1
        # after the tests passed. Should this process die first, Xvfb gets SIGTERM (Linux parent-death signal).
        _XVFB.append(subprocess.Popen(["Xvfb", "-displayfd", str(write), "-screen", "0", "1600x1000x24", "-nolisten", "tcp"],
                                pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=_die_with_parent))
        atexit.register(_stop_xvfb, _XVFB[-1])
        os.close(write)
        with os.fdopen(read) as f:
            os.environ["DISPLAY"] = ":" + f.readline().strip()
    from gpureg.viewer.app import check_opengl

    try:
        check_opengl()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    yield napari


@pytest.fixture(scope="module")
def viewer(qt, result):
    from gpureg.viewer import open_result

    v = open_result(result[0], show=False)
    yield v
    v.close()


def test_open_result_layers_and_energy_label(viewer):
    names = [ly.name for ly in viewer.layers]
    assert names[:6] == ["aligned", "recon", "edge energy (eV)", "labels", "fraction MnO", "fraction Mn2O3"]
    assert viewer.layers["aligned"].data.shape == (E.size, *SHAPE)
    np.testing.assert_allclose(viewer.layers["aligned"].scale, (1.0, 0.25, 0.25, 0.25))
    np.testing.assert_allclose(viewer.layers["edge energy (eV)"].scale, (0.25, 0.25, 0.25))
    viewer.dims.set_current_step(0, 5)
    assert viewer.dims.axis_labels[0] == f"{E[5]:.1f} eV"
    from gpureg.viewer.widget import overlay

    assert f"{E[5]:.1f} eV" in overlay(viewer, "text").text


def test_spectrum_widget_shows_the_clicked_voxel(viewer, result):
    _, stack, _ = result
    widget = viewer.window.gpureg_spectrum
    world = np.array([0.0, 6, 9, 12]) * np.array([1.0, 0.25, 0.25, 0.25])   # where a click on voxel (6, 9, 12) lands
    idx = widget.voxel_at(world)
    assert idx == (6, 9, 12)
    spec = widget.show_voxel(idx)
    np.testing.assert_array_equal(spec["mu"], stack[:, 6, 9, 12].astype(np.float64))
    line = widget.ax_mu.lines[0]
    np.testing.assert_allclose(line.get_ydata(), spec["norm"])
    np.testing.assert_array_equal(viewer.layers["picked voxel"].data, [[6, 9, 12]])
    assert widget.voxel_at(np.array([0.0, 6, 9, 99.0])) is None


def test_screenshot_is_not_blank(qt, result, tmp_path):
    from matplotlib.image import imread

    from gpureg.viewer import screenshot

    png = screenshot(result[0], tmp_path / "shot.png", size=(1000, 700))
    img = imread(png)[..., :3]
    assert img.shape[:2] == (700, 1000)
    colours = np.unique((img.reshape(-1, 3) * 255).astype(np.uint8), axis=0)
    assert len(colours) > 100                       # a blank or one-colour canvas has a handful
    # the viridis edge-energy overlay is there: greenish pixels (G well above R and B's mean)
    green = (img[..., 1] > img[..., 0] + 0.15) & (img[..., 1] > 0.3)
    assert green.sum() > 100


def test_opening_a_large_result_reads_less_than_one_energy(qt, tmp_path, count_reads):
    from gpureg.viewer import open_result

    path = tmp_path / "big.h5"
    volume = _big_result(path)
    v = open_result(path, show=False)
    try:
        v.screenshot(canvas_only=False)             # the first draw
        assert 0 < count_reads["elements"] <= volume, count_reads
    finally:
        v.close()


def test_npe2_reader_gives_the_same_layers(qt, result, tmp_path):
    npe2 = pytest.importorskip("npe2")
    from importlib.resources import files

    from gpureg.viewer.reader import get_reader

    manifest = npe2.PluginManifest.from_file(str(files("gpureg.viewer") / "napari.yaml"))
    assert manifest.name == "gpureg" and manifest.contributions.readers[0].command == "gpureg.get_reader"
    reader = get_reader(str(result[0]))
    names = [kw["name"] for _, kw, _ in reader(str(result[0]))]
    assert names == ["aligned", "recon", "edge energy (eV)", "labels", "fraction MnO", "fraction Mn2O3"]
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as h5:
        h5["x"] = 1
    assert get_reader(str(other)) is None
    assert get_reader(str(tmp_path / "missing.h5")) is None


def test_cli_view_missing_file_is_one_line_error(tmp_path, capsys):
    from gpureg.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["view", str(tmp_path / "missing.h5"), "--screenshot", str(tmp_path / "x.png")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gpureg: error: ") and ("missing.h5" in err[-1] or "napari" in err[-1])


def test_cli_view_screenshot(qt, result, tmp_path):
    from matplotlib.image import imread

    from gpureg.cli import main

    png = tmp_path / "cli.png"
    try:
        rc = main(["view", str(result[0]), "--screenshot", str(png)])
    except SystemExit as exc:  # typer's standalone mode exits even on success
        rc = exc.code
    assert rc in (0, None)
    assert imread(png).shape[:2] == (900, 1500)


def test_plugin_dock_on_reader_layers(qt, result):
    """What napari does for `napari RESULT.h5` + Plugins > gpureg: voxel spectrum (npe2 layer tuples, dock class)."""
    from gpureg.viewer.reader import read_result
    from gpureg.viewer.widget import SpectrumDock

    v = qt.Viewer(show=False)
    try:
        for data, kw, kind in read_result(str(result[0])):
            getattr(v, f"add_{kind}")(data, **kw)
        dock = SpectrumDock(napari_viewer=v)
        spec = dock.show_voxel((6, 9, 12))
        np.testing.assert_array_equal(spec["mu"], result[1][:, 6, 9, 12].astype(np.float64))
        assert v.dims.axis_labels[0].endswith(" eV")
    finally:
        v.close()


def test_ome_zarr_export_opens_in_napari_with_its_scale(qt, result, tmp_path):
    """`gpureg export --zarr` output read by napari's OME-Zarr reader: the aligned stack at 0.25 um voxels."""
    pytest.importorskip("napari_ome_zarr")
    from gpureg.pipeline.export import export_zarr

    out = export_zarr(result[0], tmp_path / "result.zarr")
    v = qt.Viewer(show=False)
    try:
        layers = v.open(str(out), plugin="napari-ome-zarr")
        full = {ly.name: (ly.data[0] if ly.multiscale else ly.data) for ly in layers}
        image = next(ly for ly in layers if full[ly.name].ndim == 4)
        assert tuple(full[image.name].shape) == (E.size, *SHAPE)
        np.testing.assert_allclose(image.scale, (1.0, 0.25, 0.25, 0.25))
        labels = next(ly for ly in layers if "particles" in ly.name)
        np.testing.assert_allclose(labels.scale, (0.25, 0.25, 0.25))
    finally:
        v.close()


def test_cli_view_of_a_maps_only_result(qt, tmp_path, capsys):
    """`gpureg xanes` output (maps, no stack): the maps show, with no spectrum dock (no spectra to read)."""
    from matplotlib.image import imread

    from gpureg.cli import main

    path = tmp_path / "maps.h5"
    z, y, x = np.indices(SHAPE, dtype=np.float64)
    inside = (z - 6) ** 2 + (y - 8) ** 2 + (x - 10) ** 2 < 5.0 ** 2
    write_result_file(path, E, maps={"edge_energy": np.where(inside, 6550.0, np.nan).astype(np.float32),
                                      "mask": inside}, labels=inside.astype(np.int32))
    png = tmp_path / "maps.png"
    with pytest.raises(SystemExit) as exc:
        main(["view", str(path), "--screenshot", str(png)])
    assert exc.value.code in (0, None)
    assert imread(png).shape[:2] == (900, 1500)
    assert "warning" not in capsys.readouterr().err  # no napari noise about Qt6 theme detection either
