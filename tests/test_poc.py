"""End to end in POC mode: real server and three client processes on localhost, the demo script's full cycle."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jobtools import ROOT, small_job
from fssl_covid.networks import build_network
from fssl_covid.results import find_job_outputs, load_cross_site

pytestmark = pytest.mark.slow


def test_fssl_job_in_poc_learns_and_delivers_results(tmp_path, synthetic_sites):
    client = json.loads((ROOT / "jobs/fssl_covid_seg/app/config/config_fed_client.json").read_text())
    config = client["executors"][0]["executor"]["args"]["config"]
    job = small_job("fssl_covid_seg", tmp_path / "jobs", rounds=4,
                    config={"train": {"iterations_per_epoch": 20}, "ssl": {"warmup_epochs": 2, "rampup_epochs": 1}})
    data_dir = str(Path(synthetic_sites["china"]).parents[1])  # <data>/<site>/datalist.json
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, str(ROOT / "poc" / "run_demo.py"), "--job", str(job), "--data", data_dir,
                           "--work", str(work), "--timeout", "900"],
                          capture_output=True, text=True, timeout=1200, stdin=subprocess.DEVNULL)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "POC stopped and cleaned." in out and not (work / "poc_workspace").exists()

    downloads = list((work / "results" / "fssl_covid_seg").iterdir())
    assert len(downloads) == 1
    outputs = find_job_outputs(downloads[0])
    state = torch.load(outputs["global_model"], weights_only=True)["model"]
    build_network(**config["network"]).load_state_dict(state)
    assert outputs["best_model"] is not None and outputs["tb_events"] is not None

    results = load_cross_site(outputs["cross_site"])
    assert set(results) == {"china", "italy", "japan"}
    # learning happened: the global model beats the empty-mask baseline (Dice 0) clearly at every site with labels
    for site in ("china", "italy"):
        assert results[site]["SRV_FL_global_model.pt"] > 0.25, results
    assert "| global (final) |" in out  # the table was printed
    # live progress came from the server's JobProgress through the admin API (show_stats), not from log files
    assert re.search(r"round [1-4] of 4 \(", out), out[-4000:]
    assert re.search(r"(china|italy): round [1-4], loss \d+\.\d+", out), out[-4000:]


def test_experiment_runs_federated_methods_in_poc(tmp_path):
    """`fssl experiment --poc`: the study's federated method runs as real POC processes, learns, and its results
    (global model, round curve from the sites' logs) land in the study's folder; POC is stopped and cleaned."""
    from fssl_covid.cli import main as fssl

    out = tmp_path / "a"
    assert fssl(["experiment", "synthetic3d", "--quick", "--poc", "--out", str(out), "--methods", "fssl"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["flare"] == "poc"
    run = results["methods"]["fssl"]["0"]
    assert run["trained_at"] == ["china", "italy", "japan"]
    assert all(run["final"][s]["dice"] > 0.05 for s in ("china", "italy", "japan")), run["final"]
    assert len(run["curve"]) >= 5  # one validation Dice per round (6), read from the sites' logs
    method_dir = out / "seed0" / "fssl"
    (download,) = list((method_dir / "poc_results").iterdir())
    assert {p.name for p in download.glob("*.log.txt")} == {"china.log.txt", "italy.log.txt", "japan.log.txt"}
    assert not (method_dir / "poc" / "poc_workspace").exists()
    ckpt = torch.load(method_dir / "model_final.pt", weights_only=True)
    build_network(**ckpt["config"]["network"]).load_state_dict(ckpt["model"])
