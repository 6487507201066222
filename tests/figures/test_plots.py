"""Every figure writes a PNG of the expected pixel size with real content.

"Real content" is checked on the pixels: a blank or single-colour figure
fails (grey-level spread, number of distinct colours, and colours the figure
must contain, e.g. the Canny overlay's magenta/green edges).
"""

import numpy as np
import pytest

from gpureg.io.results import write_result_file
from gpureg import figures as plots
from gpureg.synth.phantom import two_particle_phantom
from gpureg.core.transform import apply_affine, matrix_from_params

PIL = pytest.importorskip("PIL.Image")


def _read_png(path):
    with PIL.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB")).astype(np.int16)


def _assert_figure(path, size, *, min_colours=50, min_std=20.0, min_ink=0.02):
    """PNG exists, is ``size`` (w, h) pixels, and is not blank."""
    assert path.exists() and path.stat().st_size > 2000
    rgb = _read_png(path)
    assert (rgb.shape[1], rgb.shape[0]) == size
    grey = rgb.mean(axis=2)
    ink = float((grey < 240).mean())          # fraction of non-white pixels
    colours = len(np.unique(rgb.reshape(-1, 3) // 8, axis=0))
    assert grey.std() > min_std, f"grey std {grey.std():.1f}: figure looks blank"
    assert ink > min_ink, f"only {ink:.3f} of the pixels are drawn"
    assert colours >= min_colours, f"only {colours} distinct colours"
    return rgb


def _count_colour(rgb, colour, tol=40):
    return int((np.abs(rgb - np.asarray(colour)).max(axis=2) < tol).sum())


@pytest.fixture(scope="module")
def slices():
    fixed = two_particle_phantom((24, 48, 48), seed=3)
    shift = matrix_from_params(np.r_[np.zeros(9), 0.0, 2.5, -2.0], (np.asarray(fixed.shape) - 1) / 2)
    moving = two_particle_phantom((24, 48, 48), shift, seed=3)
    return fixed[12], moving[12], apply_affine(moving, shift)[12]


def test_canny_overlay_png(tmp_path, slices):
    ref, before, after = slices
    out = plots.canny_overlay(ref, after, tmp_path / "canny.png")
    rgb = _assert_figure(out, (640, 560), min_colours=20)
    # Aligned contours coincide with the reference: yellow "both" pixels, hardly any green-only ones.
    assert _count_colour(rgb, (255, 255, 0)) > 5 * _count_colour(rgb, (0, 255, 0))
    out2 = plots.canny_overlay(ref, before, tmp_path / "canny_before.png")
    rgb2 = _assert_figure(out2, (640, 560), min_colours=20)
    # Misaligned pair: many magenta and green edge pixels.
    assert _count_colour(rgb2, (255, 0, 255)) > 20
    assert _count_colour(rgb2, (0, 255, 0)) > _count_colour(rgb, (0, 255, 0))


def test_canny_overlay_bad_inputs(tmp_path, slices):
    ref, _, after = slices
    with pytest.raises(ValueError, match="same shape"):
        plots.canny_overlay(ref, after[:-1], tmp_path / "x.png")
    with pytest.raises(ValueError, match="2D"):
        plots.canny_overlay(ref[None], after[None], tmp_path / "x.png")
    with pytest.raises(ValueError, match="does not exist"):
        plots.canny_overlay(ref, after, tmp_path / "missing" / "x.png")


def test_mse_per_energy_png(tmp_path):
    e = np.linspace(6480, 6710, 30)
    before = 0.02 + 0.01 * np.abs(np.sin(e / 17))
    after = before / 20
    after[-1] = before[-1] = 0.0                # the reference energy
    rgb = _assert_figure(plots.mse_per_energy(e, before, after, tmp_path / "mse.png"), (640, 400), min_colours=20)
    assert _count_colour(rgb, (214, 39, 40)) > 50       # tab:red line (before)
    assert _count_colour(rgb, (31, 119, 180)) > 50      # tab:blue line (after)
    with pytest.raises(ValueError, match="same length"):
        plots.mse_per_energy(e, before[:-1], after, tmp_path / "bad.png")


# ----------------------------------------------------------------------------- XANES figures

@pytest.fixture(scope="module")
def xanes_maps():
    from gpureg import xanes

    energies = xanes.scan_energies()
    density, truth = two_particle_phantom((24, 40, 40), seed=2, return_labels=True)
    e0 = np.where(truth == 2, 6551.0, 6542.0) + 0.2 * (np.arange(40)[None, None, :] - 20)
    stack = xanes.synthetic_spectra(energies, e0) * density[None]
    maps = xanes.edge_energy(stack, energies)
    return energies, stack, maps, truth.astype(np.int32)


def test_edge_energy_slice_png(tmp_path, xanes_maps):
    energies, stack, maps, _ = xanes_maps
    rgb = _assert_figure(plots.edge_energy_slice(maps["edge_energy"], tmp_path / "s.png", background=stack[-1]),
                         (640, 520), min_colours=30)
    # viridis spans dark purple (6542 eV particle) to yellow (6551 eV particle).
    assert _count_colour(rgb, (253, 231, 37), tol=60) > 20
    assert _count_colour(rgb, (68, 1, 84), tol=60) > 20
    with pytest.raises(ValueError, match="outside"):
        plots.edge_energy_slice(maps["edge_energy"], tmp_path / "x.png", index=99)


def test_orthogonal_slices_png(tmp_path, xanes_maps):
    _, _, maps, _ = xanes_maps
    _assert_figure(plots.orthogonal_slices(maps["edge_energy"], tmp_path / "o.png"), (1200, 440), min_colours=30)
    with pytest.raises(ValueError, match="3D"):
        plots.orthogonal_slices(maps["edge_energy"][0], tmp_path / "x.png")


def test_edge_energy_3d_png(tmp_path, xanes_maps):
    _, _, maps, _ = xanes_maps
    _assert_figure(plots.edge_energy_3d(maps["edge_energy"], tmp_path / "3d.png", max_points=3000), (720, 600),
                   min_colours=30)
    with pytest.raises(ValueError, match="no finite voxel"):
        plots.edge_energy_3d(np.full((4, 4, 4), np.nan), tmp_path / "x.png")


def test_roi_spectra_png(tmp_path, xanes_maps):
    from gpureg import xanes

    energies, stack, _, labels = xanes_maps
    roi = xanes.roi_spectra(stack, energies, labels)
    rgb = _assert_figure(plots.roi_spectra(roi, tmp_path / "r.png"), (1100, 440), min_colours=20, min_std=10)
    assert _count_colour(rgb, (31, 119, 180)) > 100 and _count_colour(rgb, (255, 127, 14)) > 100   # two regions
    with pytest.raises(ValueError, match="missing"):
        plots.roi_spectra({"energy": energies}, tmp_path / "x.png")


def test_edge_distributions_png(tmp_path, xanes_maps):
    from gpureg import xanes

    _, _, maps, labels = xanes_maps
    dist = xanes.edge_distribution(maps["edge_energy"], labels)
    rgb = _assert_figure(plots.edge_distributions(dist, tmp_path / "d.png"), (640, 440), min_colours=20, min_std=10)
    assert _count_colour(rgb, (31, 119, 180)) > 100 and _count_colour(rgb, (255, 127, 14)) > 100


def test_squared_difference_png(tmp_path, slices):
    ref, before, after = slices
    rgb = _assert_figure(plots.squared_difference(ref, before, after, tmp_path / "sq.png"), (1000, 440),
                         min_colours=20, min_std=10)
    # Left (before) panel is brighter than the right (after) one: the residual shrinks.
    grey = rgb.mean(axis=2)
    assert grey[80:400, 100:440].mean() > grey[80:400, 540:880].mean() + 3
    with pytest.raises(ValueError, match="same shape"):
        plots.squared_difference(ref, before[:-1], after, tmp_path / "x.png")


# ----------------------------------------------------------------------------- whole result file + CLI

@pytest.fixture(scope="module")
def result_h5(tmp_path_factory, xanes_maps, slices):
    from gpureg import xanes

    energies, stack, maps, labels = xanes_maps
    shifted = np.roll(stack, 3, axis=3)
    mse = (((shifted - stack[-1]) ** 2).mean(axis=(1, 2, 3)), ((stack - stack[-1]) ** 2).mean(axis=(1, 2, 3)))
    return write_result_file(tmp_path_factory.mktemp("res") / "result.h5", energies,
                             stacks={"aligned": stack, "recon": shifted}, mse=mse, maps=maps, labels=labels,
                             roi=xanes.roi_spectra(stack, energies, labels))


def test_plot_result_makes_every_figure(tmp_path, result_h5):
    paths = plots.plot_result(result_h5, tmp_path / "figs", dpi=60)      # sizes in inches x 60
    assert [p.name for p in paths] == ["edge_energy_slice.png", "edge_energy_orthogonal.png", "edge_energy_3d.png",
                                       "edge_distributions.png", "roi_spectra.png", "mse_per_energy.png",
                                       "canny_overlay.png", "squared_difference.png"]
    for p in paths:
        with PIL.open(p) as im:
            size = im.size
        assert size[0] >= 360 and size[1] >= 240
        _assert_figure(p, size, min_colours=15, min_std=10)


def test_plot_result_computes_roi_spectra_from_the_stack(tmp_path, xanes_maps):
    energies, stack, maps, labels = xanes_maps
    # no ROI spectra, recon or registration; no valid edge energy: the map figures are skipped (faster test)
    path = write_result_file(tmp_path / "no_roi.h5", energies, stacks={"aligned": stack},
                             maps={**maps, "mask": np.zeros_like(maps["mask"])}, labels=labels)
    names = [p.name for p in plots.plot_result(path, tmp_path / "f", z=12, dpi=60)]
    assert names == ["roi_spectra.png", "canny_overlay.png"]


def test_plot_result_skips_absent_datasets(tmp_path):
    h5py = pytest.importorskip("h5py")
    path = write_result_file(tmp_path / "only_mse.h5", np.linspace(6500, 6600, 6),
                             mse=(np.linspace(1, 2, 6), np.linspace(0.1, 0.2, 6)))
    assert [p.name for p in plots.plot_result(path, tmp_path / "f")] == ["mse_per_energy.png"]
    empty = tmp_path / "empty.h5"
    h5py.File(empty, "w").close()
    with pytest.raises(ValueError, match="nothing to plot"):
        plots.plot_result(empty, tmp_path / "f2")


def test_cli_plot(tmp_path, capsys):
    h5py = pytest.importorskip("h5py")
    from gpureg.cli import main

    path = tmp_path / "mse.h5"
    with h5py.File(path, "w") as h5:
        h5["registration/mse_before"] = np.linspace(1, 2, 6)
        h5["registration/mse_after"] = np.linspace(0.1, 0.2, 6)
    with pytest.raises(SystemExit) as exc:
        main(["plot", str(path), str(tmp_path / "cli_figs")])
    assert exc.value.code in (0, None)
    assert "1 figure(s) written" in capsys.readouterr().out
    assert (tmp_path / "cli_figs" / "mse_per_energy.png").exists()
    with pytest.raises(SystemExit) as exc:
        main(["plot", str(tmp_path / "nope.h5"), str(tmp_path / "x")])
    assert exc.value.code == 2 and "gpureg: error:" in capsys.readouterr().err
