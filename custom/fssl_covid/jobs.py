"""Customizing and running the repository's FLARE jobs (for experiments and tests): copy a job from ``jobs/`` with
its code (following the per-file links), set rounds and training config, run it in FLARE's simulator."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .config import ConfigError, job_training_config as find_training_config

REPO = Path(__file__).resolve().parents[2]
JOBS = REPO / "jobs"


def deep_update(base: dict, override: dict) -> dict:
    """Merge ``override`` into ``base`` in place (nested dicts merged, other values replaced)."""
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = copy.deepcopy(v)
    return base


# FLARE's privacy filters, applied by every site to its `train` results (docs/privacy.md).  The arguments are the
# ones of FLARE's own examples; override them with ``privacy_args``.  ExcludeVars' default keeps the U-Net's PReLU
# slopes out of what is sent (a regular expression over parameter names).
PRIVACY_FILTERS: dict[str, tuple[str, dict]] = {
    "percentile": ("nvflare.app_common.filters.percentile_privacy.PercentilePrivacy",
                   {"percentile": 10, "gamma": 0.01}),
    "svt": ("nvflare.app_common.filters.svt_privacy.SVTPrivacy",
            {"fraction": 0.1, "epsilon": 0.1, "noise_var": 0.1, "gamma": 1e-5, "tau": 1e-6}),
    "exclude_vars": ("nvflare.app_common.filters.exclude_vars.ExcludeVars", {"exclude_vars": "adn\\.A\\.weight$"}),
}

INIT_MODEL = "initial_global_model.pt"  # the warm-start checkpoint's name inside a job's app/custom folder


def customize_job(name: str, dst: Path, rounds: int | None = None, config: dict | None = None,
                  executor_args: dict | None = None, min_clients: int | None = None, job_name: str | None = None,
                  source: Path = JOBS, init_model: Path | None = None, privacy: list[str] | None = None,
                  privacy_args: dict[str, dict] | None = None, average_last_rounds: int | None = None) -> Path:
    """Copy ``<source>/<name>`` to ``dst/<job_name or name>`` with ``config`` merged into the sites' training config
    (the server's network follows the sites' so both build the same model) and other executor args replaced.

    ``init_model``: warm start.  A checkpoint of an earlier job (its ``FL_global_model.pt`` or
    ``best_FL_global_model.pt``, or an ``fssl train`` checkpoint) is copied into the job's ``app/custom`` and
    FLARE's ``PTFileModelPersistor`` starts from it (``source_ckpt_file_full_name``) instead of a fresh network.
    Its keys and shapes are checked against the job's network here, before anything is submitted.

    ``privacy``: names from :data:`PRIVACY_FILTERS`, chained in this order on every site's ``train`` results
    (``privacy_args``: ``{name: {arg: value}}`` over the defaults).  The sites then send updates (``WEIGHT_DIFF``)
    and the server's aggregator expects them: the filters are written for updates, not for full weights.

    ``average_last_rounds``: the final global model is the average of the last N rounds' global models (the job's
    ``TailAveragingPersistor``; :mod:`fssl_covid.averaging`); 0 turns it off, None keeps the job's setting."""
    unknown = sorted(set(privacy or []) - set(PRIVACY_FILTERS)) + sorted(set(privacy_args or {}) - set(privacy or []))
    if unknown:
        raise ValueError(f"unknown or unused privacy filter(s) {unknown}: choose from {sorted(PRIVACY_FILTERS)}")
    if init_model is not None:  # checked before anything is written: no half-made job to submit by mistake
        init_model = Path(init_model)
        if not init_model.is_file():
            raise FileNotFoundError(f"warm-start checkpoint {init_model} does not exist")
        _check_fits(init_model, deep_update(job_training_config(Path(source) / name), config or {}))
    job = Path(dst) / (job_name or name)
    if job.exists():
        shutil.rmtree(job)
    shutil.copytree(Path(source) / name, job, symlinks=False)
    server_file = job / "app" / "config" / "config_fed_server.json"
    client_file = job / "app" / "config" / "config_fed_client.json"
    server, client = json.loads(server_file.read_text()), json.loads(client_file.read_text())
    args = client["executors"][0]["executor"]["args"]
    deep_update(args["config"], config or {})
    args.update(executor_args or {})
    persistor = next(c for c in server["components"] if c["id"] == "persistor")
    persistor["args"]["model"]["args"] = copy.deepcopy(args["config"]["network"])
    if init_model is not None:
        (job / "app" / "custom").mkdir(parents=True, exist_ok=True)
        shutil.copy(init_model, job / "app" / "custom" / INIT_MODEL)
        persistor["args"]["source_ckpt_file_full_name"] = INIT_MODEL  # relative: resolved in the app's custom/
    if average_last_rounds is not None:
        if int(average_last_rounds) < 0:
            raise ValueError(f"average_last_rounds must be 0 (off) or more, got {average_last_rounds}")
        persistor["args"]["average_last_rounds"] = int(average_last_rounds)
    if privacy:
        _add_privacy_filters(server, client, privacy, privacy_args or {})
    if rounds is not None:
        server["num_rounds"] = rounds
    if min_clients is not None:
        server["min_clients"] = min_clients
    meta_file = job / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["name"] = job.name
    if min_clients is not None:  # the job scheduler reads meta.json: a larger value there never schedules the job
        meta["min_clients"] = min_clients
    meta_file.write_text(json.dumps(meta, indent=1))
    server_file.write_text(json.dumps(server, indent=1))
    client_file.write_text(json.dumps(client, indent=1))
    return job


def _add_privacy_filters(server: dict, client: dict, names: list[str], overrides: dict[str, dict]) -> None:
    client["executors"][0]["executor"]["args"]["send_weight_diff"] = True
    aggregator = next(c for c in server["components"] if c["id"] == "aggregator")
    aggregator["args"]["expected_data_kind"] = "WEIGHT_DIFF"
    filters = [{"path": PRIVACY_FILTERS[n][0], "args": {**PRIVACY_FILTERS[n][1], **overrides.get(n, {})}}
               for n in names]
    chains = client.setdefault("task_result_filters", [])
    train_chain = next((c for c in chains if "train" in c.get("tasks", [])), None)
    if train_chain is None:  # FLARE allows a task in one chain only: extend the existing one
        chains.append({"tasks": ["train"], "filters": filters})
    else:
        train_chain["filters"].extend(filters)


def _check_fits(checkpoint: Path, config: dict) -> None:
    """Raise ValueError naming the checkpoint when its weights do not fit the job's network."""
    from .networks import build_network, weights_mismatch
    from .trainer import load_checkpoint

    try:
        state, cfg = load_checkpoint(checkpoint, config)
    except ValueError:
        raise
    except Exception as e:  # not a torch file, or not loadable with weights_only
        raise ValueError(f"warm-start checkpoint {checkpoint} cannot be read: {e}") from e
    problem = weights_mismatch(state, build_network(**cfg["network"]).state_dict())
    if problem:
        raise ValueError(f"warm-start checkpoint {checkpoint} does not fit the job's network: {problem}")


def job_training_config(job: Path) -> dict:
    """The sites' training configuration of a job folder (the executor's ``config`` argument)."""
    cfg = find_training_config(Path(job) / "app" / "config" / "config_fed_client.json")
    if cfg is None:
        raise ConfigError(f"job {job}: no FSSLExecutor config in app/config/config_fed_client.json")
    return cfg


def write_site_configs(root: Path, settings: dict[str, dict]) -> Path:
    """A folder laid out like ``site_configs/`` (``<site>/local/fssl_site.json``), for ``FSSL_SITE_CONFIGS``."""
    for site, s in settings.items():
        (Path(root) / site / "local").mkdir(parents=True, exist_ok=True)
        (Path(root) / site / "local" / "fssl_site.json").write_text(json.dumps(s, indent=1))
    return Path(root)


def _temp_dir(work: Path) -> str:
    """``work/tmp``, unless that path is too long for the Unix sockets FLARE's processes create in it (about 107
    bytes with multiprocessing's ``pymp-*/listener-*`` names): then a fresh short folder in the system temp dir."""
    candidate = Path(work).resolve() / "tmp"
    if len(str(candidate)) <= 60:
        return str(candidate)
    return tempfile.mkdtemp(prefix="fssl-")


def flare_env(work: Path, **extra: str) -> dict:
    """Environment for FLARE commands: its state under ``work``, this interpreter's bin first on PATH."""
    env = dict(os.environ)
    env.update({"HOME": str(Path(work) / "home"), "TMPDIR": _temp_dir(work),
                "PATH": str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", ""),
                "PYTHONPATH": str(REPO / "custom")})
    env.update(extra)
    for key in ("HOME", "TMPDIR"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    return env


def run_simulator(job: Path, workspace: Path, sites: list[str], env: dict, timeout: float | None = None,
                  log_file: Path | None = None) -> subprocess.CompletedProcess:
    """``nvflare simulator`` with one thread per site; returns the finished process (output captured)."""
    nvflare = str(Path(sys.executable).parent / "nvflare")
    cmd = [nvflare, "simulator", "-w", str(workspace), "-n", str(len(sites)), "-c", ",".join(sites),
           "-t", str(len(sites)), str(job)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if log_file is not None:
        Path(log_file).write_text(proc.stdout + proc.stderr)
    return proc
