"""Both jobs in the real FLARE simulator (server + 3 sites, 2 rounds, tiny data and network)."""

import json

import pytest
import torch

from conftest import TINY_3D
from jobtools import flare_env, run_simulator, small_job
from fssl_covid.networks import build_network

SITES = ["china", "italy", "japan"]


def _site_configs(root, datalists):
    for site, datalist in datalists.items():
        (root / site / "local").mkdir(parents=True)
        (root / site / "local" / "fssl_site.json").write_text(json.dumps({"datalist": datalist, "num_threads": 1}))
    return root


@pytest.mark.parametrize("job_name", ["fssl_covid_seg", "fedavg_supervised"])
def test_job_runs_in_the_simulator(tmp_path, synthetic_sites, job_name):
    config = {k: v for k, v in TINY_3D.items()}
    config = json.loads(json.dumps(config))
    config["ssl"]["warmup_epochs"] = 1
    job = small_job(job_name, tmp_path / "jobs", rounds=2, config=config)
    env = flare_env(tmp_path, FSSL_SITE_CONFIGS=str(_site_configs(tmp_path / "site_configs", synthetic_sites)))
    proc = run_simulator(job, tmp_path / "ws", SITES, env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    run = tmp_path / "ws" / "server" / "simulate_job"

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
        # round 2 is past the warm-up: the unlabeled-only site trains and contributes (weight = its 4 scans)
        assert "aggregation weight 4" in log
        assert any((run / "tb_events").rglob("events.out.tfevents.*"))
    else:
        # unlabeled data ignored: no unsupervised loss anywhere, and the unlabeled-only site contributes nothing
        assert "unsup 0.0000" in log and "aggregation weight 0" in log
        assert not [line for line in log.splitlines() if "round " in line and "unsup 0." in line
                    and "unsup 0.0000" not in line]
