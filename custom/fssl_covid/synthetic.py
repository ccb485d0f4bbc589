"""Seeded synthetic multi-site 3D chest CT with COVID-19-like lesion masks.

This is the built-in default data of the demo and the tests: no real patient data.  Each site writes NIfTI
volumes in Hounsfield units (int16) and lesion masks (uint8) plus a MONAI decathlon-style ``datalist.json``::

    <out_dir>/<site>/imagesTr/<site>_<kind>_<idx>.nii.gz        kind: train | val | unlabeled | test
    <out_dir>/<site>/labelsTr/<site>_<kind>_<idx>_label.nii.gz  (not written for unlabeled scans)
    <out_dir>/<site>/datalist.json                               keys training/validation/unlabeled/test

A volume holds air, an elliptic body with a subcutaneous fat layer, ribs, a spine, a heart, a trachea, two
lungs with branching vessels and irregular lesions inside the lungs (ground-glass or consolidation, with a
subpleural preference).  Sites differ (domain shift) in voxel spacing, noise, HU calibration, lesion burden and
lesion type, after the multi-national setting of Yang et al. 2021 (federated semi-supervised COVID-19 lesion
segmentation: China, Italy, Japan).  Optionally, real lesion shapes are taken from a folder of MosMedData 3D
masks (``study_*_mask.nii.gz``); those files are only read, never copied.

Everything is seeded: a case's generator depends only on (seed, site name, split, index), so the same seed gives
byte-identical files and sites are independent of each other.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

__all__ = ["SiteSpec", "DEFAULT_SITES", "make_federation", "make_volume", "load_lesion_shapes", "main"]

HU_MIN, HU_MAX = -1024, 3071
# (datalist key, file-name kind, whether a label file is written)
SPLITS = (("training", "train", True), ("validation", "val", True), ("unlabeled", "unlabeled", False),
          ("test", "test", True))
# Lesion shape: (mask in RAS voxel order, voxel spacing in mm).
LesionShape = tuple[np.ndarray, tuple[float, float, float]]


@dataclass
class SiteSpec:
    """One hospital: how many scans of each split it holds and how its scanner renders them."""

    name: str
    n_labeled: int  # labeled training scans -> "training"
    n_validation: int  # labeled validation scans -> "validation"
    n_unlabeled: int  # unlabeled scans (no label file) -> "unlabeled"
    n_test: int  # held-out labeled test scans -> "test"
    spacing: tuple[float, float, float]  # voxel size in mm (x, y, z)
    noise_hu: float  # std of Gaussian noise in HU
    hu_scale: float  # stored = hu_scale * true_hu + hu_offset
    hu_offset: float
    lesion_burden: float  # lesion count/size multiplier
    ggo_fraction: float  # share of ground-glass lesions (rest consolidation)


DEFAULT_SITES: list[SiteSpec] = [
    SiteSpec("china", 6, 3, 6, 3, (1.5, 1.5, 2.5), noise_hu=20.0, hu_scale=1.0, hu_offset=0.0,
             lesion_burden=3.0, ggo_fraction=0.6),
    SiteSpec("italy", 4, 2, 8, 3, (2.0, 2.0, 4.0), noise_hu=35.0, hu_scale=1.05, hu_offset=30.0,
             lesion_burden=4.5, ggo_fraction=0.4),
    SiteSpec("japan", 0, 0, 12, 3, (1.2, 1.2, 3.0), noise_hu=15.0, hu_scale=0.95, hu_offset=-20.0,
             lesion_burden=2.0, ggo_fraction=0.8),
]


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], spacing, feature_mm: float) -> np.ndarray:
    """Noise (std <= 1) varying smoothly over about ``feature_mm``: white noise on a coarse grid, upsampled
    linearly one axis at a time (cheap and exactly reproducible)."""
    out = rng.standard_normal(
        [max(2, int(np.ceil(n * s / feature_mm)) + 1) for n, s in zip(shape, spacing)], dtype=np.float32)
    for axis, n in enumerate(shape):
        pos = np.linspace(0, out.shape[axis] - 1, n, dtype=np.float32)
        lo = np.minimum(pos.astype(int), out.shape[axis] - 2)
        t = (pos - lo).reshape([-1 if a == axis else 1 for a in range(out.ndim)])
        out = np.take(out, lo, axis) * (1 - t) + np.take(out, lo + 1, axis) * t
    return out


def _ellipse_r(x, y, cx, cy, ax, ay):
    """Normalised elliptic radius (1 on the ellipse boundary)."""
    return np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)


class _Phantom:
    """Anatomy of one scan on the site's grid, in true HU, plus the lung mask and a subpleural score."""

    def __init__(self, rng: np.random.Generator, shape, spacing, fov):
        self.shape, self.spacing = shape, np.asarray(spacing, float)
        origin = -(np.asarray(shape) - 1) / 2 * self.spacing
        x = (origin[0] + np.arange(shape[0]) * spacing[0]).astype(np.float32)[:, None, None]
        y = (origin[1] + np.arange(shape[1]) * spacing[1]).astype(np.float32)[None, :, None]
        z = (origin[2] + np.arange(shape[2]) * spacing[2]).astype(np.float32)[None, None, :]
        self.origin = origin
        half_x, half_y, fov_z = fov[0] / 2, fov[1] / 2, fov[2]

        # Body: elliptic cross-section, slowly varying along z, with a subcutaneous fat layer.
        wobble = 1 + 0.03 * np.sin(2 * np.pi * z / fov_z * rng.uniform(0.5, 1.5) + rng.uniform(0, 2 * np.pi))
        a0, b0 = half_x * rng.uniform(0.82, 0.9), half_y * rng.uniform(0.62, 0.7)
        cy = half_y * rng.uniform(-0.06, 0.0)
        fat = rng.uniform(0.06, 0.1) * a0
        ai, bi = a0 - fat, b0 - fat  # inner chest wall at mid-height
        cavity = _ellipse_r(x, y, 0.0, cy, ai * wobble, bi * wobble)  # 1 on the inner chest wall
        hu = np.full(shape, -1000.0, np.float32)
        hu[_ellipse_r(x, y, 0.0, cy, a0 * wobble, b0 * wobble) <= 1] = -100.0
        hu[cavity <= 1] = 40.0

        # Ribs: slanted bands of bone in the chest wall.
        angle = np.abs(np.arctan2(y - cy, x))
        period = fov_z * rng.uniform(0.18, 0.24)
        ribs = (cavity > 0.88) & (cavity < 0.95) & (
            np.sin(2 * np.pi * (z + 25 * angle) / period + rng.uniform(0, 2 * np.pi)) > 0.4)
        hu[ribs] = 600.0

        # Lungs: two ellipsoids flattened against the chest wall, with smooth irregular borders.
        z_c, lz = fov_z * rng.uniform(-0.15, -0.05), fov_z * rng.uniform(0.6, 0.66)
        dz2 = ((z - z_c) / lz) ** 2
        lung_r = np.full(shape, np.inf, np.float32)
        for side in (-1.0, 1.0):
            lx, ly = ai * rng.uniform(0.4, 0.44), bi * rng.uniform(0.78, 0.84)
            cx = side * ai * rng.uniform(0.5, 0.54)
            np.minimum(lung_r, _ellipse_r(x, y, cx, cy - 0.05 * bi, lx, ly) ** 2 + dz2, out=lung_r)
        lung_r = np.sqrt(lung_r) + 0.04 * _smooth_noise(rng, shape, spacing, 40.0)
        lung = (lung_r <= 1) & (cavity < 0.86)

        # Mediastinum: heart (indenting the left lung; patient left is -x in RAS), trachea; spine posterior.
        heart = (_ellipse_r(x, y, -0.15 * ai, cy + 0.2 * bi, 0.38 * ai, 0.42 * bi) ** 2
                 + ((z - z_c + 0.25 * fov_z) / (0.35 * fov_z)) ** 2) <= 1
        trachea = (_ellipse_r(x, y, 0.0, cy + 0.05 * bi, 0.09 * ai, 0.09 * ai) <= 1) & (z > z_c + 0.3 * fov_z)
        ys, rx, ry, rc = cy - 0.55 * bi, 0.13 * ai, 0.14 * bi, 0.06 * bi
        vertebra = _ellipse_r(x, y, 0.0, ys, rx, ry)[..., 0]
        arch = _ellipse_r(x, y, 0.0, ys - ry - rc, rc, rc)[..., 0]
        lung &= ~heart & ~trachea
        lung[(vertebra <= 1.15) | (arch <= 2.0)] = False
        hu[heart] = 40.0
        hu[trachea] = -1000.0
        hu[arch <= 1.8] = 550.0
        hu[arch <= 1.0] = 20.0
        hu[vertebra <= 1] = 700.0
        hu[vertebra <= 0.8] = rng.uniform(350, 450)
        hu[lung] = -850.0 + 20.0 * _smooth_noise(rng, shape, spacing, 4.0)[lung]

        self.hu, self.lung = hu, lung
        # Subpleural score in [0, 1]: close to 1 near the lung border (ellipsoid or chest wall).
        pleura = np.maximum(lung_r, cavity / 0.86)
        self.lung_voxels = np.argwhere(lung)
        self.subpleural_voxels = np.argwhere(lung & (pleura > 0.75))
        self._draw_vessels(rng, ai, cy, z_c, lz)

    def _draw_vessels(self, rng, ai, cy, z_c, lz):
        """Branching, gently curving tubes (0..60 HU) from each hilum, thicker near the hilum."""
        step = 0.5 * float(self.spacing.min())
        points, weights = [], []
        for side in (-1.0, 1.0):
            hilum = np.array([side * 0.2 * ai, cy, z_c + 0.1 * lz])
            stack = []
            for _ in range(rng.integers(6, 10)):
                d = rng.normal(0, 1, 3) * [0.5, 0.8, 1.2] + [side * 1.2, 0, 0]
                stack.append((hilum, d, rng.uniform(0.6, 1.0) * lz, 3.0, 0))
            while stack:
                start, d0, length, w0, depth = stack.pop()
                n = max(2, int(length / step))
                dirs = d0 / np.linalg.norm(d0) + np.cumsum(rng.normal(0, 0.03, (n, 3)), axis=0)
                dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
                path = start + np.cumsum(dirs * step, axis=0)
                w = np.linspace(w0, 0.8 * w0 / (depth + 1), n)
                points.append(path)
                weights.append(w)
                if depth < 2:
                    for k in rng.integers(n // 5, n, rng.integers(1, 4)):
                        child = dirs[k] + rng.normal(0, 0.7, 3)
                        stack.append((path[k], child, length * rng.uniform(0.3, 0.6), w[k] * 0.7, depth + 1))
        idx = np.rint((np.concatenate(points) - self.origin) / self.spacing).astype(int)
        w = np.concatenate(weights).astype(np.float32)
        inside = np.all((idx >= 0) & (idx < self.shape), axis=1)
        idx, w = idx[inside], w[inside]
        keep = self.lung[tuple(idx.T)]
        acc = np.zeros(self.shape, np.float32)
        np.maximum.at(acc, tuple(idx[keep].T), w[keep])
        sigma = 0.9 / self.spacing  # ~1 mm tube profile
        density = ndimage.gaussian_filter(acc, sigma) * (2 * np.pi * sigma[0] * sigma[1])
        vessel = np.clip(density, 0, 1)
        self.hu += vessel * (rng.uniform(0, 60) - self.hu)

    def sample_center(self, rng: np.random.Generator, subpleural: bool) -> np.ndarray:
        """A random lung voxel index, near the pleura when ``subpleural`` (if any such voxel exists)."""
        candidates = self.subpleural_voxels if subpleural and len(self.subpleural_voxels) else self.lung_voxels
        return candidates[rng.integers(len(candidates))]

    def paste_lesion(self, rng: np.random.Generator, mask: np.ndarray, center, hu: float, label: np.ndarray):
        """Paste a lesion mask (HU ``hu`` plus texture) centred at ``center``, into lung voxels only."""
        lo = np.asarray(center) - np.asarray(mask.shape) // 2
        src = tuple(slice(max(0, -o), min(m, n - o)) for o, m, n in zip(lo, mask.shape, self.shape))
        dst = tuple(slice(max(0, o), min(o + m, n)) for o, m, n in zip(lo, mask.shape, self.shape))
        region = mask[src] & self.lung[dst]
        texture = hu + 25.0 * rng.standard_normal(region.shape).astype(np.float32)
        self.hu[dst] = np.where(region, np.maximum(self.hu[dst], texture), self.hu[dst])
        label[dst] |= region


def _blob_lesion(rng: np.random.Generator, radius_mm: float, spacing) -> np.ndarray:
    """Irregular lesion mask: a thresholded sum of a few anisotropic Gaussian blobs plus smooth noise."""
    spacing = np.asarray(spacing, float)
    half = np.ceil(1.8 * radius_mm / spacing).astype(int)
    axes = [(np.arange(-h, h + 1) * s).astype(np.float32) for h, s in zip(half, spacing)]
    field = np.zeros([2 * h + 1 for h in half], np.float32)
    for _ in range(rng.integers(2, 6)):
        offset = rng.normal(0, 0.4 * radius_mm, 3)
        sig = radius_mm * rng.uniform(0.3, 0.65, 3)
        gx, gy, gz = (np.exp(-0.5 * ((ax - o) / s) ** 2) for ax, o, s in zip(axes, offset, sig))
        field += gx[:, None, None] * gy[None, :, None] * gz[None, None, :]
    field += 0.3 * _smooth_noise(rng, field.shape, spacing, 0.4 * radius_mm)
    mask = field > rng.uniform(0.45, 0.6)
    mask[tuple(half)] = True  # the centre always belongs to the lesion, so pasting at a lung voxel labels it
    return mask


def _resample_shape(rng: np.random.Generator, shape: LesionShape, spacing, size_scale: float) -> np.ndarray:
    """Resample a real lesion mask to ``spacing`` (scaled by ``size_scale``), randomly flipped.

    Shape-based interpolation: the in-plane signed distance (mm) of every slice is interpolated linearly, with an
    outside slice of -half the slice thickness above and below, so thick-slice lesions get rounded ends in z.
    """
    mask, src_spacing = shape
    mask = np.pad(np.asarray(mask, bool), ((2, 2), (2, 2), (0, 0)))
    outside = -0.5 * src_spacing[2]
    sdf = np.full((*mask.shape[:2], mask.shape[2] + 2), outside, np.float32)
    for k in range(mask.shape[2]):
        if mask[..., k].any():
            sdf[..., k + 1] = (ndimage.distance_transform_edt(mask[..., k], sampling=src_spacing[:2])
                               - ndimage.distance_transform_edt(~mask[..., k], sampling=src_spacing[:2]))
    zoom = np.asarray(src_spacing) / np.asarray(spacing) * size_scale
    out = ndimage.zoom(sdf, zoom, order=1) > 0
    for axis in range(3):
        if rng.random() < 0.5:
            out = np.flip(out, axis)
    return out


def make_volume(rng: np.random.Generator, site: SiteSpec, field_of_view_mm=(192.0, 192.0, 128.0),
                lesion_shapes: Sequence[LesionShape] | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scan of ``site``: (int16 stored HU image, uint8 lesion label, 4x4 RAS affine).

    The grid is ``round(field_of_view_mm / site.spacing)``.  ``lesion_shapes`` (real masks with their spacing,
    see :func:`load_lesion_shapes`) replace the random blobs for most lesions when given.  The label is never empty.
    """
    fov = np.asarray(field_of_view_mm, float)
    shape = tuple(int(max(8, round(f / s))) for f, s in zip(fov, site.spacing))
    ph = _Phantom(rng, shape, site.spacing, fov)
    if not len(ph.lung_voxels):
        raise ValueError(f"field of view {tuple(fov)} is too small for lungs at spacing {site.spacing}")

    label = np.zeros(shape, bool)
    burden = max(site.lesion_burden, 0.05)
    n_lesions = 1 + rng.poisson(1.5 * burden)
    size_scale = burden ** (1 / 3)
    anatomy_scale = fov[:2].min() / 192.0  # lesions shrink with the body in a smaller field of view
    while n_lesions > 0 or not label.any():
        hu = rng.uniform(-650, -350) if rng.random() < site.ggo_fraction else rng.uniform(-80, 30)
        if lesion_shapes and rng.random() < 0.75:
            real = lesion_shapes[rng.integers(len(lesion_shapes))]
            mask = _resample_shape(rng, real, site.spacing, size_scale * rng.uniform(0.8, 1.2))
        else:
            radius = min(20.0, rng.uniform(6.0, 16.0) * size_scale) * anatomy_scale
            mask = _blob_lesion(rng, max(radius, 2.0 * max(site.spacing)), site.spacing)
        ph.paste_lesion(rng, mask, ph.sample_center(rng, subpleural=rng.random() < 0.7), hu, label)
        n_lesions -= 1

    # Scanner: in-plane PSF and partial-volume blur along z (sigma 0.4 slice thickness), calibration, noise.
    img = ndimage.gaussian_filter(ph.hu, (0.5, 0.5, 0.4))
    img = site.hu_scale * img + site.hu_offset + site.noise_hu * rng.standard_normal(shape, dtype=np.float32)
    img = np.clip(np.rint(img), HU_MIN, HU_MAX).astype(np.int16)
    affine = np.diag([*map(float, site.spacing), 1.0])
    affine[:3, 3] = ph.origin
    return img, label.astype(np.uint8), affine


@functools.lru_cache(maxsize=4)
def _load_lesion_shapes_cached(mosmed_dir: str, max_files: int) -> tuple[LesionShape, ...]:
    files = sorted(Path(mosmed_dir).glob("study_*_mask.nii.gz"))
    if not files:
        raise FileNotFoundError(f"no study_*_mask.nii.gz files in {mosmed_dir}")
    shapes = []
    for f in files[:: -(-len(files) // max_files)]:
        img = nib.load(f)
        ornt = nib.orientations.io_orientation(img.affine)
        mask = nib.orientations.apply_orientation(np.asarray(img.dataobj) > 0, ornt)  # to RAS
        zooms = np.empty(3)
        zooms[ornt[:, 0].astype(int)] = img.header.get_zooms()[:3]
        if not mask.any():
            continue
        crop = tuple(slice(i.min(), i.max() + 1) for i in np.nonzero(mask))  # label only the lesion bounding box
        components, _ = ndimage.label(mask[crop])
        for i, box in enumerate(ndimage.find_objects(components), start=1):
            comp = components[box] == i
            extent = np.array([s.stop - s.start for s in box]) * zooms
            if comp.sum() * zooms.prod() >= 300.0 and extent.max() <= 100.0:
                comp.flags.writeable = False
                shapes.append((comp, tuple(float(s) for s in zooms)))
    if not shapes:
        raise ValueError(f"no usable lesion components in {mosmed_dir}")
    return tuple(shapes)


def load_lesion_shapes(mosmed_dir: str | Path, max_files: int = 16) -> tuple[LesionShape, ...]:
    """Connected lesion components (>= 300 mm^3, <= 100 mm extent) of up to ``max_files`` masks
    ``study_*_mask.nii.gz`` (evenly spread over the sorted folder), reoriented to RAS, each with its voxel spacing.

    The files are only read (reading is the slow part, about 0.1 s each); results are cached per folder.
    """
    return _load_lesion_shapes_cached(str(Path(mosmed_dir).resolve()), max_files)


def _save_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> None:
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, path)


def _case_rng(seed: int, site: str, split: int, idx: int) -> np.random.Generator:
    """Generator of one case, independent of every other site, split and index."""
    return np.random.default_rng([seed, zlib.crc32(site.encode()), split, idx])


def make_federation(out_dir, sites: Sequence[SiteSpec] | None = None, seed: int = 0, mosmed_dir=None,
                    field_of_view_mm=(192.0, 192.0, 128.0)) -> dict[str, str]:
    """Write every site's scans and datalist under ``out_dir``; returns {site name: absolute datalist path}."""
    sites = DEFAULT_SITES if sites is None else sites
    shapes = load_lesion_shapes(mosmed_dir) if mosmed_dir else None
    out = Path(out_dir).resolve()
    datalists = {}
    for site in sites:
        root = out / site.name
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        (root / "labelsTr").mkdir(parents=True, exist_ok=True)
        counts = (site.n_labeled, site.n_validation, site.n_unlabeled, site.n_test)
        datalist = {
            "name": f"fssl_covid synthetic {site.name}",
            "description": (f"SYNTHETIC chest CT with COVID-19-like lesion masks (no patient data), generated by "
                            f"fssl_covid.synthetic with seed={seed}, field_of_view_mm={tuple(field_of_view_mm)}, "
                            f"lesion shapes from {'MosMedData masks' if shapes else 'random blobs'}; "
                            f"site spec: {asdict(site)}"),
            "modality": {"0": "CT"},
            "labels": {"0": "background", "1": "lesion"},
        }
        for split, ((key, kind, labeled), count) in enumerate(zip(SPLITS, counts)):
            cases = []
            for idx in range(count):
                img, lbl, affine = make_volume(_case_rng(seed, site.name, split, idx), site, field_of_view_mm,
                                               shapes)
                stem = f"{site.name}_{kind}_{idx:03d}"
                case = {"image": f"imagesTr/{stem}.nii.gz"}
                _save_nifti(root / case["image"], img, affine)
                if labeled:
                    case["label"] = f"labelsTr/{stem}_label.nii.gz"
                    _save_nifti(root / case["label"], lbl, affine)
                cases.append(case)
            datalist[key] = cases
        path = root / "datalist.json"
        path.write_text(json.dumps(datalist, indent=2) + "\n")
        datalists[site.name] = str(path)
    return datalists


def main(argv=None) -> None:
    """Command line: write the default synthetic federation and print a summary."""
    parser = argparse.ArgumentParser(description="Write a synthetic multi-site chest CT federation.")
    parser.add_argument("--out", default="synthetic_data", help="output folder (default: synthetic_data)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mosmed", default=None, help="folder of study_*_mask.nii.gz lesion masks (read only)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    datalists = make_federation(args.out, seed=args.seed, mosmed_dir=args.mosmed)
    for site in DEFAULT_SITES:
        print(f"{site.name:>8}: {site.n_labeled} labeled, {site.n_validation} validation, "
              f"{site.n_unlabeled} unlabeled, {site.n_test} test -> {datalists[site.name]}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
