"""Tests of the synthetic multi-site chest CT generator: real files on disk, small fields of view for speed."""

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fssl_covid.synthetic import DEFAULT_SITES, SiteSpec, make_federation, make_volume

FOV = (96.0, 96.0, 64.0)  # half the default in-plane field of view: volumes of ~50x50x20 voxels
KEYS = ("training", "validation", "unlabeled", "test")
MOSMED_DIR = Path(__file__).parents[2] / "shared" / "data" / "mosmed_masks"


def small(site: SiteSpec, **counts) -> SiteSpec:
    """A default site with few scans (n_labeled, n_validation, n_unlabeled, n_test overridable)."""
    defaults = {"n_labeled": min(site.n_labeled, 2), "n_validation": min(site.n_validation, 1),
                "n_unlabeled": 2, "n_test": 1}
    return dataclasses.replace(site, **{**defaults, **counts})


SITES = [small(s) for s in DEFAULT_SITES]
BY_NAME = {s.name: s for s in SITES}


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    out = tmp_path_factory.mktemp("fed")
    return out, make_federation(out, sites=SITES, seed=0, field_of_view_mm=FOV)


def load(path):
    img = nib.load(path)
    return img, np.asarray(img.dataobj)


def cases(datalist_path):
    """(datalist dict, list of (key, case with absolute paths))."""
    datalist = json.loads(Path(datalist_path).read_text())
    root = Path(datalist_path).parent
    return datalist, [(k, {f: root / p for f, p in c.items()}) for k in KEYS for c in datalist[k]]


def test_default_sites():
    assert [s.name for s in DEFAULT_SITES] == ["china", "italy", "japan"]
    japan = next(s for s in DEFAULT_SITES if s.name == "japan")
    assert japan.n_labeled == 0 and japan.n_validation == 0 and japan.n_unlabeled > 0 and japan.n_test > 0
    for s in DEFAULT_SITES:  # default grids stay small (field of view / spacing)
        shape = [round(f / sp) for f, sp in zip((192.0, 192.0, 128.0), s.spacing)]
        assert max(shape[:2]) <= 170 and shape[2] <= 52
    assert len({s.spacing for s in DEFAULT_SITES}) == 3


def test_datalists(federation):
    out, datalists = federation
    assert set(datalists) == set(BY_NAME)
    for name, path in datalists.items():
        site = BY_NAME[name]
        assert Path(path).is_absolute() and Path(path) == out.resolve() / name / "datalist.json"
        datalist, all_cases = cases(path)
        assert "synthetic" in datalist["description"].lower() and name in datalist["description"]
        counts = [len(datalist[k]) for k in KEYS]
        assert counts == [site.n_labeled, site.n_validation, site.n_unlabeled, site.n_test]
        for key in KEYS:
            for case in datalist[key]:
                assert not Path(case["image"]).is_absolute()
                assert ("label" in case) == (key != "unlabeled")
        for _, case in all_cases:
            assert all(p.is_file() for p in case.values())
        n_labels = len(list((out / name).rglob("*_label.nii.gz")))
        assert n_labels == site.n_labeled + site.n_validation + site.n_test
    japan, _ = cases(datalists["japan"])
    assert japan["training"] == [] and japan["validation"] == [] and len(japan["test"]) == 1


def test_images_and_labels(federation):
    _, datalists = federation
    for name, path in datalists.items():
        site = BY_NAME[name]
        for key, case in cases(path)[1]:
            img, hu = load(case["image"])
            assert img.get_data_dtype() == np.int16 and hu.dtype == np.int16
            np.testing.assert_allclose(img.header.get_zooms()[:3], site.spacing, rtol=1e-5)
            np.testing.assert_allclose(np.diag(img.affine)[:3], site.spacing, rtol=1e-5)
            assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
            assert hu.shape == tuple(round(f / s) for f, s in zip(FOV, site.spacing))
            # Air outside the body, lung/air mass below -800 and tissue/bone above 0.
            assert -1024 <= hu.min() and hu.max() <= 3071
            assert -1030 < hu[:3, :3].mean() < -940
            assert (hu < -800).mean() > 0.2 and (hu > 0).mean() > 0.05
            if key == "unlabeled":
                continue
            lbl_img, lbl = load(case["label"])
            assert lbl_img.get_data_dtype() == np.uint8 and lbl.shape == hu.shape
            np.testing.assert_allclose(lbl_img.affine, img.affine)
            assert set(np.unique(lbl)) == {0, 1}
            true_hu = (hu[lbl == 1].astype(float) - site.hu_offset) / site.hu_scale
            assert -750 < true_hu.mean() < 100


def test_make_volume_grid_and_lesions():
    site = DEFAULT_SITES[0]
    for seed in range(5):
        img, lbl, affine = make_volume(np.random.default_rng(seed), site, FOV)
        assert img.dtype == np.int16 and lbl.dtype == np.uint8 and affine.shape == (4, 4)
        assert img.shape == lbl.shape == (64, 64, 26)
        assert lbl.sum() > 0


def test_determinism(tmp_path, federation):
    out, datalists = federation
    again = make_federation(tmp_path / "same", sites=SITES, seed=0, field_of_view_mm=FOV)
    for name in datalists:
        for (_, a), (_, b) in zip(cases(datalists[name])[1], cases(again[name])[1]):
            for field in a:
                assert a[field].read_bytes() == b[field].read_bytes()
    other = make_federation(tmp_path / "other", sites=SITES[:1], seed=1, field_of_view_mm=FOV)
    (_, a), (_, b) = cases(datalists["china"])[1][0], cases(other["china"])[1][0]
    assert not np.array_equal(load(a["image"])[1], load(b["image"])[1])


def test_sites_are_independent(tmp_path, federation):
    _, datalists = federation
    alone = make_federation(tmp_path, sites=[BY_NAME["italy"]], seed=0, field_of_view_mm=FOV)
    a, b = cases(datalists["italy"])[1][0][1], cases(alone["italy"])[1][0][1]
    assert a["image"].read_bytes() == b["image"].read_bytes()


def noise_and_tissue(hu):
    """(robust noise std from horizontal neighbour differences, median) over soft-tissue-like voxels."""
    soft = (hu > -300) & (hu < 300)
    soft[1:] &= soft[:-1]
    diffs = (hu[1:].astype(float) - hu[:-1])[soft[1:]]
    return 1.4826 * np.median(np.abs(diffs - np.median(diffs))) / np.sqrt(2), np.median(hu[soft])


def test_domain_shift(federation):
    _, datalists = federation
    stats = {}
    for name in ("china", "italy"):
        values = [noise_and_tissue(load(c["image"])[1]) for _, c in cases(datalists[name])[1]]
        stats[name] = np.mean(values, axis=0)
    assert stats["italy"][0] > 1.3 * stats["china"][0]  # noise 35 vs 20 HU
    assert stats["italy"][1] > stats["china"][1] + 15  # calibration 1.05 * HU + 30


@pytest.mark.skipif(not MOSMED_DIR.is_dir(), reason="MosMedData masks not available")
def test_mosmed_lesion_shapes(tmp_path):
    sites = [small(DEFAULT_SITES[1], n_labeled=2, n_validation=0, n_unlabeled=0, n_test=1)]
    datalists = make_federation(tmp_path, sites=sites, seed=0, mosmed_dir=MOSMED_DIR, field_of_view_mm=FOV)
    datalist, all_cases = cases(datalists["italy"])
    assert "MosMedData" in datalist["description"]
    for _, case in all_cases:
        assert load(case["label"])[1].sum() > 0
    assert not any(tmp_path.rglob("study_*"))  # the real masks are read, never copied
