"""A site lost in the middle of a round, in POC mode: the others finish the job, the results download, and the
site, started again, takes part in the next job (real server and client processes on localhost)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from jobtools import ROOT, customize_job
from fssl_covid.results import find_job_outputs, load_cross_site
from fssl_covid.site_settings import write_settings

sys.path.insert(0, str(ROOT / "poc"))
from run_demo import Poc  # noqa: E402

pytestmark = pytest.mark.slow
SITES = ["china", "italy", "japan"]


def _short_waits(job: Path) -> Path:
    """Seconds instead of minutes for the waits a lost site triggers (the jobs' values suit real sites)."""
    path = job / "app" / "config" / "config_fed_server.json"
    server = json.loads(path.read_text())
    for wf in server["workflows"]:
        if "ScatterAndGather" in wf["path"]:
            wf["args"]["wait_time_after_min_received"] = 3
        if "CrossSiteModelEval" in wf["path"]:
            wf["args"].update({"submit_model_timeout": 20, "validation_timeout": 40})
    path.write_text(json.dumps(server, indent=1))
    return job


def test_site_lost_mid_round_others_finish_and_it_rejoins_the_next_job(tmp_path, synthetic_sites):
    cfg = {"train": {"iterations_per_epoch": 40}, "ssl": {"warmup_epochs": 1, "rampup_epochs": 1}}
    job = _short_waits(customize_job("fssl_covid_seg", tmp_path / "jobs", rounds=3, config=cfg))
    again = _short_waits(customize_job("fssl_covid_seg", tmp_path / "jobs", rounds=1, min_clients=3,
                                       job_name="all_three", config={"train": {"iterations_per_epoch": 2}}))
    poc = Poc(tmp_path / "work")
    poc.env["PYTHONPATH"] = str(ROOT / "custom")
    try:
        poc.prepare(SITES)
        for site in SITES:
            write_settings(poc.kits / site, {"datalist": synthetic_sites[site], "num_threads": 1})
        poc.start()
        poc.wait_for_clients(SITES)
        job_id = poc.submit(job)
        server_log = poc.kits / "server" / job_id / "log.txt"
        deadline = time.time() + 600
        while not (server_log.is_file() and "Round 1 started." in server_log.read_text(errors="replace")):
            assert time.time() < deadline, "round 2 never started"
            time.sleep(1)
        time.sleep(3)  # italy is training (its round takes longer than this)
        victims = [p for p in psutil.process_iter(["cmdline"]) if "prod_00/italy" in " ".join(p.info["cmdline"] or [])]
        assert victims
        for p in victims:  # the whole site: client parent and its job process, no goodbye sent
            os.kill(p.pid, signal.SIGKILL)
        # the FL admin's view while the job goes on without italy: `fssl watch` through the admin API
        t0 = time.time()
        watch = subprocess.run([sys.executable, "-m", "fssl_covid.cli", "watch", job_id, "--once",
                                "--kit", str(poc.kits / "admin@nvidia.com")], env=poc.env, capture_output=True,
                               text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert watch.returncode == 0, watch.stdout + watch.stderr
        assert f"job {job_id} RUNNING" in watch.stdout and re.search(r"round [23] of 3 \(", watch.stdout), watch.stdout
        time.sleep(max(0.0, 10 - (time.time() - t0)))
        # The site comes back (its admin restarts it).  It does not re-enter the running job, but its report of
        # running no such job lets the server close the job; without it FLARE waits for the lost site's outcome
        # until the server's heart_beat_timeout (600 s by default).
        poc.start("italy")

        # FLARE 2.9 finishes the job once the others are done; the lost site's missing outcome makes it ABNORMAL
        assert poc.follow(job_id, timeout=600) in ("FINISHED:COMPLETED", "FINISHED:ABNORMAL")
        outputs = find_job_outputs(poc.download(job_id, tmp_path / "results"))
        assert outputs["global_model"] is not None
        log = Path(outputs["server_log"]).read_text(errors="replace")
        assert "Round 2 finished." in log  # every round ran, the last ones without italy
        results = load_cross_site(outputs["cross_site"])
        assert {"china", "japan"} <= set(results) and "italy" not in results

        poc.wait_for_clients(SITES)
        job_id = poc.submit(again)  # needs all three sites
        assert poc.follow(job_id, timeout=600) == "FINISHED:COMPLETED"
        results = load_cross_site(find_job_outputs(poc.download(job_id, tmp_path / "results"))["cross_site"])
        assert "italy" in results
    finally:
        poc.stop_and_clean()
