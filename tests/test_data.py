"""Data contract and loading of 2D slices and 3D volumes (real NIfTI files on disk)."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.transforms import Compose

from conftest import COVID_SEMISEG, write_slice_site
from fssl_covid.config import resolve_config
from fssl_covid.data import DataError, root_cause, evaluation_dataset, load_datalist, preprocessing, training_dataset


def test_3d_volumes_are_resampled_windowed_and_patched(synthetic_sites, tiny_3d):
    cfg = resolve_config(tiny_3d)
    dl = load_datalist(synthetic_sites["china"])
    assert len(dl["training"]) == 4 and len(dl["unlabeled"]) == 4 and len(dl["test"]) == 2
    with warnings.catch_warnings():  # MONAI's deprecation notices stay out of every run's output
        warnings.simplefilter("error", FutureWarning)
        item = Compose(preprocessing(cfg, pad=False))(dl["training"][0])
    img, lab = item["image"], item["label"]
    assert img.shape[0] == 1 and img.dim() == 4 and img.shape == lab.shape
    assert np.allclose(img.pixdim.tolist(), cfg["data"]["spacing"], atol=1e-3)  # resampled to the configured grid
    assert 0.0 <= img.min() and img.max() <= 1.0  # lung window mapped to 0..1
    assert set(torch.unique(lab).tolist()) <= {0.0, 1.0} and lab.sum() > 0
    samples = training_dataset(cfg, dl["training"], labeled=True)[0]
    assert len(samples) == cfg["data"]["samples_per_image"]
    assert tuple(samples[0]["image"].shape[1:]) == tuple(cfg["data"]["patch_size"])
    unl = training_dataset(cfg, dl["unlabeled"], labeled=False)[0]
    assert "label" not in unl[0] and tuple(unl[0]["image"].shape[1:]) == tuple(cfg["data"]["patch_size"])


def test_2d_slices_with_singleton_axis_are_resized(tmp_path, tiny_2d):
    cfg = resolve_config(tiny_2d)
    dl = load_datalist(write_slice_site(tmp_path, 3, 2))
    ds = evaluation_dataset(cfg, dl["training"])
    for item in ds:
        assert tuple(item["image"].shape) == (1, 64, 64) and item["image"].shape == item["label"].shape
        assert item["label"].sum() > 0 and item["image"].max() <= 1.0
    unl = training_dataset(cfg, dl["unlabeled"], labeled=False)[0]
    assert tuple(unl["image"].shape) == (1, 64, 64)


def test_per_image_normalizations_align_differently_windowed_slices(tmp_path, tiny_2d):
    """The same slice displayed with another window (darker, less contrast, as coronacases vs italy) is the same
    image after per-image percentile scaling; the fixed window keeps the difference."""
    import nibabel as nib

    path = write_slice_site(tmp_path, 1, 0)
    case = load_datalist(path)["training"][0]
    img = nib.load(case["image"])
    dark = np.asarray(img.dataobj).astype(np.float32) * 0.45 + 5  # another display window of the same tissue
    dark_case = {**case, "image": str(tmp_path / "dark_image.nii.gz")}
    nib.save(nib.Nifti1Image(dark.astype(np.uint8), img.affine), dark_case["image"])

    def prepared(normalization, c):
        cfg = resolve_config({**tiny_2d, "data": {**tiny_2d["data"], "intensity_normalization": normalization}})
        return Compose(preprocessing(cfg))(c)["image"]

    assert float((prepared("window", case) - prepared("window", dark_case)).abs().mean()) > 0.1
    a, b = prepared("percentile", case), prepared("percentile", dark_case)
    assert 0.0 <= float(a.min()) < 0.1 and 0.9 < float(a.max()) <= 1.0  # (resized after scaling)
    assert float((a - b).abs().mean()) < 0.02  # equal up to the 8-bit rounding of the darker copy
    # A non-linear display curve (gamma 2, as a wider window compresses the lung's grey levels): percentiles keep it,
    # histogram equalization (rank-based, so blind to any increasing intensity map) removes it.
    raw = np.asarray(img.dataobj).astype(np.float32)
    curved_case = {**case, "image": str(tmp_path / "curved_image.nii.gz")}
    nib.save(nib.Nifti1Image(np.round(255 * (raw / 255) ** 2).astype(np.uint8), img.affine), curved_case["image"])
    gap_percentile = float((prepared("percentile", case) - prepared("percentile", curved_case)).abs().mean())
    h, h_curved = prepared("histogram", case), prepared("histogram", curved_case)
    assert 0.0 <= float(h.min()) < 0.1 and 0.9 < float(h.max()) <= 1.0
    gap_histogram = float((h - h_curved).abs().mean())
    assert gap_histogram < 0.03 and gap_histogram < gap_percentile / 3, (gap_histogram, gap_percentile)
    with pytest.raises(ValueError, match="intensity_normalization"):
        resolve_config({"data": {"intensity_normalization": "zscore"}})


@pytest.mark.skipif(not COVID_SEMISEG.is_dir(), reason="real COVID-SemiSeg slices not present")
def test_real_covid_semiseg_slices_load(tiny_2d):
    cfg = resolve_config(tiny_2d)
    dl = load_datalist(COVID_SEMISEG / "italy.json")
    assert len(dl["training"]) == 50 and dl["unlabeled"] == []
    item = evaluation_dataset(cfg, dl["training"][:2])[0]
    assert tuple(item["image"].shape) == (1, 64, 64) and item["label"].max() == 1.0


def test_a_relative_datalist_gives_absolute_paths(tmp_path, monkeypatch, synthetic_sites):
    """FLARE's simulator and clients run in other folders: a datalist named by a relative path (``fssl experiment
    real2d --data ../shared/data/covid_semiseg``) must still give cases they can open."""
    datalist = Path(synthetic_sites["china"])
    monkeypatch.chdir(datalist.parent.parent)
    relative = load_datalist(f"{datalist.parent.name}/{datalist.name}")
    monkeypatch.chdir(tmp_path)  # somewhere else, as a FLARE client is
    for key in ("training", "unlabeled", "test"):
        assert relative[key] and relative[key] == load_datalist(datalist)[key]
        for case in relative[key]:
            assert all(Path(p).is_absolute() and Path(p).is_file() for p in case.values())


def test_datalist_errors_name_the_file_and_the_problem(tmp_path, synthetic_sites, tiny_2d):
    with pytest.raises(DataError, match="does not exist"):
        load_datalist(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=f"{bad}.*not valid JSON"):
        load_datalist(bad)
    keyless = tmp_path / "keyless.json"
    keyless.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="none of the keys"):
        load_datalist(keyless)
    nolabel = tmp_path / "nolabel.json"
    nolabel.write_text(json.dumps({"training": [{"image": "a.nii.gz"}]}))
    with pytest.raises(DataError, match="has no 'label'"):
        load_datalist(nolabel)
    # a 3D volume given to a 2D configuration is refused with the file's name
    vol = load_datalist(synthetic_sites["china"])["test"][:1]
    with pytest.raises(Exception) as err:
        Compose(preprocessing(resolve_config(tiny_2d)))(vol[0])
    assert "2D configuration" in root_cause(err.value) and "china_test_000" in root_cause(err.value)
