"""How the result file stores its stacks: codecs, float16, NeXus views, ``gpureg info``, OME-Zarr export."""

import json

import h5py
import numpy as np
import pytest

import gpureg
from gpureg.cli import main
from gpureg.io import write_dataexchange
from gpureg.io.results import (COMPRESSIONS, DEFAULT_COMPRESSION, ResultFile, dataset_filter, describe_filter,
                               describe_result, parse_compression)
from gpureg.pipeline import run

SIZE = 32
ENERGIES = np.array([6500.0, 6530.0, 6545.0, 6550.0, 6555.0, 6570.0, 6600.0])


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """Reconstructed volumes (no FBP: fast) with an absorption edge at 6550 eV, a known voxel size."""
    folder = tmp_path_factory.mktemp("storage")
    step = 0.3 + 0.7 / (1 + np.exp(-(ENERGIES - 6550.0) / 2.0))
    vols = [gpureg.two_particle_phantom((SIZE,) * 3) * s for s in step]
    path = write_dataexchange(folder / "recon.h5", recon=vols, energy=ENERGIES)
    with h5py.File(path, "r+") as h5:
        h5.attrs["voxel_size_nm"] = 50.0
    return path


@pytest.fixture(scope="module")
def result(series, tmp_path_factory):
    out = tmp_path_factory.mktemp("res") / "out.h5"
    run(series, out, gpureg.RunOptions(report=False))
    return out


@pytest.mark.parametrize("spec", COMPRESSIONS)
def test_every_codec_round_trips_exactly(spec, tmp_path):
    vol = np.random.default_rng(1).normal(size=(8, 16, 16)).astype(np.float32)
    with h5py.File(tmp_path / "c.h5", "w") as h5:
        h5.create_dataset("v", data=vol, chunks=(4, 16, 16), **dataset_filter(spec))
    with h5py.File(tmp_path / "c.h5", "r") as h5:
        assert np.array_equal(h5["v"][...], vol)
        text = describe_filter(h5["v"])
    assert text == "none" if spec == "none" else text != "none"


@pytest.mark.parametrize("bad, why", [("brotli", "one of"), ("gzip:0", "1..9"), ("lz4:3", "takes no level"),
                                      ("zstd:x", "integer")])
def test_bad_compression_is_one_clear_error(bad, why):
    with pytest.raises(ValueError, match=why):
        parse_compression(bad)
    with pytest.raises(ValueError, match="compression"):
        gpureg.RunOptions(compression=bad)


def test_default_run_uses_the_fast_codec_and_nexus_views(result):
    with h5py.File(result, "r") as h5:
        for name in ("recon", "aligned"):
            assert h5[name].attrs["compression"] == DEFAULT_COMPRESSION
            assert describe_filter(h5[name]).startswith("blosc2 (zstd 1")
        # NeXus: the root's default entry, NXdata views whose soft links resolve to the real datasets
        assert h5.attrs["default"] == "entry" and h5["entry"].attrs["NX_class"] == "NXentry"
        view = h5["entry/aligned"]
        assert view.attrs["NX_class"] == "NXdata" and view.attrs["signal"] == "data"
        assert list(view.attrs["axes"]) == ["energy", "z", "y", "x"]
        assert view["data"].shape == h5["aligned"].shape
        assert np.array_equal(view["energy"][...], ENERGIES) and view["energy"].attrs["units"] == "eV"
        assert view["x"].attrs["units"] == "um" and np.allclose(np.diff(view["x"][...]), 0.05)  # 50 nm voxels
        assert np.array_equal(h5["entry/edge_energy/data"][...], h5["xanes/edge_energy"][...], equal_nan=True)


def test_info_says_how_a_result_is_stored(result, capsys):
    d = describe_result(result)
    assert d["complete"] and d["n_energy"] == ENERGIES.size and d["voxel_size_nm"] == 50.0
    assert d["stacks"]["aligned"]["filter"].startswith("blosc2") and "edge_energy" in d["maps"]
    with pytest.raises(SystemExit) as e:
        main(["info", str(result)])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "/aligned" in out and "blosc2 (zstd 1 + shuffle)" in out and "complete" in out


def test_gzip_results_of_earlier_versions_still_open(series, result, tmp_path):
    """A result written the old way (gzip 1 + shuffle, no NeXus views) gives the same maps and reads as before."""
    old = tmp_path / "old.h5"
    run(series, old, gpureg.RunOptions(report=False, compression="gzip:1"))
    with h5py.File(old, "r+") as h5:  # what earlier versions wrote: no views, no storage attributes
        del h5["entry"]
        for name in ("recon", "aligned"):
            for key in list(h5[name].attrs):
                del h5[name].attrs[key]
    with ResultFile(old) as a, ResultFile(result) as b:
        assert describe_filter(a.h5["aligned"]) == "gzip 1 + shuffle"
        assert np.array_equal(a.stack("aligned")[...], b.stack("aligned")[...])
        assert np.array_equal(a.xanes()["edge_energy"], b.xanes()["edge_energy"], equal_nan=True)
    with pytest.raises(SystemExit) as e:
        main(["report", str(old), "--outdir", str(tmp_path / "rep")])
    assert e.value.code == 0 and (tmp_path / "rep" / "summary.json").exists()


def test_dropped_stacks_lose_their_views_not_the_file(series, tmp_path):
    out = tmp_path / "lean.h5"
    run(series, out, gpureg.RunOptions(report=False, keep=("recon",)))
    with h5py.File(out, "r") as h5:
        assert "aligned" not in h5 and "aligned" not in h5["entry"]
        assert "recon" in h5["entry"] and h5["entry/recon/data"].shape == h5["recon"].shape
        assert h5["entry/recon/data"].id.get_storage_size() == h5["recon"].id.get_storage_size()  # a link, not a copy


def test_float16_storage_is_bounded_and_recorded(series, result, tmp_path):
    out = tmp_path / "half.h5"
    run(series, out, gpureg.RunOptions(report=False, store_dtype="float16"))
    with h5py.File(out, "r") as h5, h5py.File(result, "r") as ref:
        assert h5["aligned"].dtype == np.float16 and "lossy" in h5["aligned"].attrs["storage_error"]
        exact, half = ref["recon"][...], h5["recon"][...].astype(np.float32)
        # float16's stated bound: 2^-11 relative in its normal range, 2^-25 absolute below it
        assert np.all(np.abs(half - exact) <= np.maximum(np.abs(exact) * 2.0 ** -11, 2.0 ** -25))
        assert json.loads(h5.attrs["parameters"])["store_dtype"] == "float16"
        assert "store_dtype" not in json.loads(ref.attrs["parameters"])  # exact results keep earlier parameters


def test_float16_refuses_values_it_cannot_hold(tmp_path):
    from gpureg.io.results.nexus import check_storable

    with h5py.File(tmp_path / "h.h5", "w") as h5:
        ds = h5.create_dataset("v", shape=(4,), dtype="f2")
        check_storable(ds, np.array([1.0, -65000.0, np.nan], np.float32), "recon at 1 eV")
        with pytest.raises(ValueError, match="recon at 1 eV: a value of 70000 does not fit"):
            check_storable(ds, np.array([70000.0], np.float32), "recon at 1 eV")


def test_ome_zarr_export_has_levels_scale_and_maps(result, tmp_path):
    zarr = pytest.importorskip("zarr")
    from gpureg.pipeline.export import export_zarr

    out = export_zarr(result, tmp_path / "out.zarr")
    root = zarr.open_group(str(out), mode="r")
    ms = root.attrs["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["energy", "z", "y", "x"]
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 0.05, 0.05, 0.05]
    assert ms["datasets"][1]["coordinateTransformations"][0]["scale"] == [1.0, 0.1, 0.1, 0.1]
    with ResultFile(result) as r:
        aligned = r.stack("aligned")[...]
        edge = r.xanes()["edge_energy"]
    assert np.array_equal(root["0"][...], aligned)
    assert np.allclose(root["1"][2], aligned[2].reshape(16, 2, 16, 2, 16, 2).mean(axis=(1, 3, 5)), atol=1e-6)
    assert np.array_equal(root["maps/edge_energy/0"][...], edge, equal_nan=True)
    assert root["labels/particles/0"][...].max() >= 2
    with pytest.raises(ValueError, match="exists"):
        export_zarr(result, out)
    assert export_zarr(result, out, overwrite=True) == out  # an OME-Zarr is replaced with overwrite
    folder = tmp_path / "scans"  # anything else is not, even with overwrite: a mistyped name loses no data
    folder.mkdir()
    (folder / "scan.h5").write_bytes(b"data")
    with pytest.raises(ValueError, match="is not a Zarr folder"):
        export_zarr(result, folder, overwrite=True)
    with pytest.raises(ValueError, match="is not a Zarr folder"):
        export_zarr(result, folder / "scan.h5", overwrite=True)
    assert (folder / "scan.h5").read_bytes() == b"data"


def test_report_says_how_stacks_are_stored_and_that_writing_overlapped(series, tmp_path):
    res = run(series, tmp_path / "rep.h5", gpureg.RunOptions(store_dtype="float16"))
    report = (res.report_dir / "report.md").read_text()
    summary = json.loads((res.report_dir / "summary.json").read_text())
    assert "/aligned stored as float16 (lossy" in report and "compression blosc2-zstd:1" in report
    assert "written in the background" in report
    assert summary["storage"]["recon"]["store_dtype"] == "float16"
    assert summary["background_write_s"]["write_busy_s"] > 0


def test_missing_filter_plugin_is_a_clear_error(monkeypatch):
    import sys

    from gpureg.io.results.compression import FilterUnavailableError, register_filters

    monkeypatch.setitem(sys.modules, "hdf5plugin", None)  # what an install without the plugin sees
    with pytest.raises(FilterUnavailableError, match="pip install hdf5plugin"):
        register_filters()
    with pytest.raises(FilterUnavailableError, match="hdf5plugin"):
        dataset_filter("blosc2-zstd:1")
    assert dataset_filter("gzip:1")["compression"] == "gzip"  # gzip needs no plugin
