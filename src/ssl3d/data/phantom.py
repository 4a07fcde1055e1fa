"""Procedural abdominal CT phantoms: the dataset of the demo tier.

Why: the demo tier must run end to end in CI and on a laptop, where no real dataset can be downloaded (size,
licences, no network). This module synthesises abdomen-like CT volumes in Hounsfield units (HU) with organ labels
and writes them in the MSD / nnU-Net layout, so they go through exactly the loader, reorientation and
preprocessing that real datasets go through.

Anatomy (patient supine; built in RAS voxel order, i.e. increasing axis 0 = towards the patient's right, axis 1 =
anterior, axis 2 = superior):

* air (-1000 HU) around an elliptical body whose size, eccentricity and centre vary per case and slowly along z;
  a subcutaneous fat layer (-100 HU), a muscle wall (+45 HU) and visceral fat (-90 HU) inside;
* unlabelled structures: vertebral body and spinous process (bone, +500 HU), spinal canal, paraspinal muscles,
  inferior vena cava (+120 HU), bowel loops (+25 HU) with gas bubbles;
* six labelled organs (``LABELS``): liver (largest; right, upper), spleen (left, posterior), kidneys (posterior,
  both sides of the spine, bean-shaped with a brighter cortex), stomach (left, anterior; wall, fluid content and
  often an anterior gas pocket), aorta (a tube left-anterior of the spine along z).

Organs are ellipsoids (two for the liver) with random centre, radii and rotation, warped by a smooth random
displacement and a smooth radial perturbation. They are painted in a fixed order, later ones over earlier ones, so
they never overlap and the label map is what was painted last; all are kept inside the abdominal cavity and away
from the first and last slices. The anatomy is laid out relative to the body outline, which is scaled to the field
of view: at the default grid (96 x 96 x 48 voxels of 1.6 x 1.6 x 3.0 mm) the whole abdomen is about 40 % of real
size. Appearance: smooth correlated texture, a partial-volume blur, white acquisition noise, int16 HU.

On disk the volumes are LPS (as CT converted from DICOM often is) so that reorientation downstream is exercised:
``nibabel.as_closest_canonical`` recovers the RAS arrays exactly.
"""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage
from tqdm.auto import tqdm

from ssl3d.io import atomic_path, write_json

LABELS: dict[int, str] = {0: "background", 1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "liver",
                          5: "stomach", 6: "aorta"}
_LABEL_ID = {name: label_id for label_id, name in LABELS.items()}

MIN_SHAPE = (48, 48, 24)  # smaller grids cannot resolve the kidneys and the aorta
_Z_MARGIN = 2  # organs stay at least this many slices away from the first and last slice

_HU = {
    "air": -1000.0, "subcutaneous_fat": -100.0, "muscle": 45.0, "visceral_fat": -90.0, "bone": 500.0,
    "csf": 15.0, "bowel": 25.0, "ivc": 120.0, "liver": 60.0, "spleen": 50.0, "kidney_cortex": 170.0,
    "kidney_medulla": 125.0, "stomach_wall": 40.0, "stomach_content": 10.0, "aorta": 200.0,
}


# ---------------------------------------------------------------------------------------------------------------
# public API


def make_phantom(seed: int, shape: tuple[int, int, int] = (96, 96, 48),
                 spacing: tuple[float, float, float] = (1.6, 1.6, 3.0)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One phantom case: (image int16 HU, label uint8, affine 4x4 float64), on-disk LPS orientation.

    Deterministic in ``seed`` (a non-negative integer); ``shape`` in voxels (at least ``MIN_SHAPE``), ``spacing`` in mm.
    """
    _check_seed(seed)
    shape, spacing = _check_shape(shape), _check_spacing(spacing)
    rng = np.random.default_rng(seed)
    image, label = _phantom_ras(rng, shape, spacing)
    return np.ascontiguousarray(image[::-1, ::-1]), np.ascontiguousarray(label[::-1, ::-1]), _lps_affine(shape, spacing)


def write_phantom_dataset(out_dir, n_labelled: int, n_unlabelled: int, seed: int, shape=(96, 96, 48),
                          spacing=(1.6, 1.6, 3.0)) -> Path:
    """Write an MSD-layout phantom dataset into ``out_dir``; return the path of its ``dataset.json``.

    Labelled cases go to ``imagesTr``/``labelsTr``, the unlabelled pool (for pre-training) to ``imagesTs``, numbered
    on after the labelled ones. Case k is ``make_phantom(case_seed(seed, k), ...)``, so it does not depend on how
    many cases are written. ``dataset.json`` is written last: it marks a complete dataset.
    """
    _check_count("n_labelled", n_labelled)
    _check_count("n_unlabelled", n_unlabelled)
    if n_labelled + n_unlabelled == 0:
        raise ValueError("n_labelled + n_unlabelled must be at least 1 (got 0 cases to write)")
    _check_seed(seed)
    shape, spacing = _check_shape(shape), _check_spacing(spacing)

    out_dir = Path(out_dir)
    dataset_json = out_dir / "dataset.json"
    dataset_json.unlink(missing_ok=True)  # a stale marker must not vouch for a half-rewritten dataset
    n_cases = n_labelled + n_unlabelled
    width = max(3, len(str(n_cases - 1)))
    training, test = [], []
    for k in tqdm(range(n_cases), desc="phantoms", unit="case"):
        image, label, affine = make_phantom(case_seed(seed, k), shape, spacing)
        name = f"phantom_{k:0{width}d}.nii.gz"
        if k < n_labelled:
            _save_nifti(out_dir / "imagesTr" / name, image, affine)
            _save_nifti(out_dir / "labelsTr" / name, label, affine)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            _save_nifti(out_dir / "imagesTs" / name, image, affine)
            test.append(f"./imagesTs/{name}")

    write_json(dataset_json, {
        "name": "phantom",
        "description": "Synthetic abdominal CT phantoms (HU) with six organ labels, for the demo tier",
        "reference": "ssl3d procedural CT phantom",
        "licence": "CC0-1.0 (synthetic)",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {str(label_id): name for label_id, name in LABELS.items()},
        "numTraining": n_labelled,
        "numTest": n_unlabelled,
        "training": training,
        "test": test,
        "generator": {"seed": int(seed), "shape": list(shape), "spacing": list(spacing)},
    })
    return dataset_json


def case_seed(seed: int, k: int) -> int:
    """The ``make_phantom`` seed of case ``k`` of a dataset generated with ``seed``."""
    return int(np.random.SeedSequence([seed, k]).generate_state(1, dtype=np.uint64)[0])


# ---------------------------------------------------------------------------------------------------------------
# argument checks


def _check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")


def _check_shape(shape) -> tuple[int, int, int]:
    try:
        shape = tuple(shape)
        valid = len(shape) == 3 and all(int(n) == n and n >= m for n, m in zip(shape, MIN_SHAPE))
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"shape must be 3 integers of at least {MIN_SHAPE} voxels (smaller grids cannot hold the "
                         f"anatomy), got {shape!r}")
    return tuple(int(n) for n in shape)


def _check_spacing(spacing) -> tuple[float, float, float]:
    try:
        spacing = tuple(float(s) for s in spacing)
        valid = len(spacing) == 3 and all(math.isfinite(s) and s > 0 for s in spacing)
    except (TypeError, ValueError):
        valid = False
    if not valid:
        raise ValueError(f"spacing must be 3 positive finite voxel sizes in mm, got {spacing!r}")
    return spacing


# ---------------------------------------------------------------------------------------------------------------
# geometry helpers


def _smooth_noise(rng: np.random.Generator, shape, coarse) -> np.ndarray:
    """Unit-variance random field on ``shape``: white noise on the ``coarse`` grid, smoothly interpolated.

    The interpolation is a row-normalised Gaussian of one coarse cell, applied one axis at a time (a small matrix
    product per axis, much cheaper than spline zooming the whole volume).
    """
    weights = []
    for n, c in zip(shape, coarse):
        w = np.exp(-0.5 * (np.linspace(0, c - 1, n)[:, None] - np.arange(c)) ** 2).astype(np.float32)
        weights.append(w / w.sum(axis=1, keepdims=True))
    field = np.einsum("ai,bj,ck,ijk->abc", *weights, rng.standard_normal(coarse, dtype=np.float32), optimize=True)
    field -= field.mean()
    field /= field.std()
    return field


def _slow_wave(rng: np.random.Generator, t: np.ndarray, amplitude: float) -> np.ndarray:
    """A random sinusoid over ``t`` in [-1, 1] with at most about one period: slow variation along z."""
    return amplitude * np.sin(math.pi * rng.uniform(0.3, 1.0) * t + rng.uniform(0, 2 * math.pi))


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation matrix from angles (radians) about axes 0, 1 and 2, applied in that order."""
    (c0, c1, c2), (s0, s1, s2) = np.cos(angles), np.sin(angles)
    r0 = np.array([[1, 0, 0], [0, c0, -s0], [0, s0, c0]])
    r1 = np.array([[c1, 0, s1], [0, 1, 0], [-s1, 0, c1]])
    r2 = np.array([[c2, -s2, 0], [s2, c2, 0], [0, 0, 1]])
    return r2 @ r1 @ r0


def _local(p: np.ndarray, centre, angles) -> np.ndarray:
    """Coordinates ``p`` (3, X, Y, Z) in the frame of an object at ``centre`` rotated by ``angles``."""
    d = p - np.asarray(centre, dtype=np.float32)[:, None, None, None]
    return (_rotation(np.asarray(angles)).T.astype(np.float32) @ d.reshape(3, -1)).reshape(p.shape)


def _radius(local: np.ndarray, radii, offset=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Normalised ellipsoid radius: < 1 inside the ellipsoid with ``radii`` centred at ``offset`` (local frame)."""
    radii, offset = np.asarray(radii, dtype=np.float32), np.asarray(offset, dtype=np.float32)
    return np.sqrt(sum(((local[i] - offset[i]) / radii[i]) ** 2 for i in range(3)))


def _draw(rng: np.random.Generator, centre, radii, angles_deg=(0.0, 0.0, 0.0), shift=0.05, scale=0.15,
          turn_deg=(8.0, 8.0, 15.0)):
    """Randomise an organ's nominal centre, radii and rotation (degrees); return them with angles in radians."""
    centre = np.asarray(centre) + rng.uniform(-shift, shift, 3)
    radii = np.asarray(radii) * rng.uniform(1 - scale, 1 + scale, 3)
    angles = np.radians(np.asarray(angles_deg) + rng.uniform(-1, 1, 3) * np.asarray(turn_deg))
    return centre, radii, angles


def _lps_affine(shape, spacing) -> np.ndarray:
    """Voxel-to-world affine of the LPS-ordered arrays, with the volume centre at the world origin."""
    (nx, ny, nz), (sx, sy, sz) = shape, spacing
    affine = np.diag([-sx, -sy, sz, 1.0])
    affine[:3, 3] = [sx * (nx - 1) / 2, sy * (ny - 1) / 2, -sz * (nz - 1) / 2]
    return affine


# ---------------------------------------------------------------------------------------------------------------
# the phantom


def _phantom_ras(rng: np.random.Generator, shape, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Image (int16 HU) and label (uint8) in RAS voxel order."""
    u, aspect = _body_coordinates(rng, shape, spacing)
    image = np.full(shape, _HU["air"], dtype=np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    w, cavity, inner = _paint_body_wall(rng, image, u)
    organ_space = cavity.copy()
    organ_space[..., :_Z_MARGIN] = organ_space[..., -_Z_MARGIN:] = False

    p = w + 0.04 * np.stack([_smooth_noise(rng, shape, (6, 6, 4)) for _ in range(3)])  # smooth warp
    wobble = _smooth_noise(rng, shape, (7, 7, 5))  # radial perturbation of every organ surface
    _paint_liver(rng, image, label, p, wobble, organ_space)
    _paint_stomach(rng, image, label, p, wobble, organ_space)
    _paint_spleen(rng, image, label, p, wobble, organ_space)
    for side in (+1, -1):
        _paint_kidney(rng, image, label, p, wobble, organ_space, side)
    _paint_vessels(rng, image, label, p, aspect, organ_space)
    _paint_bowel(rng, image, label, p, cavity)
    _paint_spine(rng, image, label, w, aspect, inner)
    return _acquire(rng, image, u, spacing), label


def _body_coordinates(rng: np.random.Generator, shape, spacing) -> tuple[np.ndarray, float]:
    """Body-relative coordinates u (3, X, Y, Z), float32, and the body's aspect ratio (width / depth).

    u0 and u1 are scaled by the body's semi-axes at each slice (the body outline is u0^2 + u1^2 = 1); u2 runs from
    -1 (first slice) to +1 (last slice).
    """
    (nx, ny, nz), (sx, sy, _) = shape, spacing
    half_x, half_y = nx * sx / 2, ny * sy / 2
    width = rng.uniform(0.78, 0.88) * half_x
    depth = min(rng.uniform(0.68, 0.85) * width, 0.85 * half_y)
    t = ((np.arange(nz) - (nz - 1) / 2) / (nz / 2)).astype(np.float32)
    semi_x = width * (1 + _slow_wave(rng, t, 0.05))
    semi_y = depth * (1 + _slow_wave(rng, t, 0.05))
    centre_x = rng.uniform(-0.04, 0.04) * half_x + _slow_wave(rng, t, 0.02 * half_x)
    centre_y = rng.uniform(-0.04, 0.04) * half_y + _slow_wave(rng, t, 0.02 * half_y)
    x = ((np.arange(nx) - (nx - 1) / 2) * sx)[:, None, None]
    y = ((np.arange(ny) - (ny - 1) / 2) * sy)[None, :, None]
    u = np.empty((3, *shape), dtype=np.float32)
    u[0] = (x - centre_x) / semi_x
    u[1] = (y - centre_y) / semi_y
    u[2] = t
    return u, width / depth


def _paint_body_wall(rng, image, u):
    """Paint subcutaneous fat, muscle wall and visceral fat.

    Returns the cavity coordinates w (u scaled so the cavity outline is w0^2 + w1^2 = 1), the cavity mask and the
    mask inside the subcutaneous fat.
    """
    rho = np.hypot(u[0], u[1])
    fat, muscle = rng.uniform(0.05, 0.14), rng.uniform(0.04, 0.07)
    wall = rho + 0.015 * _smooth_noise(rng, rho.shape, (8, 8, 4))
    cavity_radius = 1 - fat - muscle
    inner, cavity = wall < 1 - fat, wall < cavity_radius
    image[rho < 1] = _HU["subcutaneous_fat"]
    image[inner] = _HU["muscle"]
    image[cavity] = _HU["visceral_fat"]
    w = u.copy()
    w[:2] /= cavity_radius
    return w, cavity, inner


def _paint(image, label, mask, hu, label_id: int = 0) -> None:
    """Paint ``hu`` (a number or a full-size array) and ``label_id`` over ``mask``, over whatever was there."""
    image[mask] = hu if np.isscalar(hu) else hu[mask]
    label[mask] = label_id


def _organ_hu(rng, tissue: str) -> float:
    """The tissue's nominal HU with a per-case offset (contrast timing, patient)."""
    return _HU[tissue] + rng.uniform(-8, 8)


def _paint_bowel(rng, image, label, p, cavity) -> None:
    """Bowel loops (unlabelled soft tissue) in the visceral fat left over in the mid and anterior cavity.

    Gas bubbles stay two voxels away from the organs (a bowel wall), so no organ borders gas directly.
    """
    fat = cavity & (image == _HU["visceral_fat"])
    anterior = 2.5 * p[1]  # bowel lies mostly anterior, rarely beside the spine
    loops = fat & (_smooth_noise(rng, image.shape, (14, 14, 9)) + anterior > rng.uniform(0.3, 0.9))
    gas = loops & (_smooth_noise(rng, image.shape, (18, 18, 10)) > 1.5)
    gas &= ~ndimage.binary_dilation(label > 0, iterations=2)
    image[loops] = _organ_hu(rng, "bowel")
    image[gas] = _HU["air"]


def _paint_liver(rng, image, label, p, wobble, space) -> None:
    """Liver: a right lobe (patient's right, upper abdomen) and a smaller left lobe crossing the midline anteriorly."""
    right = _draw(rng, (0.45, 0.0, 0.3), (0.55, 0.7, 0.48))
    left = _draw(rng, (0.0, 0.5, 0.45), (0.38, 0.25, 0.28))
    radius = np.minimum(*(_radius(_local(p, centre, angles), radii) for centre, radii, angles in (right, left)))
    _paint(image, label, space & (radius + 0.15 * wobble < 1), _organ_hu(rng, "liver"), _LABEL_ID["liver"])


def _paint_stomach(rng, image, label, p, wobble, space) -> None:
    """Stomach (left, anterior): wall, fluid content and, in most cases, a gas pocket on the anterior side."""
    centre, radii, angles = _draw(rng, (-0.38, 0.3, 0.3), (0.28, 0.26, 0.32), turn_deg=(10, 10, 25))
    radius = _radius(_local(p, centre, angles), radii) + 0.12 * wobble
    stomach = space & (radius < 1)
    hu = np.where(radius > 0.78, _organ_hu(rng, "stomach_wall"), _organ_hu(rng, "stomach_content"))
    if rng.random() < 0.7:
        gas_level = centre[1] + radii[1] * rng.uniform(0.45, 0.7)
        hu[(radius < 0.78) & (p[1] > gas_level)] = _HU["air"]
    _paint(image, label, stomach, hu, _LABEL_ID["stomach"])


def _paint_spleen(rng, image, label, p, wobble, space) -> None:
    """Spleen: a flattened ellipsoid against the left posterolateral wall, thin along the radial direction."""
    nominal = (-0.62, -0.35, 0.4)
    centre, radii, angles = _draw(rng, nominal, (0.14, 0.36, 0.28),
                                  angles_deg=(0, 0, math.degrees(math.atan2(nominal[1], nominal[0]))))
    radius = _radius(_local(p, centre, angles), radii) + 0.12 * wobble
    _paint(image, label, space & (radius < 1), _organ_hu(rng, "spleen"), _LABEL_ID["spleen"])


def _paint_kidney(rng, image, label, p, wobble, space, side: int) -> None:
    """Kidney beside the spine (side +1: patient's right), bean-shaped: the hilum notch faces anteromedially.

    The cortex (outer shell) is brighter than the medulla; the notch is renal-sinus fat.
    """
    name = "kidney_right" if side > 0 else "kidney_left"
    nominal = (0.45 * side, -0.48, -0.3 if side > 0 else -0.2)  # the right kidney sits lower
    centre, radii, angles = _draw(rng, nominal, (0.24, 0.15, 0.32), angles_deg=(0, 0, 45 * side))
    local = _local(p, centre, angles)
    radius = _radius(local, radii) + 0.1 * wobble
    notch = _radius(local, radii * (0.4, 0.5, 0.45), offset=(0, 0.85 * radii[1], 0)) < 1
    kidney = space & (radius < 1)
    hu = np.where(radius > 0.6, _organ_hu(rng, "kidney_cortex"), _organ_hu(rng, "kidney_medulla"))
    _paint(image, label, kidney & ~notch, hu, _LABEL_ID[name])
    _paint(image, label, kidney & notch, _HU["visceral_fat"])


def _tube(p, centre, radii, half_length: float, bend: np.ndarray) -> np.ndarray:
    """A vessel along z: elliptical cross-section, centre line bent by ``bend`` along axis 0, rounded ends."""
    return (((p[0] - centre[0] - bend) / radii[0]) ** 2 + ((p[1] - centre[1]) / radii[1]) ** 2
            + (p[2] / half_length) ** 8) < 1


def _paint_vessels(rng, image, label, p, aspect, space) -> None:
    """Aorta (labelled; left-anterior of the spine) and inferior vena cava (unlabelled; right of the aorta)."""
    bend = _slow_wave(rng, p[2], 0.04)
    half_length = rng.uniform(0.8, 0.88)
    aorta_radius = rng.uniform(0.09, 0.12)
    aorta = _tube(p, (-0.1 + rng.uniform(-0.03, 0.03), -0.3 + rng.uniform(-0.03, 0.03)),
                  (aorta_radius, aorta_radius * aspect), half_length, bend)
    ivc = _tube(p, (0.13, -0.28), (0.08, 0.05 * aspect), half_length, bend)
    _paint(image, label, space & aorta, _organ_hu(rng, "aorta"), _LABEL_ID["aorta"])
    _paint(image, label, space & ivc, _organ_hu(rng, "ivc"))


def _paint_spine(rng, image, label, w, aspect, inner) -> None:
    """Vertebral body, spinal canal, spinous process and paraspinal muscles (unlabelled), on the posterior midline."""
    r_body = rng.uniform(0.15, 0.18)
    y_body = -0.7 + rng.uniform(-0.04, 0.04)
    y_canal = y_body - 1.5 * r_body * aspect

    def ellipse(x0, y0, rx, ry):
        return inner & (((w[0] - x0) / rx) ** 2 + ((w[1] - y0) / (ry * aspect)) ** 2 < 1)

    bone = _organ_hu(rng, "bone")
    for side in (+1, -1):
        _paint(image, label, ellipse(0.27 * side, y_canal, 0.2, 0.15), _HU["muscle"])
    _paint(image, label, ellipse(0, y_body, r_body, r_body), bone)
    _paint(image, label, ellipse(0, y_canal - 0.12, 0.05, 0.12), bone)
    _paint(image, label, ellipse(0, y_canal, 0.06, 0.05), _HU["csf"])


def _acquire(rng, image, u, spacing) -> np.ndarray:
    """Texture, partial-volume blur, acquisition noise; rounded to int16 HU in [-1024, 3071]."""
    texture = ndimage.gaussian_filter(rng.standard_normal(image.shape, dtype=np.float32), 1.2)
    body = np.hypot(u[0], u[1]) < 1
    image[body] += rng.uniform(4, 10) * (texture[body] / texture.std())
    sigma = 0.8 * min(spacing) / np.asarray(spacing)
    image = ndimage.gaussian_filter(image, sigma)
    image += rng.normal(0, rng.uniform(10, 20), image.shape).astype(np.float32)
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16)


def _save_nifti(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
