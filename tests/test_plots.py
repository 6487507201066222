"""Every figure writes a PNG of the expected pixel size with real content.

"Real content" is checked on the pixels: a blank or single-colour figure
fails (grey-level spread, number of distinct colours, and colours the figure
must contain, e.g. the Canny overlay's magenta/green edges).
"""

import numpy as np
import pytest

from gpureg import plots
from gpureg.phantom import two_particle_phantom
from gpureg.transform import apply_affine, matrix_from_params

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
