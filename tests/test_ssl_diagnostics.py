"""scripts/ssl_diagnostics.py: the pseudo-label bias figures and the in-domain sweep, on small 2D slices."""

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from conftest import ROOT, write_slice_site
from fssl_covid.config import ConfigError
from fssl_covid.data import load_datalist
from fssl_covid.trainer import SegmentationTrainer

sys.path.insert(0, str(ROOT / "scripts"))
import ssl_diagnostics  # noqa: E402


@pytest.fixture
def split_site(tmp_path):
    """Six labeled slices: four for training, two for validation."""
    path = write_slice_site(tmp_path / "site", 6, 0)
    dl = json.loads(path.read_text())
    dl["validation"], dl["training"] = dl["training"][4:], dl["training"][:4]
    path.write_text(json.dumps(dl))
    return path


def test_pseudo_label_bias_reports_shares_that_match_the_masks(tmp_path, split_site, tiny_2d):
    tiny_2d["train"]["epochs"] = 3
    dl = load_datalist(split_site)
    trainer = SegmentationTrainer(tiny_2d, dl)
    trainer.fit(keep_best=False)
    trainer.save_checkpoint(tmp_path / "model.pt")
    out = ssl_diagnostics.pseudo_label_bias(str(tmp_path / "model.pt"), dl["validation"])
    assert out["cases"] == 2
    # the truth's lesion share is what the masks say (resized to the 64 x 64 the network sees, so approximately)
    masks = [nib.load(c["label"]).get_fdata() for c in dl["validation"]]
    assert out["lesion_share_truth"] == pytest.approx(np.mean([m.mean() for m in masks]), abs=0.03)
    for tau, row in out["by_threshold"].items():
        assert 0.0 <= row["true_lesion_confidently_background"] + row["true_lesion_confidently_lesion"] <= 1.0 + 1e-6
        assert 0.0 <= row["confident_lesion_precision"] <= 1.0
    shares = [out["by_threshold"][t]["true_lesion_confidently_lesion"] for t in ("0.5", "0.7", "0.9", "0.95")]
    assert shares == sorted(shares, reverse=True)  # a stricter threshold keeps fewer pixels


def test_in_domain_sweep_runs_every_arm_and_refuses_bad_input(tmp_path, split_site, tiny_2d):
    arms = tmp_path / "arms.json"
    arms.write_text(json.dumps({"cutmix": {"ssl": {"cutmix_prob": 1.0}}}))
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(tiny_2d))
    out = tmp_path / "sweep.json"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "ssl_diagnostics.py"), "in-domain", "--config",
                          str(cfg), "--datalist", str(split_site), "--labeled", "2", "--arms", str(arms),
                          "--out", str(out), "--threads", "1"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(out.read_text())
    assert list(results) == ["supervised", "cutmix"]
    for r in results.values():
        assert len(r["curve"]) == tiny_2d["train"]["epochs"] and 0.0 <= r["final"] <= r["best"] <= 1.0
    dl = load_datalist(split_site)
    with pytest.raises(ValueError, match="--labeled"):
        ssl_diagnostics.in_domain(SegmentationTrainer(tiny_2d, {}).cfg, dl, 4, {}, 0)
    with pytest.raises(ConfigError, match="cutmix_probability"):
        ssl_diagnostics.in_domain(SegmentationTrainer(tiny_2d, {}).cfg, dl, 2,
                                  {"typo": {"ssl": {"cutmix_probability": 1}}}, 0)
