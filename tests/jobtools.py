"""Helpers for tests that run real FLARE: copy a job from jobs/ (following the code links) and shrink it."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"


def deep_update(base: dict, override: dict) -> dict:
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


def small_job(name: str, dst: Path, rounds: int, config: dict, min_clients: int | None = None) -> Path:
    """Copy ``jobs/<name>`` to ``dst`` with ``rounds`` rounds and ``config`` merged into the training config; the
    server's network is set to the client's so both sides build the same model."""
    job = dst / name
    shutil.copytree(JOBS / name, job, symlinks=False)
    server_file = job / "app" / "config" / "config_fed_server.json"
    client_file = job / "app" / "config" / "config_fed_client.json"
    server, client = json.loads(server_file.read_text()), json.loads(client_file.read_text())
    args = client["executors"][0]["executor"]["args"]
    deep_update(args["config"], config)
    persistor = next(c for c in server["components"] if c["id"] == "persistor")
    persistor["args"]["model"]["args"] = copy.deepcopy(args["config"]["network"])
    server["num_rounds"] = rounds
    if min_clients is not None:
        server["min_clients"] = min_clients
    server_file.write_text(json.dumps(server, indent=1))
    client_file.write_text(json.dumps(client, indent=1))
    return job


def flare_env(work: Path, **extra: str) -> dict:
    """Environment for FLARE commands: its state under ``work``, this venv first on PATH."""
    env = dict(os.environ)
    env.update({"HOME": str(work / "home"), "TMPDIR": str(work / "tmp"),
                "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
                "PYTHONPATH": str(ROOT / "custom")})
    env.update(extra)
    for key in ("HOME", "TMPDIR"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    return env


def run_simulator(job: Path, workspace: Path, sites: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    nvflare = str(Path(sys.executable).parent / "nvflare")
    cmd = [nvflare, "simulator", "-w", str(workspace), "-n", str(len(sites)), "-c", ",".join(sites),
           "-t", str(len(sites)), str(job)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
