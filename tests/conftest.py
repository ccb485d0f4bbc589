"""Shared fixtures: small synthetic data written to disk (real NIfTI files, no mocks) and tiny configurations."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "custom"))  # the shipped package, also when not pip-installed
SHARED_DATA = ROOT.parent / "shared" / "data"
COVID_SEMISEG = SHARED_DATA / "covid_semiseg"
MOSMED = SHARED_DATA / "mosmed_masks"

# `make test` runs two pytest-xdist workers on CI's 2 cores: one torch thread each (two without xdist)
os.environ.setdefault("OMP_NUM_THREADS", "1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")

from fssl_covid.synthetic import SiteSpec, make_federation  # noqa: E402

# Small sites: fast to write and to train on; lesion burden high enough to learn in a minute on a CPU.
SMALL_SITES = [
    SiteSpec("china", 4, 2, 4, 2, (3.0, 3.0, 4.0), noise_hu=20.0, hu_scale=1.0, hu_offset=0.0,
             lesion_burden=4.0, ggo_fraction=0.6),
    SiteSpec("italy", 2, 2, 4, 2, (3.0, 3.0, 5.0), noise_hu=35.0, hu_scale=1.05, hu_offset=30.0,
             lesion_burden=5.0, ggo_fraction=0.4),
    SiteSpec("japan", 0, 0, 4, 2, (2.5, 2.5, 4.0), noise_hu=15.0, hu_scale=0.95, hu_offset=-20.0,
             lesion_burden=3.0, ggo_fraction=0.8),
]

TINY_3D = {
    "data": {"spatial_dims": 3, "intensity_range": [-1000, 500], "spacing": [3.0, 3.0, 4.0],
             "patch_size": [32, 32, 16], "samples_per_image": 2},
    "network": {"name": "unet", "spatial_dims": 3, "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
    "ssl": {"warmup_epochs": 1, "rampup_epochs": 1},
    "train": {"lr": 0.005, "batch_size": 2, "unlabeled_batch_size": 2, "iterations_per_epoch": 3, "epochs": 1},
}

TINY_2D = {
    "data": {"spatial_dims": 2, "intensity_range": [0, 255], "spacing": None, "orientation": None,
             "patch_size": [64, 64]},
    "network": {"name": "unet", "spatial_dims": 2, "channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
    "ssl": {"warmup_epochs": 0, "rampup_epochs": 1},
    "train": {"batch_size": 2, "unlabeled_batch_size": 2, "iterations_per_epoch": 2, "epochs": 1},
}


POC_MODULES = ("test_poc.py", "test_poc_failures.py", "test_provisioned.py")


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the marks
def pytest_collection_modifyitems(config, items):
    """Mark ``poc`` the tests that start FLARE's server and clients as processes on localhost's fixed ports: `make
    test` runs them after the others, one at a time and beside nothing else (under a second worker's load their
    start-up timed out here).  The readers of the one simulated FSSL job share an xdist group (the job runs once)."""
    for item in items:
        module = Path(str(item.fspath)).name
        if module in POC_MODULES:
            item.add_marker(pytest.mark.poc)
        elif "simulated_fssl_job" in getattr(item, "fixturenames", ()) or module == "test_simulator.py":
            item.add_marker(pytest.mark.xdist_group("simulated_fssl_job"))


@pytest.fixture(scope="session")
def synthetic_sites(tmp_path_factory) -> dict[str, str]:
    """{site: datalist path} of a small synthetic 3-site federation."""
    return make_federation(tmp_path_factory.mktemp("synthetic"), sites=SMALL_SITES, seed=0)


@pytest.fixture(scope="session")
def simulated_fssl_job(tmp_path_factory, synthetic_sites) -> dict:
    """One finished FSSL job in the FLARE simulator (3 sites, 2 rounds, warm-up 1 round, cross-site evaluation) with
    everything the sites sent recorded; read by the simulator, report and privacy tests."""
    from jobtools import run_captured_fssl_job

    return run_captured_fssl_job(tmp_path_factory.mktemp("fssl_job"), synthetic_sites, copy.deepcopy(TINY_3D))


@pytest.fixture
def tiny_3d() -> dict:
    return copy.deepcopy(TINY_3D)


@pytest.fixture
def tiny_2d() -> dict:
    return copy.deepcopy(TINY_2D)


def write_slice_site(root: Path, n_labeled: int, n_unlabeled: int, seed: int = 0) -> Path:
    """2D slices stored like COVID-SemiSeg: uint8 (W, H, 1) NIfTI of varying size, a bright blob as lesion."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    datalist = {"training": [], "unlabeled": []}
    for i in range(n_labeled + n_unlabeled):
        w, h = int(rng.integers(60, 90)), int(rng.integers(60, 90))
        img = rng.normal(60, 10, size=(w, h, 1))
        yy, xx = np.mgrid[:w, :h]
        cx, cy, r = rng.integers(15, w - 15), rng.integers(15, h - 15), rng.integers(5, 12)
        lesion = ((yy - cx) ** 2 + (xx - cy) ** 2 < r * r)[..., None]
        img[lesion] += 120
        affine = np.diag([0.8, 0.8, 1.0, 1.0])
        name = f"slice_{i:03d}"
        nib.save(nib.Nifti1Image(np.clip(img, 0, 255).astype(np.uint8), affine), root / f"{name}_image.nii.gz")
        if i < n_labeled:
            nib.save(nib.Nifti1Image(lesion.astype(np.uint8), affine), root / f"{name}_label.nii.gz")
            datalist["training"].append({"image": f"{name}_image.nii.gz", "label": f"{name}_label.nii.gz"})
        else:
            datalist["unlabeled"].append({"image": f"{name}_image.nii.gz"})
    path = root / "datalist.json"
    path.write_text(json.dumps(datalist))
    return path
