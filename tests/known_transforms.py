"""Known affine transforms shared by the CPU and GPU registration tests (64^3 grid)."""

import numpy as np
from scipy import ndimage

from gpureg.core import transform as tf

SHAPE = (64, 64, 64)
C = tf.grid_center(SHAPE)


def affine(angle=0.0, axis=(1, 1, 0.5), scale=1.0, shear=0.0, shift=(0, 0, 0), center=C):
    """Rotation (deg, about ``axis``), scale and shear about ``center``, then a shift (voxels)."""
    m = tf.compose(tf.rotation_matrix(angle, axis, center), tf.scale_matrix(scale, center))
    if shear:
        sh = np.eye(4)
        sh[0, 1] = sh[1, 2] = shear
        sh[:3, 3] = center - sh[:3, :3] @ center
        m = m @ sh
    m[:3, 3] += shift
    return m


CASES = {
    "translation": affine(shift=(8.0, -6.0, 5.0)),
    "rotation": affine(angle=10.0),
    "scale": affine(scale=(1.1, 0.9, 1.05)),
    "shear": affine(shear=0.05),
    "combined": affine(angle=6.0, axis=(0.3, 1, 1), scale=(1.04, 0.96, 1.02), shear=0.03, shift=(3.0, -4.0, 2.5)),
}


def assert_resampled_like_scipy(out, volume, matrix, out_shape, cval, atol, *, crosses_faces=True):
    """``out`` equals ``scipy.ndimage.affine_transform(volume, matrix, order=1, cval=cval)`` within ``atol``.

    Samples within 1e-4 voxel of a face of ``volume`` are left out (inside or outside is a
    rounding question there); ``crosses_faces`` also asserts that the case has voxels outside.
    """
    ref = ndimage.affine_transform(np.asarray(volume, dtype=np.float64), matrix[:3, :3], offset=matrix[:3, 3],
                                   output_shape=out_shape, order=1, mode="constant", cval=cval)
    q = np.stack(np.indices(out_shape), -1).reshape(-1, 3) @ matrix[:3, :3].T + matrix[:3, 3]
    n = np.asarray(volume.shape)
    near_face = np.any((np.abs(q) < 1e-4) | (np.abs(q - (n - 1)) < 1e-4), axis=1).reshape(out_shape)
    if crosses_faces:
        assert 0 < (ref == cval).sum() < ref.size  # the case crosses the volume's faces
    np.testing.assert_allclose(np.asarray(out)[~near_face], ref[~near_face], rtol=0, atol=atol)


def relative_motion_series(folder, energies, size=48):
    """Reconstructed volumes (no FBP) in ``folder/recon.h5``: sample drift/tilt plus particle 2 turning and
    shifting, both growing away from the reference (highest) energy; grey levels follow an absorption edge at
    6550 eV. Returns ``(path, truths, labels)``, ``truths[i] = {1: M1, 2: M2}``."""
    import gpureg
    from gpureg.io import write_dataexchange
    from gpureg.synth.phantom import PARTICLES

    shape = (size,) * 3
    c = tf.grid_center(shape)
    c2 = c + np.asarray(PARTICLES[1]["center"]) * size / 2
    truths, vols = [], []
    for k, e in enumerate(energies):
        a = (len(energies) - 1 - k) / (len(energies) - 1)
        m = tf.rotation_matrix(2.0 * a, (0.2, 1, 0.4), c)
        m[:3, 3] += np.array([1.5, -2.0, 1.0]) * a
        rel = tf.rotation_matrix(4.0 * a, (1, 0, 0), c2)
        rel[:3, 3] += np.array([2.5, 0.0, 0.0]) * a
        truths.append({1: m, 2: m @ rel})
        step = 0.3 + 0.7 / (1 + np.exp(-(e - 6550.0) / 2.0))
        vols.append(gpureg.two_particle_phantom(shape, m, per_particle={2: m @ rel}) * step)
    path = write_dataexchange(folder / "recon.h5", recon=vols, energy=energies)
    _, labels = gpureg.two_particle_phantom(shape, return_labels=True)
    return path, truths, labels
