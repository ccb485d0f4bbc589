"""Both jobs in the real FLARE simulator (server + 3 sites, 2 rounds, tiny data and network)."""

import json
import re

import pytest
import torch

from conftest import TINY_3D
from jobtools import SITES, flare_env, run_simulator, small_job, write_site_configs
from fssl_covid.cli import main as fssl
from fssl_covid.config import resolve_config
from fssl_covid.data import load_datalist
from fssl_covid.inference import score_cases
from fssl_covid.networks import build_network
from fssl_covid.trainer import SegmentationTrainer


@pytest.fixture
def simulated_job(request, tmp_path, synthetic_sites):
    """(run folder, log, config) of the job in the simulator, 2 rounds; the FSSL job's run is shared with the report
    and privacy tests (conftest.simulated_fssl_job), the baseline runs here."""
    if request.param == "fssl_covid_seg":
        run = request.getfixturevalue("simulated_fssl_job")
        return run["run"], run["log"], run["config"]
    config = json.loads(json.dumps(TINY_3D))
    job = small_job(request.param, tmp_path / "jobs", rounds=2, config=config)
    env = flare_env(tmp_path, FSSL_SITE_CONFIGS=str(write_site_configs(tmp_path / "site_configs", synthetic_sites)))
    proc = run_simulator(job, tmp_path / "ws", SITES, env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    return tmp_path / "ws" / "server" / "simulate_job", log, config


@pytest.mark.parametrize("simulated_job", ["fssl_covid_seg", "fedavg_supervised"], indirect=True)
def test_job_runs_in_the_simulator(simulated_job, request):
    job_name = request.node.callspec.params["simulated_job"]
    run, log, config = simulated_job

    state = torch.load(run / "app_server" / "FL_global_model.pt", weights_only=True)["model"]
    build_network(**config["network"]).load_state_dict(state)  # the global model fits the configured network
    assert (run / "app_server" / "best_FL_global_model.pt").is_file()  # chosen on val_dice sent by the sites

    results = json.loads((run / "cross_site_val" / "cross_val_results.json").read_text())
    assert set(results) == set(SITES)  # every site scored the models on its own labeled test scans
    for site in SITES:
        models = results[site]
        assert {"SRV_FL_global_model.pt", "SRV_best_FL_global_model.pt", *SITES} <= set(models)
        for metrics in models.values():
            assert 0.0 <= metrics["val_dice"] <= 1.0
    assert "round 2/2" in log
    if job_name == "fssl_covid_seg":
        # round 2 is past the warm-up: the unlabeled-only site trains and contributes (weight = its 4 scans x the
        # unlabeled-only learning-rate scale 0.1)
        assert "aggregation weight 0.4" in log
        assert any((run / "tb_events").rglob("events.out.tfevents.*"))
        # ssl.class_balanced "auto": each site chose from its own counts (china 4 + 4, italy 2 + 4, japan 0 + 4)
        for site, kind in (("china", "unbalanced"), ("italy", "unbalanced"), ("japan", "class-balanced")):
            assert re.search(rf"site {site} ready on .*unlabeled loss: ce, {kind} \(", log), site
    else:
        # unlabeled data ignored: no unsupervised loss anywhere, and the unlabeled-only site contributes nothing
        assert "unsup 0.0000" in log and "aggregation weight 0" in log
        assert "unlabeled loss: off (supervised)" in log
        assert not [line for line in log.splitlines() if "round " in line and "unsup 0." in line
                    and "unsup 0.0000" not in line]


def test_cross_site_scores_are_what_fssl_evaluate_gives_for_the_same_model(simulated_fssl_job, synthetic_sites):
    """Cross-site validation scores each site's test scans as `fssl evaluate` and the study runner do (Dice at 0.5,
    each scan on its own grid), so the job's matrix and a site's own check of the downloaded model agree."""
    run = simulated_fssl_job["run"]
    results = json.loads((run / "cross_site_val" / "cross_val_results.json").read_text())
    trainer = SegmentationTrainer(resolve_config(json.loads(json.dumps(simulated_fssl_job["config"]))), {},
                                  device="cpu")
    trainer.set_weights(torch.load(run / "app_server" / "FL_global_model.pt", weights_only=True)["model"])
    dice = {}
    for site in SITES:
        scores = score_cases(trainer, load_datalist(synthetic_sites[site])["test"])
        assert scores["n"] > 0
        assert results[site]["SRV_FL_global_model.pt"]["val_dice"] == pytest.approx(scores["dice"], abs=1e-3)
        dice[site] = scores["dice"]
    assert max(dice.values()) > 0  # a model that finds lesions somewhere (0.03-0.06 here), so the grids could differ


def test_warm_start_continues_from_an_earlier_global_model(tmp_path, simulated_fssl_job):
    """Job B, written with ``fssl job --init-model``, starts from job A's FL_global_model.pt instead of a fresh
    network: with a zero learning rate its global model is A's, and its sites score A's model in round 1."""
    config = simulated_fssl_job["config"]  # job A: the shared 2-round FSSL run
    env = flare_env(tmp_path, FSSL_SITE_CONFIGS=str(simulated_fssl_job["site_configs"]))
    model_a = simulated_fssl_job["run"] / "app_server" / "FL_global_model.pt"
    state_a = torch.load(model_a, weights_only=True)["model"]

    settings = [f"{section}.{key}={json.dumps(value)}" for section, values in config.items()
                for key, value in values.items()]
    settings += ["train.lr=0.0", "train.min_lr=0.0"]  # B trains but cannot move: its result must be A's model
    assert fssl(["job", "fssl_covid_seg", "--out", str(tmp_path / "jobs_b"), "--rounds", "1",
                 "--init-model", str(model_a), *[a for s in settings for a in ("--set", s)]]) == 0
    proc = run_simulator(tmp_path / "jobs_b" / "fssl_covid_seg", tmp_path / "ws_b", SITES, env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "Loading checkpoint from" in log and "initial_global_model.pt" in log
    state_b = torch.load(tmp_path / "ws_b" / "server" / "simulate_job" / "app_server" / "FL_global_model.pt",
                         weights_only=True)["model"]
    fresh = build_network(**config["network"]).state_dict()
    floats = [k for k in state_a if state_a[k].dtype.is_floating_point]
    assert all(torch.allclose(state_b[k], state_a[k], atol=1e-6) for k in floats)
    assert not all(torch.allclose(fresh[k], state_a[k], atol=1e-3) for k in floats)


def test_warm_start_refuses_a_checkpoint_that_does_not_fit(tmp_path):
    bad = tmp_path / "other_network.pt"
    torch.save({"model": build_network(name="unet", spatial_dims=3, channels=[4, 8], strides=[2]).state_dict()}, bad)
    assert fssl(["job", "fssl_covid_seg", "--out", str(tmp_path / "jobs"), "--init-model", str(bad)]) == 2
    assert not (tmp_path / "jobs" / "fssl_covid_seg").exists()  # nothing half-written to submit by mistake
    assert fssl(["job", "fssl_covid_seg", "--out", str(tmp_path / "jobs"),
                 "--init-model", str(tmp_path / "missing.pt")]) == 2
