"""Beamline layouts (issue 18): each built here from one simulated scan, each must run like the Data Exchange original.

Zeiss/Xradia files are written with ``tests/cfb_writer.py`` using the stream
names and types of dxchange's ``read_txrm``/``read_xrm`` and CIL's
``ZEISSDataReader`` (see :mod:`gpureg.io.xradia`). Xradia files carry no dark
frames, so their counts are written dark-subtracted (float32, DataType 10),
and the reference image is the mean flat minus the mean dark: flat-field
correction then computes the same transmissions as from the original.
"""

import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from cli_run import run_cli

import gpureg
from gpureg.cli.admin import format_description
from gpureg.core.errors import InputError
from gpureg.io import open_input, write_dataexchange
from gpureg.io.detect import describe_input
from gpureg.io.xradia import image_stream
from gpureg.synth.scan import simulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: cfb_writer
from cfb_writer import write_cfb

SIZE, N_ANGLES = 24, 25
ENERGIES = np.array([6500.0, 6540.0, 6548.0, 6552.5, 6556.0, 6620.0])  # exact in float32
VOXEL_NM = 3200.0 / SIZE  # what simulate() records
TOL_VOX = 0.05


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    """The simulated scan (Data Exchange), its arrays, and the pipeline's result on it."""
    folder = tmp_path_factory.mktemp("scan")
    path = simulate(folder / "scan.h5", size=SIZE, energies=ENERGIES, n_angles=N_ANGLES, seed=3)
    with h5py.File(path, "r") as h5:
        arrays = {k: h5["exchange"][k][()] for k in ("data", "data_white", "data_dark", "theta", "energy")}
    res = gpureg.run(path, folder / "dx_result.h5", report=False)
    with h5py.File(folder / "dx_result.h5", "r") as h5:
        arrays["recon"] = h5["recon"][()]
    return {"path": path, "folder": folder, "a": arrays, "matrix": res.matrices, "energy": res.energies}


def _displacement(m1, m2):
    """Largest distance (voxels) between where two affines send the grid's corners (bounds the whole grid)."""
    corners = np.array([[z, y, x, 1.0] for z in (0, SIZE - 1) for y in (0, SIZE - 1) for x in (0, SIZE - 1)])
    return float(np.max(np.linalg.norm(corners @ (np.asarray(m1) - np.asarray(m2)).T, axis=1)))


def _same_run(path, reference, tmp_path, *, layout):
    with open_input(path) as r:
        assert layout in r.layout
        np.testing.assert_allclose(r.energies, ENERGIES, rtol=0, atol=1e-3)
        assert r.pixel_size_nm == pytest.approx(VOXEL_NM, rel=1e-5)
    res = gpureg.run(path, tmp_path / "result.h5", report=False)
    np.testing.assert_allclose(res.energies, reference["energy"], rtol=0, atol=1e-3)
    worst = max(_displacement(a, b) for a, b in zip(res.matrices, reference["matrix"]))
    assert worst < TOL_VOX, f"{layout}: registrations differ from Data Exchange by {worst:.3f} voxel"
    return res


def _ole_common(n, energy, *, energy_stream=True, dtype_code=10):
    s = {"ImageInfo/NoOfImages": np.uint32([n]).tobytes(), "ImageInfo/ImagesTaken": np.uint32([n]).tobytes(),
         "ImageInfo/ImageWidth": np.uint32([SIZE]).tobytes(), "ImageInfo/ImageHeight": np.uint32([SIZE]).tobytes(),
         "ImageInfo/DataType": np.uint32([dtype_code]).tobytes(),
         "ImageInfo/PixelSize": np.float32([VOXEL_NM / 1000.0]).tobytes(),  # micrometres
         "ImageInfo/XrayMagnification": np.float32([42.0]).tobytes()}
    if energy_stream:
        s["ImageInfo/Energy"] = np.full(n, energy, dtype="<f4").tobytes()
    return s


def _dark_subtracted(a, k):
    dark = a["data_dark"].astype(np.float32).mean(axis=0)
    proj = a["data"][k].astype(np.float32) - dark
    ref = a["data_white"][k].astype(np.float32).mean(axis=0) - dark
    return proj.astype("<f4"), ref.astype("<f4")


def _write_txrm(folder, a):
    """One .txrm per energy; energies from ImageInfo/Energy, PositionInfo, or the file name (one file each)."""
    folder.mkdir()
    for k, e in enumerate(a["energy"]):
        proj, ref = _dark_subtracted(a, k)
        source = {0: "motor", 1: "name"}.get(k, "stream")
        s = _ole_common(N_ANGLES, e, energy_stream=source == "stream")
        if source == "motor":  # ImageInfo/Energy all zero: the 'Energy' motor gives it
            s["ImageInfo/Energy"] = np.zeros(N_ANGLES, "<f4").tobytes()
            s["PositionInfo/AxisNames"] = b"Sample X\0Energy\0"
            s["PositionInfo/AxisUnits"] = b"um\0eV\0"
            s["PositionInfo/TotalAxis"] = np.uint32([2]).tobytes()
            s["PositionInfo/MotorPositions"] = np.tile(np.float32([1.5, e]), N_ANGLES).astype("<f4").tobytes()
        s["ImageInfo/Angles"] = a["theta"].astype("<f4").tobytes()
        s["ImageInfo/AcquisitionMode"] = np.int32([0]).tobytes()
        for m in range(N_ANGLES):
            s[image_stream(m + 1)] = proj[m].tobytes()
        s["ReferenceData/DataType"] = np.uint32([10]).tobytes()
        s["ReferenceData/Image"] = ref.tobytes()
        name = f"tomo_{e:.1f}eV.txrm" if source == "name" else f"tomo_{k:02d}.txrm"
        write_cfb(folder / name, s)
    return folder


def test_txrm_folder_matches_dataexchange(scan, tmp_path):
    folder = _write_txrm(tmp_path / "txrm", scan["a"])
    with open_input(folder) as r:
        assert any("PositionInfo" in g for g in r.guessed) and any("dark" in g for g in r.guessed)
        np.testing.assert_allclose(r.theta, scan["a"]["theta"], atol=1e-4)
    _same_run(folder, scan, tmp_path, layout="Zeiss/Xradia .txrm")


def test_xrm_files_grouped_by_energy(scan, tmp_path):
    """One projection per .xrm file, shuffled names, open beam in separate '*ref*' files; a glob selects them."""
    a, folder = scan["a"], tmp_path / "xrm"
    folder.mkdir()
    order = np.random.default_rng(0).permutation(N_ANGLES)
    for k, e in enumerate(a["energy"]):
        proj, ref = _dark_subtracted(a, k)
        for j, m in enumerate(order):
            s = _ole_common(1, e)
            s["ImageInfo/Angles"] = np.float32([a["theta"][m]]).tobytes()
            s[image_stream(1)] = proj[m].tobytes()
            write_cfb(folder / f"s{j:03d}_{k}.xrm", s)
        s = _ole_common(1, e)
        s["ImageInfo/Angles"] = np.float32([0.0]).tobytes()
        s[image_stream(1)] = ref.tobytes()
        write_cfb(folder / f"ref_{k}.xrm", s)
    with open_input(str(folder / "*.xrm")) as r:  # sorted by angle within each energy
        np.testing.assert_allclose(r.theta, a["theta"], atol=1e-4)
        np.testing.assert_array_equal(r.projections(2), _dark_subtracted(a, 2)[0])
    _same_run(str(folder / "*.xrm"), scan, tmp_path, layout="Zeiss/Xradia .xrm")


def test_txm_volumes_match_dataexchange_recon(scan, tmp_path):
    a = scan["a"]
    dx = write_dataexchange(tmp_path / "recon.h5", recon=a["recon"], energy=a["energy"], attrs={"voxel_size_nm": VOXEL_NM})
    ref = gpureg.run(dx, tmp_path / "dx.h5", report=False)
    folder = tmp_path / "txm"
    folder.mkdir()
    for k, e in enumerate(a["energy"]):
        s = _ole_common(SIZE, e)
        s["ImageInfo/AcquisitionMode"] = np.int32([1]).tobytes()
        for z in range(SIZE):
            s[image_stream(z + 1)] = a["recon"][k, z].astype("<f4").tobytes()
        write_cfb(folder / f"vol_{k}.txm", s)
    with open_input(folder) as r:
        assert r.kind == "recon" and r.theta is None
        np.testing.assert_array_equal(r.recon(3), a["recon"][3])
    _same_run(folder, {"energy": ref.energies, "matrix": ref.matrices}, tmp_path, layout="Zeiss/Xradia .txm")


def test_fxi_files_match_dataexchange(scan, tmp_path):
    a, folder = scan["a"], tmp_path / "fxi"
    folder.mkdir()
    for k, e in enumerate(a["energy"][::-1]):  # scan ids not in energy order
        i = len(a["energy"]) - 1 - k
        with h5py.File(folder / f"fly_scan_id_{100 + k}.h5", "w") as h5:
            h5["img_tomo"], h5["img_bkg"], h5["img_dark"] = a["data"][i], a["data_white"][i], a["data_dark"]
            h5["angle"], h5["X_eng"] = a["theta"], e / 1000.0
            h5["Pixel Size"], h5["Magnification"] = f"{VOXEL_NM}nm", 42.0
    _same_run(folder, scan, tmp_path, layout="FXI")


def _nx_entry(g, frames, keys, angles, energy, energy_path, units):
    g.attrs["NX_class"] = "NXentry"
    g["definition"] = "NXtomo"
    det = g.create_group("instrument/detector")
    det["data"], det["image_key"] = frames, keys
    g.create_group("sample")["rotation_angle"] = angles
    g["sample/rotation_angle"].attrs["units"] = "degree"
    g["sample/x_pixel_size"] = VOXEL_NM * 1e-9
    g["sample/x_pixel_size"].attrs["units"] = "m"
    g[energy_path] = energy
    g[energy_path].attrs["units"] = units


def _nx_frames(a, k):
    frames = np.concatenate([a["data_dark"], a["data_white"][k], a["data"][k]])
    keys = np.repeat([2, 1, 0], [len(a["data_dark"]), len(a["data_white"][k]), N_ANGLES])
    angles = np.concatenate([np.zeros(len(a["data_dark"]) + len(a["data_white"][k])), a["theta"]])
    return frames, keys, angles


def test_nxtomo_one_entry_per_frame_energy(scan, tmp_path):
    a = scan["a"]
    parts = [_nx_frames(a, k) for k in range(len(a["energy"]))]
    energy = np.concatenate([np.full(len(p[1]), e / 1000.0) for p, e in zip(parts, a["energy"])])
    with h5py.File(tmp_path / "scan.nxs", "w") as h5:
        _nx_entry(h5.create_group("entry0000"), *[np.concatenate([p[i] for p in parts]) for i in range(3)],
                  energy, "beam/incident_energy", "keV")
    _same_run(tmp_path / "scan.nxs", scan, tmp_path, layout="NXtomo")


def test_nxtomo_one_entry_per_energy(scan, tmp_path):
    a = scan["a"]
    with h5py.File(tmp_path / "scan.nx", "w") as h5:
        for k, e in enumerate(a["energy"]):
            _nx_entry(h5.create_group(f"entry{k:04d}"), *_nx_frames(a, k), e, "instrument/monochromator/energy", "eV")
    _same_run(tmp_path / "scan.nx", scan, tmp_path, layout="NXtomo")


def test_tiff_with_energies_txt(scan, tmp_path):
    import tifffile

    a, folder = scan["a"], tmp_path / "tiff"
    folder.mkdir()
    for k in range(len(a["energy"])):  # names without energies: energies.txt and natural order (2 before 10)
        tifffile.imwrite(folder / f"proj_{2 * k + 2}.tif", a["data"][k], photometric="minisblack")
        tifffile.imwrite(folder / f"flat_{2 * k + 2}.tif", a["data_white"][k], photometric="minisblack")
    tifffile.imwrite(folder / "dark.tif", a["data_dark"], photometric="minisblack")
    np.savetxt(folder / "theta.txt", a["theta"])
    np.savetxt(folder / "energies.txt", a["energy"])
    with open_input(folder) as r:
        assert r.layout == "TIFF series" and any("energies.txt" in g for g in r.guessed)
        r.pixel_size_nm = VOXEL_NM  # TIFF carries no pixel size; the check below is about energies/registration
    res = gpureg.run(folder, tmp_path / "result.h5", report=False)
    np.testing.assert_allclose(res.energies, scan["energy"], atol=1e-3)
    worst = max(_displacement(m1, m2) for m1, m2 in zip(res.matrices, scan["matrix"]))
    assert worst < TOL_VOX


def test_describe_input_reports_layout_and_guesses(scan, tmp_path):
    d = describe_input(scan["path"])
    assert d["layout"] == "Data Exchange" and d["energies_ev"] == pytest.approx(list(ENERGIES))
    assert d["angles"]["n"] == N_ANGLES and d["angles"]["units"] == "degrees"
    assert d["pixel_size_nm"] == pytest.approx(VOXEL_NM) and d["flat_frames"] == 5
    folder = _write_txrm(tmp_path / "txrm", scan["a"])
    text = format_description(describe_input(folder))
    assert "Zeiss/Xradia .txrm" in text and "6552.50" in text and "dark counts taken as 0" in text
    assert "133.3 nm" in text


def _txrm_streams(n=3, taken=None):
    s = _ole_common(n, 6550.0)
    s["ImageInfo/ImagesTaken"] = np.uint32([n if taken is None else taken]).tobytes()
    s["ImageInfo/Angles"] = np.linspace(-90, 90, n).astype("<f4").tobytes()
    for m in range(n):
        s[image_stream(m + 1)] = np.ones((SIZE, SIZE), "<f4").tobytes()
    s["ReferenceData/Image"] = np.full((SIZE, SIZE), 2.0, "<f4").tobytes()
    return s


@pytest.mark.parametrize("case, message", [
    ("not_txm", r"bad\.txrm: OLE file without stream ImageInfo/ImageWidth: not a Zeiss/Xradia TXM file"),
    ("no_angles", r"bad\.txrm: stream ImageInfo/Angles not found"),
    ("count", r"bad\.txrm: ImageInfo/ImagesTaken says 4 images but stream ImageData1/Image4 is missing"),
    ("short_image", r"bad\.txrm: stream ImageData1/Image2 has 100 bytes; expected 2304"),
    ("dtype", r"bad\.txrm: ImageInfo/DataType is 3; expected 5 \(uint16\) or 10 \(float32\)"),
    ("no_energy", r"bad\.txrm: no energy: ImageInfo/Energy is empty"),
])
def test_bad_xradia_files_name_file_and_stream(tmp_path, case, message):
    s = _txrm_streams()
    if case == "not_txm":
        s = {"WordDocument": b"hello", "SummaryInformation": b"\0" * 40}
    elif case == "no_angles":
        del s["ImageInfo/Angles"]
    elif case == "count":
        s["ImageInfo/ImagesTaken"] = np.uint32([4]).tobytes()
    elif case == "short_image":
        s[image_stream(2)] = b"\0" * 100
    elif case == "dtype":
        s["ImageInfo/DataType"] = np.uint32([3]).tobytes()
    elif case == "no_energy":
        del s["ImageInfo/Energy"]
    write_cfb(tmp_path / "bad.txrm", s)
    with pytest.raises(InputError, match=message) as err, open_input(tmp_path / "bad.txrm") as r:
        r.projections(0)
    assert "\n" not in str(err.value)


def test_unknown_layout_lists_what_each_lacked(tmp_path):
    with h5py.File(tmp_path / "odd.h5", "w") as h5:
        h5["something"] = np.zeros(3)
    with pytest.raises(InputError) as err:
        open_input(tmp_path / "odd.h5")
    msg = str(err.value)
    for part in ("odd.h5", "Data Exchange (group /exchange not found)", "FXI 18-ID (no /img_tomo)",
                 "NXtomo (no NXentry", "Zeiss/Xradia (an HDF5 file, not OLE2)"):
        assert part in msg
    (tmp_path / "x.dat").write_bytes(b"\0" * 64)
    with pytest.raises(InputError, match=r"x\.dat: not an HDF5 file.*Zeiss/Xradia \(not an OLE2 compound file\)"):
        open_input(tmp_path / "x.dat")


def test_fxi_and_nxtomo_errors_name_the_dataset(tmp_path):
    with h5py.File(tmp_path / "fly_scan_id_1.h5", "w") as h5:
        h5["img_tomo"], h5["X_eng"] = np.zeros((3, 4, 4), np.uint16), 6.5
        h5["img_bkg"] = np.ones((2, 4, 4), np.uint16)
        h5["angle"] = np.zeros(2)
    with pytest.raises(InputError, match=r"fly_scan_id_1\.h5: /angle has 2 values but /img_tomo has 3"):
        open_input(tmp_path / "fly_scan_id_1.h5")
    with h5py.File(tmp_path / "t.nxs", "w") as h5:
        frames, keys, angles = np.ones((4, 4, 4), np.uint16), np.array([1, 0, 0, 0]), np.zeros(4)
        _nx_entry(h5.create_group("entry"), frames, keys, angles, np.zeros(4) + 6.5, "beam/incident_energy", "MeV")
    with pytest.raises(InputError, match=r"t\.nxs:/entry/beam/incident_energy: units 'mev' not understood"):
        open_input(tmp_path / "t.nxs")


def test_cli_info_describes_an_input(scan, tmp_path):
    folder = _write_txrm(tmp_path / "txrm", scan["a"])
    r = run_cli("info", folder)
    assert r.returncode == 0, r.stderr
    assert "Zeiss/Xradia .txrm (projections)" in r.stdout and "25: -90.000 .. 90.000 degrees" in r.stdout
    r = run_cli("info", tmp_path / "nothing.bin", "--json")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "file or folder not found" in r.stderr
