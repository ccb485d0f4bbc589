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


def test_self_training_writes_the_teachers_masks_and_trains_on_them(tmp_path, tiny_2d):
    """Pseudo-labels are the teacher's own 0.5-masks at each image's size; the student trains on labeled x repeat
    plus them, from the CLI, and bad input is refused."""
    path = write_slice_site(tmp_path / "site", 6, 3)
    dl = json.loads(path.read_text())
    dl["validation"], dl["training"] = dl["training"][4:], dl["training"][:4]
    path.write_text(json.dumps(dl))
    dl = load_datalist(path)
    tiny_2d["train"].update({"epochs": 15, "lr": 0.01})  # enough for the bright blobs to be found
    teacher = SegmentationTrainer(tiny_2d, dl)
    teacher.fit(keep_best=False)
    teacher.save_checkpoint(tmp_path / "teacher.pt")

    # the masks: one per image, the image's shape, 0/1, with the lesion share the teacher predicts (on the labeled
    # training slices, where pseudo_label_bias gives the teacher's predicted share to compare with)
    written = ssl_diagnostics.write_pseudo_labels(str(tmp_path / "teacher.pt"), dl["training"], tmp_path / "pl")
    assert [c["image"] for c in written] == [c["image"] for c in dl["training"]]
    masks = [nib.load(c["label"]).get_fdata() for c in written]
    assert all(m.shape == nib.load(c["image"]).shape for m, c in zip(masks, written))
    assert all(set(np.unique(m)) <= {0.0, 1.0} for m in masks)
    predicted = ssl_diagnostics.pseudo_label_bias(str(tmp_path / "teacher.pt"), dl["training"])
    assert predicted["lesion_share_predicted"] > 0.01  # the teacher finds lesions: the comparison means something
    assert np.mean([m.mean() for m in masks]) == pytest.approx(predicted["lesion_share_predicted"], abs=0.02)
    # --min-share above every image's share keeps none
    assert ssl_diagnostics.write_pseudo_labels(str(tmp_path / "teacher.pt"), dl["training"], tmp_path / "none",
                                               min_share=1.01) == []
    assert list((tmp_path / "none").iterdir()) == []  # the left-out masks are not left behind either

    out = tmp_path / "st.json"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "ssl_diagnostics.py"), "self-training",
                          "--teacher", str(tmp_path / "teacher.pt"), "--datalist", str(path), "--repeat", "2",
                          "--workdir", str(tmp_path / "st"), "--out", str(out), "--threads", "1"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["unlabeled"] == 3 and result["pseudo_labeled"] == 3
    assert len(list((tmp_path / "st").glob("*_image.nii.gz"))) == 3  # one mask per unlabeled image
    assert len(result["curve"]) == 15 and 0.0 <= result["final"] <= result["best"] <= 1.0
    with pytest.raises(ValueError, match="unlabeled"):
        ssl_diagnostics.self_training(str(tmp_path / "teacher.pt"), dl, [], 1, 0, tmp_path / "x")
    with pytest.raises(ValueError, match="--repeat"):
        ssl_diagnostics.self_training(str(tmp_path / "teacher.pt"), dl, dl["unlabeled"], 0, 0, tmp_path / "x")
