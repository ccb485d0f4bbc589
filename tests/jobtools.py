"""Helpers for tests that run real FLARE (thin aliases of fssl_covid.jobs, the one copy of this code)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fssl_covid.jobs import (  # noqa: F401
    JOBS, REPO as ROOT, customize_job, flare_env, job_training_config, run_simulator,
)


def small_job(name: str, dst: Path, rounds: int, config: dict, min_clients: int | None = None) -> Path:
    """Copy ``jobs/<name>`` to ``dst`` with ``rounds`` rounds and ``config`` merged into the training config."""
    return customize_job(name, dst, rounds=rounds, config=config, min_clients=min_clients)


SITES = ["china", "italy", "japan"]


def write_site_configs(root: Path, datalists: dict[str, str]) -> Path:
    """``<root>/<site>/local/fssl_site.json`` for every site (the simulator reads them via FSSL_SITE_CONFIGS)."""
    for site, datalist in datalists.items():
        (root / site / "local").mkdir(parents=True)
        (root / site / "local" / "fssl_site.json").write_text(json.dumps({"datalist": datalist, "num_threads": 1}))
    return root


def run_captured_fssl_job(tmp: Path, datalists: dict[str, str], config: dict, rounds: int = 2) -> dict:
    """The FSSL job in the simulator (3 sites, cross-site evaluation), with test-only server components
    (tests/capture_components.py) recording everything the sites send.  Several test modules read one such run."""
    capture_file = tmp / "captured.jsonl"
    job = customize_job("fssl_covid_seg", tmp / "jobs", rounds=rounds, config=config, job_name="fssl_captured")
    shutil.copy(Path(__file__).with_name("capture_components.py"), job / "app" / "custom" / "capture_components.py")
    server_file = job / "app" / "config" / "config_fed_server.json"
    server = json.loads(server_file.read_text())
    server["task_result_filters"] = [{"tasks": ["train", "submit_model", "validate"], "filters": [
        {"path": "capture_components.CaptureResults", "args": {"path": str(capture_file)}}]}]
    server["components"].append({"id": "capture_events", "path": "capture_components.CaptureEvents",
                                 "args": {"path": str(capture_file)}})
    server_file.write_text(json.dumps(server, indent=1))
    site_configs = write_site_configs(tmp / "site_configs", datalists)
    proc = run_simulator(job, tmp / "ws", SITES, flare_env(tmp, FSSL_SITE_CONFIGS=str(site_configs)))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    return {"run": tmp / "ws" / "server" / "simulate_job", "log": log, "config": config, "rounds": rounds,
            "site_configs": site_configs,
            "records": [json.loads(line) for line in capture_file.read_text().splitlines()]}
