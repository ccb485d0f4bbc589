"""The experiment runner's --quick studies: methods run (federated ones through FLARE's simulator), learn, and
write one results folder with figures, tables, plots and checkpoints."""

import json

import pytest
import torch

from conftest import COVID_SEMISEG
from fssl_covid.cli import main as fssl
from fssl_covid.networks import build_network

pytestmark = pytest.mark.slow


def _check_results(out, methods, sites, floor):
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == set(methods)
    for method, by_seed in results["methods"].items():
        for which in ("final", "best"):
            for site in sites:
                scores = by_seed["0"][which][site]
                assert 0.0 <= scores["mean_dice_256"] <= 1.0 and scores["n"] > 0
        # learning: every method beats the empty-mask baseline (Dice 0) by a clear margin on every site
        assert all(by_seed["0"]["final"][s]["dice"] > floor for s in sites), (method, by_seed["0"]["final"])
        assert by_seed["0"]["curve"], method
    table = (out / "results.md").read_text()
    assert all(f"| {m} |" in table for m in methods)
    for png in ("dice_per_round.png", "cross_site_matrix.png"):
        assert (out / png).stat().st_size > 5000
    return results


@pytest.mark.skipif(not COVID_SEMISEG.is_dir(), reason="real COVID-SemiSeg slices not present")
def test_quick_real2d_study(tmp_path):
    out = tmp_path / "b"
    methods = ["local", "centralized_ssl", "fssl"]
    assert fssl(["experiment", "real2d", "--quick", "--out", str(out), "--methods", *methods]) == 0
    results = _check_results(out, methods, ["italy"], floor=0.2)
    split = json.loads((out / "split.json").read_text())
    assert len(split["italy_validation_indices"]) == 10
    ckpt = torch.load(out / "seed0" / "fssl" / "model_best.pt", weights_only=True)
    build_network(**ckpt["config"]["network"]).load_state_dict(ckpt["model"])  # usable by fssl predict
    assert "coronacases" in results["description"]


def test_quick_synthetic3d_study(tmp_path):
    out = tmp_path / "a"
    methods = ["local", "centralized", "fssl"]
    assert fssl(["experiment", "synthetic3d", "--quick", "--out", str(out), "--methods", *methods,
                 "--epochs", "6"]) == 0
    results = _check_results(out, ["local_china", "local_italy", "centralized", "fssl"],
                             ["china", "italy", "japan"], floor=0.05)
    assert results["methods"]["fssl"]["0"]["trained_at"] == ["china", "italy", "japan"]
