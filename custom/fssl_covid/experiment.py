"""The paper's experiments: a matrix of methods with the same network, budget and seeds, one results folder.

    fssl experiment synthetic3d --out results/study_a [--quick]   # Study A: synthetic 3D, cross-site matrix
    fssl experiment real2d      --out results/study_b [--quick]   # Study B: real COVID-SemiSeg slices, 2D

Methods (every one with the same network, the same total number of local epochs, the same seed):

- ``local``            each labeled site alone, supervised
- ``centralized``      all labeled data pooled, supervised
- ``centralized_ssl``  all data pooled, the same semi-supervised objective (the data-sharing reference)
- ``fedavg_supervised`` FLARE job ``jobs/fedavg_supervised`` (unlabeled data ignored)
- ``fssl``             FLARE job ``jobs/fssl_covid_seg`` (the product)
- ``fssl_no_upweight`` / ``fssl_no_threshold`` / ``fssl_ema_teacher``: ablations of ``fssl`` (where the
  study's configuration already uses the EMA teacher, ``fssl_global_teacher`` takes the teacher ablation's place)
- on request (``--methods``): ``fssl_weight_diff`` (sites send updates instead of weights: must equal ``fssl``),
  ``fssl_percentile`` / ``fssl_svt`` / ``fssl_exclude_vars`` (``fssl`` with one of FLARE's privacy filters)

Federated methods run through FLARE's simulator (real server and site components), or with ``--poc`` as real
server and client processes in FLARE's POC mode (the demo's driver, ``poc/run_demo.py``); never through a
re-implementation.
The budget: ``epochs`` total local epochs of ``iterations_per_epoch`` iterations; federated methods run
``epochs`` rounds of one local epoch each.  The results folder holds ``results.json`` (every figure),
``results.md`` (tables), PNG plots, and per method ``model_final.pt`` / ``model_best.pt`` checkpoints that carry
their configuration (usable with ``fssl predict`` / ``fssl evaluate``).
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil  # a dependency of nvflare
import torch

from .config import PRESETS_DIR, resolve_config
from .data import load_datalist
from .inference import score_cases
from .jobs import REPO, customize_job, deep_update, flare_env, run_simulator, write_site_configs
from .networks import initial_network
from .results import find_job_outputs, load_cross_site
from .trainer import SegmentationTrainer, save_checkpoint

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"

# method -> (job in jobs/, training-config patch, executor args, FLARE privacy filters on the sites' train results)
FEDERATED = {
    # the study's configuration is merged over the job's: the supervised baseline must switch the unlabeled term off
    # itself (without it, its unlabeled sites trained semi-supervised, as in fssl)
    "fedavg_supervised": ("fedavg_supervised", {"ssl": {"enabled": False}}, {}, []),
    "fssl": ("fssl_covid_seg", {}, {}, []),
    "fssl_no_upweight": ("fssl_covid_seg", {}, {"labeled_weight": 1.0}, []),
    "fssl_no_threshold": ("fssl_covid_seg", {"ssl": {"confidence_threshold": 0.0}}, {}, []),
    "fssl_ema_teacher": ("fssl_covid_seg", {"ssl": {"teacher": "ema"}}, {}, []),
    "fssl_global_teacher": ("fssl_covid_seg", {"ssl": {"teacher": "global"}}, {}, []),
    # the Dice cost of FLARE's privacy filters (docs/privacy.md); not in the default matrix
    "fssl_weight_diff": ("fssl_covid_seg", {}, {"send_weight_diff": True}, []),
    "fssl_percentile": ("fssl_covid_seg", {}, {}, ["percentile"]),
    "fssl_svt": ("fssl_covid_seg", {}, {}, ["svt"]),
    "fssl_exclude_vars": ("fssl_covid_seg", {}, {}, ["exclude_vars"]),
}
ABLATIONS = ["fssl_no_upweight", "fssl_no_threshold", "fssl_ema_teacher"]
# the teacher ablation is the teacher the study's configuration does not use
TEACHER_ABLATION = {"global": "fssl_ema_teacher", "ema": "fssl_global_teacher"}
PRIVACY_METHODS = ["fssl_weight_diff", "fssl_percentile", "fssl_svt", "fssl_exclude_vars"]
ALL_METHODS = ["local", "centralized", "centralized_ssl", "fedavg_supervised", "fssl", *ABLATIONS]
NOT_IN_OVERLAYS = set(ABLATIONS) | set(TEACHER_ABLATION.values()) | set(PRIVACY_METHODS)


@dataclass
class Study:
    name: str
    config: dict  # training config (budget included)
    sites: dict[str, dict]  # site -> datalist (absolute paths; keys training/validation/unlabeled/test)
    eval_key: str  # "test" (cross-site matrix) or "validation"
    methods: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    description: str = ""
    executor_args: dict = field(default_factory=dict)  # FSSLExecutor arguments of every federated method


def with_teacher_ablation(methods: list[str], cfg: dict) -> list[str]:
    """``methods`` with the teacher ablation set to the teacher ``cfg`` does not use (an ablation equal to the
    method itself would measure nothing)."""
    ablation = TEACHER_ABLATION[cfg["ssl"]["teacher"]]
    return [ablation if m in TEACHER_ABLATION.values() else m for m in methods]


def set_epochs(cfg: dict, epochs: int) -> None:
    """A study's budget in epochs; the tail-averaged epochs (``train.average_last_epochs``, and the teacher's
    ``ssl.teacher_average_last_epochs``) keep their share of it (the 2D preset averages the last half)."""
    train, ssl = cfg["train"], cfg["ssl"]
    for section, key in ((train, "average_last_epochs"), (ssl, "teacher_average_last_epochs")):
        section[key] = round(int(section[key]) * epochs / int(train["epochs"]))
    train["epochs"] = epochs


STUDY_PRESETS = {"synthetic3d": "synthetic3d", "real2d": "covid2d"}  # study -> its configuration in presets/
# study -> its sites, each with whether it trains on masks (--sites chooses a subset; one labeled site must stay)
STUDY_SITES = {"synthetic3d": {"china": True, "italy": True, "japan": False},
               "real2d": {"italy": True, "coronacases": False, "radiopaedia": False}}


def _preset(name: str) -> dict:
    return json.loads((PRESETS_DIR / f"{name}.json").read_text())


def study_synthetic3d(out: Path, quick: bool, mosmed: str | None = None,
                      labels_per_site: int | None = None) -> Study:
    """``labels_per_site``: each labeled site keeps the masks of its first N training scans and its other training
    scans join its unlabeled ones (None: all the generator's masks, china 6 and italy 4)."""
    from .synthetic import make_federation

    data = out / "data"
    paths = make_federation(data, seed=0, mosmed_dir=mosmed)
    cfg = resolve_config(_preset(STUDY_PRESETS["synthetic3d"]))
    if quick:
        cfg["network"]["channels"] = [8, 16, 32]
        cfg["network"]["strides"] = [2, 2]
        cfg["data"]["patch_size"] = [32, 32, 16]
        set_epochs(cfg, 6)
        cfg["train"]["iterations_per_epoch"] = 10
        # The unsupervised term starts at the fourth of six epochs: after one supervised epoch the teacher could
        # still be all background and its pseudo-labels collapsed the model to empty masks now and then; after two
        # it still did once in a while (seventh session: fssl Dice 0.0 at all three sites, once in ~5 runs).
        cfg["ssl"].update({"warmup_epochs": 3, "rampup_epochs": 2})
    sites = {s: load_datalist(p) for s, p in paths.items()}
    if labels_per_site is not None:
        for d in sites.values():
            kept, moved = d["training"][:labels_per_site], d["training"][labels_per_site:]
            d["training"] = kept
            d["unlabeled"] = [{"image": c["image"]} for c in moved] + list(d.get("unlabeled", []))
    counts = ", ".join(f"{s} {len(d['training'])} labeled + {len(d['unlabeled'])} unlabeled"
                       for s, d in sites.items())
    return Study("synthetic3d", cfg, sites, "test", list(ALL_METHODS),
                 description="Study A: synthetic 3D chest CT (china, italy, japan), held-out labeled test scans at "
                             f"every site; the cross-site matrix is Dice of each model on each site's test scans. "
                             f"Training scans: {counts}.")


def study_real2d(out: Path, quick: bool, root: Path | None = None, n_validation: int = 10, seed: int = 0,
                 fold: int = 0, labels_per_site: int | None = None) -> Study:
    """Study B.  Italy's labeled slices are shuffled once with a fixed seed and cut into disjoint folds of
    ``n_validation``; fold ``fold`` is the validation split (never trained on), the rest trains.  Fold 0 is the
    study's split; folds 1.. give a cross-validation over other held-out slices (``fssl experiment --fold K``).
    ``labels_per_site`` N: italy keeps the masks of N of its training slices (the first N of the same shuffled
    order) and its other training slices join the study as italy's own unlabeled slices (None: all 40 labeled)."""
    root = Path(root or SHARED_DATA / "covid_semiseg")
    if not (root / "italy.json").is_file():
        raise FileNotFoundError(f"COVID-SemiSeg datalists not found in {root} (see ../shared/data/README.md)")
    italy = load_datalist(root / "italy.json")["training"]
    folds = len(italy) // n_validation  # 50 slices: five folds of 10
    if not 0 <= fold < folds:
        raise ValueError(f"--fold {fold}: italy's {len(italy)} labeled slices give folds 0 to {folds - 1} "
                         f"of {n_validation} validation slices")
    order = list(range(len(italy)))
    random.Random(seed).shuffle(order)  # fixed, seeded split: validation slices are never trained on
    held_out = order[fold * n_validation:(fold + 1) * n_validation]
    validation = sorted(held_out)
    rest = [i for i in order if i not in held_out]
    if labels_per_site is not None and not labels_per_site <= len(rest):
        raise ValueError(f"--labels-per-site {labels_per_site}: italy has {len(rest)} training slices")
    kept = sorted(rest[:labels_per_site] if labels_per_site is not None else rest)
    train = [italy[i] for i in kept]
    italy_unlabeled = [{"image": italy[i]["image"]} for i in sorted(set(rest) - set(kept))]
    sites = {
        "italy": {"training": train, "validation": [italy[i] for i in validation], "unlabeled": italy_unlabeled,
                  "test": []},
        "coronacases": {"training": [], "validation": [], "test": [],
                        "unlabeled": load_datalist(root / "coronacases.json")["unlabeled"]},
        "radiopaedia": {"training": [], "validation": [], "test": [],
                        "unlabeled": load_datalist(root / "radiopaedia.json")["unlabeled"]},
    }
    cfg = resolve_config(_preset(STUDY_PRESETS["real2d"]))
    if quick:
        cfg["data"]["patch_size"] = [96, 96]
        cfg["network"]["channels"] = [8, 16, 32]
        cfg["network"]["strides"] = [2, 2]
        set_epochs(cfg, 4)
        cfg["train"].update({"iterations_per_epoch": 6, "batch_size": 4, "unlabeled_batch_size": 4})
        cfg["ssl"].update({"warmup_epochs": 1, "rampup_epochs": 1})
        for s in ("coronacases", "radiopaedia"):
            sites[s]["unlabeled"] = sites[s]["unlabeled"][:24]
    methods = ["local", "centralized_ssl", "fssl", *ABLATIONS]
    (out / "split.json").parent.mkdir(parents=True, exist_ok=True)
    (out / "split.json").write_text(json.dumps({"seed": seed, "fold": fold, "folds": folds,
                                                "italy_validation_indices": validation,
                                                "italy_labeled_indices": kept}, indent=1))
    # One labeled site with 40 slices against 541 unlabeled slices: at the job's labeled_weight (2) the two
    # unlabeled-only sites carry 40 % of the average and every round pulls italy's model back (README, Study B).
    # x20 gives italy ~94 % of the weight; fssl_no_upweight (1) shows the difference.
    return Study("real2d", cfg, sites, "validation", methods, executor_args={"labeled_weight": 20.0},
                 description="Study B: real COVID-SemiSeg slices (Fan et al., IEEE TMI 2020; non-commercial). "
                             f"italy: {len(train)} labeled training slices"
                             + (f" and {len(italy_unlabeled)} of its training slices unlabeled (their masks unused)"
                                if italy_unlabeled else "")
                             + f", {n_validation} held-out validation slices "
                             f"(fixed seeded split, fold {fold} of {folds}, never trained on); coronacases and "
                             "radiopaedia: unlabeled. "
                             "Federated methods: labeled_weight 20 (fssl_no_upweight: 1).")


# ---------------------------------------------------------------------------------------------- evaluation
def evaluate_model(cfg: dict, weights: dict, cases: list[dict], device: str) -> dict:
    """``score_cases`` of a model: Dice at 0.5 and "mean" Dice, each scan on its own grid."""
    if not cases:
        return {}
    trainer = SegmentationTrainer(cfg, {}, device=device)
    trainer.set_weights(weights)
    return score_cases(trainer, cases)


def _labeled_union(study: Study, key: str) -> list[dict]:
    return [c for s in study.sites.values() for c in s[key]]


# ---------------------------------------------------------------------------------------------- methods
def run_centralized(study: Study, method: str, seed: int, out: Path, device: str) -> dict:
    """local / centralized / centralized_ssl: SegmentationTrainer.fit on one site or the pool."""
    cfg = copy.deepcopy(study.config)
    cfg["train"]["seed"] = seed
    cfg["ssl"]["enabled"] = method == "centralized_ssl"
    cfg["train"]["num_threads"] = study_threads(study)
    validation = _labeled_union(study, "validation")
    if method == "local":
        groups = {s: d for s, d in study.sites.items() if d["training"]}
    else:
        groups = {"pooled": {k: _labeled_union(study, k) for k in ("training", "unlabeled")}}
    runs = {}
    for name, data in groups.items():
        run_dir = out / (method if method != "local" or len(groups) == 1 else f"local_{name}")
        t0 = time.time()
        trainer = SegmentationTrainer(cfg, {"training": data["training"], "unlabeled": data.get("unlabeled", []),
                                            "validation": validation}, device=device)
        fit = trainer.fit()
        save_checkpoint(run_dir / "model_final.pt", trainer.get_weights(), trainer.cfg)
        best = trainer.best_weights or trainer.get_weights()
        save_checkpoint(run_dir / "model_best.pt", best, trainer.cfg)
        runs[run_dir.name] = {"curve": [h["val_dice"] for h in fit["history"]], "seconds": time.time() - t0,
                              "final": trainer.get_weights(), "best": best, "cfg": trainer.cfg, "trained_at": [name]}
        if fit["averaged_epochs"]:  # the final model is a tail average: keep and score the last epoch's own
            save_checkpoint(run_dir / "model_last.pt", trainer.last_weights, trainer.cfg)
            runs[run_dir.name]["last"] = trainer.last_weights
    return runs


def study_threads(study: Study) -> int:
    """Torch CPU threads of every training process, centralized or a federated site: ``train.num_threads``, 1 when
    unset.  The same for all methods because the thread count changes the order of floating-point sums, and a run
    is chaotic in it: `local`, Study B seed 0, one network, one seed, scored 0.759 on two threads and 0.733 on one
    (2026-11-27, 2 CPU cores).  One thread, because the simulator runs a process per site on the same cores."""
    return int(study.config["train"]["num_threads"]) or 1


def federated_settings(study: Study, method: str, seed: int) -> tuple[dict, dict, int]:
    """(training config, executor args, rounds) of a federated method: one local epoch per round, so the same
    total number of local epochs as the centralized methods; the method's patch over the study's config."""
    _, config_patch, method_args, _ = FEDERATED[method]
    cfg = copy.deepcopy(study.config)
    cfg["train"]["seed"] = seed
    rounds = int(cfg["train"]["epochs"])
    cfg["train"]["epochs"] = 1
    deep_update(cfg, config_patch)
    return cfg, {**study.executor_args, **method_args}, rounds


def federated_averaging(cfg: dict) -> int:
    """The server's ``average_last_rounds`` for a federated method's config (one epoch a round: the same models
    averaged as ``train.average_last_epochs`` averages in centralized training); the sites' copy is set to 0."""
    rounds = int(cfg["train"].get("average_last_epochs", 0))
    cfg["train"]["average_last_epochs"] = 0
    return rounds


def run_federated(study: Study, method: str, seed: int, out: Path, device: str, poc: bool = False) -> dict:
    job_name, _, _, privacy = FEDERATED[method]
    cfg, executor_args, rounds = federated_settings(study, method, seed)
    average_last_rounds = federated_averaging(cfg)
    run_dir = (out / method).resolve()  # FLARE's processes run elsewhere: every path they are given is absolute
    sites = list(study.sites)
    datalists = {}  # each site's settings (its local/fssl_site.json)
    for site, data in study.sites.items():
        path = run_dir / "datalists" / f"{site}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({k: data[k] for k in ("training", "validation", "unlabeled", "test")}))
        datalists[site] = {"datalist": str(path), "device": device, "num_threads": study_threads(study),
                           "eval_key": study.eval_key}
    # the server starts from the network the centralized methods of this seed start from (not an unseeded one of
    # its own): the methods of one seed are paired, and a federated run repeats
    full_cfg = resolve_config(cfg)
    init = run_dir / "initial_model.pt"
    start = initial_network(full_cfg["network"], seed).state_dict()
    save_checkpoint(init, start, full_cfg)
    job = customize_job(job_name, run_dir / "job", rounds=rounds, config=cfg, executor_args=executor_args,
                        min_clients=len(sites), job_name=method, privacy=privacy, init_model=init,
                        average_last_rounds=average_last_rounds)
    t0 = time.time()
    if poc:
        outputs, log = _run_in_poc(job, run_dir / "poc", datalists, method)
    else:
        env = flare_env(run_dir, FSSL_SITE_CONFIGS=str(write_site_configs(run_dir / "site_configs", datalists)))
        proc = run_simulator(job, run_dir / "simulator", sites, env, log_file=run_dir / "simulator.log")
        if proc.returncode != 0:
            raise RuntimeError(f"{method}: FLARE simulator failed (exit {proc.returncode}); "
                               f"see {run_dir / 'simulator.log'}")
        outputs, log = find_job_outputs(run_dir / "simulator" / "server" / "simulate_job"), proc.stdout + proc.stderr
    final = torch.load(outputs["global_model"], weights_only=True)["model"]
    if all(torch.equal(final[k], start[k]) for k in start):  # e.g. no site could open its cases
        where = run_dir / ("poc_results" if poc else "simulator.log")
        raise RuntimeError(f"{method}: the global model never changed from its initial weights: no site trained. "
                           f"Each site's 'ready on' line in {where} says how many cases it could use.")
    best = torch.load(outputs["best_model"], weights_only=True)["model"] if outputs["best_model"] else final
    save_checkpoint(run_dir / "model_final.pt", final, full_cfg)
    save_checkpoint(run_dir / "model_best.pt", best, full_cfg)
    run = {"curve": _round_curve(log, study), "seconds": time.time() - t0, "final": final, "best": best,
           "cfg": full_cfg, "trained_at": sites, "flare_cross_site": load_cross_site(outputs["cross_site"])}
    if outputs["last_round_model"]:  # the final global model is a tail average: keep and score the last round's
        run["last"] = torch.load(outputs["last_round_model"], weights_only=True)["model"]
        save_checkpoint(run_dir / "model_last.pt", run["last"], full_cfg)
    return {method: run}


def _run_in_poc(job: Path, work: Path, site_settings: dict[str, dict], method: str,
                timeout: float = 6 * 3600) -> tuple[dict, str]:
    """One job in FLARE's POC mode (a real server and one client process per site on this machine, with the demo's
    ``Poc`` driver): prepare, write each site's settings into its kit, start, submit, follow, download, stop and
    clean.  Returns the downloaded job's outputs (:func:`find_job_outputs`) and the sites' logs (the round curve;
    every site is on this machine)."""
    if str(REPO / "poc") not in sys.path:
        sys.path.insert(0, str(REPO / "poc"))
    from run_demo import DemoError, Poc  # the demo's POC driver: one copy of that code

    from .site_settings import write_settings

    shutil.rmtree(work, ignore_errors=True)
    poc = Poc(work)
    poc.env["TMPDIR"] = flare_env(work)["TMPDIR"]  # short enough for FLARE's Unix sockets
    sites = list(site_settings)
    try:
        poc.prepare(sites)
        for site, settings in site_settings.items():
            write_settings(poc.kits / site, settings)
        poc.start()
        poc.wait_for_clients(sites)
        job_id = poc.submit(job)
        status = poc.follow(job_id, timeout=timeout, poll=10.0)
        if not status.startswith("FINISHED"):
            raise RuntimeError(f"{method}: POC job ended as {status}; see {poc.kits / 'server' / 'log.txt'}")
        download = poc.download(job_id, work.parent / "poc_results")
        logs = []
        for site in sites:  # every site runs on this machine: keep its log with the results
            log = poc.kits / site / job_id / "log.txt"
            if log.is_file():
                shutil.copy(log, download / f"{site}.log.txt")
                logs.append(log.read_text(errors="replace"))
        return find_job_outputs(download), "\n".join(logs)
    except DemoError as e:
        raise RuntimeError(f"{method}: {e}") from e
    finally:
        poc.stop_and_clean()


def _round_curve(log: str, study: Study) -> list[float]:
    """Validation Dice of the global model received in each round, averaged over the sites that report it."""
    per_round: dict[int, list[float]] = {}
    for line in log.splitlines():
        if "val_dice received" in line and "round " in line:
            try:
                rnd = int(line.split("round ", 1)[1].split("/", 1)[0])
                value = line.split("val_dice received ", 1)[1].split(" ", 1)[0]
            except (IndexError, ValueError):
                continue
            if value != "n/a":
                per_round.setdefault(rnd, []).append(float(value))
    return [float(np.mean(per_round[r])) for r in sorted(per_round)]


# ---------------------------------------------------------------------------------------------- runner
def run_cell(study: Study, method: str, seed: int, seed_dir: Path, device: str, poc: bool = False) -> dict:
    """One cell of the matrix (a method at a seed): its training runs, weights included, in this process."""
    if method in FEDERATED:
        return run_federated(study, method, seed, seed_dir, device, poc=poc)
    return run_centralized(study, method, seed, seed_dir, device)


def check_jobs(jobs: int, poc: bool) -> None:
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    if jobs > 1 and poc:
        raise ValueError("--jobs above 1 needs the simulator: POC mode runs one job at a time on its fixed ports")


def run_study(study: Study, out: Path, device: str = "auto", methods: list[str] | None = None,
              log=print, poc: bool = False, jobs: int = 1) -> dict:
    """Train and score every (method, seed) cell; ``jobs`` > 1 trains that many cells side by side, each in its own
    process (every training process uses ``train.num_threads`` torch threads, 1 when unset, so two cells fit two
    CPU cores; on a GPU they share the device).  A cell's figures do not depend on ``jobs``."""
    check_jobs(jobs, poc)
    out.mkdir(parents=True, exist_ok=True)
    methods = methods or study.methods
    results: dict = {"study": study.name, "description": study.description, "config": study.config,
                     "seeds": study.seeds, "eval_key": study.eval_key, "executor_args": study.executor_args,
                     "flare": "poc" if poc else "simulator", "methods": {}}
    eval_sets = {s: d[study.eval_key] for s, d in study.sites.items() if d[study.eval_key]}
    cells = [(method, seed) for method in methods for seed in study.seeds]
    origin: dict[str, int] = {}  # run name -> index of its cell, to keep the tables in the matrix's order

    def record(cell: int, runs: dict) -> None:
        method, seed = cells[cell]
        for name, run in runs.items():
            entry = {"seconds": round(run["seconds"], 1), "curve": run["curve"], "trained_at": run["trained_at"]}
            for which in ("final", "best", "last"):  # "last": a tail-averaged run's last epoch / round alone
                if which in run:
                    entry[which] = {site: evaluate_model(run["cfg"], run[which], cases, device)
                                    for site, cases in eval_sets.items()}
            origin.setdefault(name, cell)
            results["methods"].setdefault(name, {})[str(seed)] = entry
            summary = ", ".join(f"{s} {v['dice']:.3f}" for s, v in entry["final"].items())
            log(f"    {name} seed {seed}: final Dice {summary} ({entry['seconds']:.0f} s)")
        results["methods"] = {k: {str(s): results["methods"][k][str(s)] for s in study.seeds
                                  if str(s) in results["methods"][k]}
                              for k in sorted(results["methods"], key=origin.__getitem__)}
        (out / "results.json").write_text(json.dumps(results, indent=1))

    if jobs <= 1:
        for i, (method, seed) in enumerate(cells):
            log(f"[{study.name}] {method} seed {seed} ...")
            record(i, run_cell(study, method, seed, out / f"seed{seed}", device, poc=poc))
    else:
        _run_cells_side_by_side(study, cells, out, device, jobs, record, log)
    (out / "results.md").write_text(markdown_tables(results))
    plot_results(results, out)
    plot_study_overlays(out, [m for m in results["methods"] if m not in NOT_IN_OVERLAYS], eval_sets, device,
                        seed=study.seeds[0])
    return results


def _run_cells_side_by_side(study: Study, cells: list[tuple[str, int]], out: Path, device: str, jobs: int,
                            record, log) -> None:
    """``jobs`` worker processes (spawned: no forked torch state) train the cells; each finished cell is scored and
    written at once.  After a failure no new cell starts, the running ones finish and are kept, then it is raised."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    log(f"[{study.name}] {len(cells)} cells, {jobs} side by side")
    failure: tuple[str, BaseException] | None = None
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_stop_with_runner, initargs=(os.getpid(),)) as pool:
        pending = {pool.submit(run_cell, study, method, seed, out / f"seed{seed}", device): i
                   for i, (method, seed) in enumerate(cells)}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                i = pending.pop(future)
                method, seed = cells[i]
                if future.cancelled():
                    continue
                error = future.exception()
                if error is None:
                    record(i, future.result())
                elif failure is None:
                    failure = (f"{method} seed {seed}", error)
                    log(f"    {method} seed {seed} FAILED: {error}; no new cell starts, the running ones finish")
                    for other in pending:
                        other.cancel()
    if failure is not None:
        raise RuntimeError(f"{failure[0]} failed: {failure[1]}") from failure[1]


def _stop_with_runner(runner_pid: int, poll_seconds: float = 2.0) -> None:
    """Pool initializer of a cell's worker: once the runner that spawned it is gone (stopped with SIGTERM, its
    terminal killed), the worker ends its own descendants (a cell's FLARE simulator) and itself, instead of training
    on as an orphan whose result no one records (seen 2026-11-27: two orphaned workers finished two cells, two others
    idled for 1.5 h).  Ctrl-C reaches the whole process group and needs none of this."""
    def watch() -> None:
        while os.getppid() == runner_pid:
            time.sleep(poll_seconds)
        _kill_descendants()
        os._exit(1)

    threading.Thread(target=watch, name="stop-with-runner", daemon=True).start()


def _kill_descendants() -> None:
    """Kill every process this one started, and theirs (cell workers, FLARE simulators and their site workers)."""
    for child in psutil.Process().children(recursive=True):
        try:
            child.kill()
        except psutil.Error:
            pass


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class _Stopped(BaseException):
    """Raised in the runner by SIGTERM / SIGHUP, so that the cleanups on the way out run (a cell's ``finally``:
    ``poc stop`` and ``poc clean``); a BaseException, so that no ``except Exception`` takes it for a failed cell."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by signal {signum}")
        self.signum = signum


@contextmanager
def _stopped_with_descendants():
    """While a study runs: a runner stopped with SIGTERM or SIGHUP (``kill``, ``timeout``, a closed terminal) ends the
    processes it started, runs the cleanups of the cell it was in (``--poc``: ``poc stop`` / ``poc clean`` end the
    POC server and clients, which ``nvflare poc start`` detached from the runner), then dies of the signal as before.
    Without it, a cell run in the runner's own process (``--jobs 1``) left its FLARE simulator (seen 2026-11-28) or
    its POC processes (12, checked 2026-11-28) training on as orphans.  A second signal during the cleanups stops at
    once.  A signal ignored at the start (``nohup``: SIGHUP) stays ignored.  Ctrl-C reaches the whole process group
    and needs none of this; SIGKILL cannot be caught (``--jobs N``: ``_stop_with_runner``)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, _frame) -> None:
        _kill_descendants()
        for s in previous:  # a second signal while the cleanups run: the default, at once
            signal.signal(s, signal.SIG_DFL)
        raise _Stopped(signum)

    # a signal ignored when the runner started stays ignored (`nohup fssl experiment …` must survive SIGHUP)
    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    except _Stopped as stopped:
        signal.signal(stopped.signum, signal.SIG_DFL)
        os.kill(os.getpid(), stopped.signum)
        raise  # not reached: the default action of SIGTERM / SIGHUP ends the process
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _mean_std(values: list[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(np.std(values)) if len(values) > 1 else 0.0


LAST_NOTE = ("The final models above are tail averages (`train.average_last_epochs`); these are the last "
             "epoch's (round's) models alone, from the same runs.")


def markdown_tables(results: dict) -> str:
    sites = sorted({s for m in results["methods"].values() for r in m.values() for s in r["final"]})
    lines = [f"# {results['study']}", "", results["description"], "",
             f"Seeds: {results['seeds']}. Scores: Dice at 0.5 and mean Dice over 256 thresholds "
             f"(per image, then averaged) on each site's `{results['eval_key']}` scans; mean ± std over seeds.", ""]
    kinds = ["final", "best"] + (["last"] if any("last" in r for m in results["methods"].values()
                                                 for r in m.values()) else [])
    for which in kinds:
        lines += [f"## {which} model", ""] + ([LAST_NOTE, ""] if which == "last" else [])
        lines += ["| method | " + " | ".join(f"{s} Dice" for s in sites) + " | "
                  + " | ".join(f"{s} mean-Dice(256)" for s in sites) + " | time (s) |",
                  "|" + "---|" * (2 * len(sites) + 2)]
        for method, by_seed in results["methods"].items():
            cells = []
            for metric in ("dice", "mean_dice_256"):
                for s in sites:
                    vals = [r[which][s][metric] for r in by_seed.values()
                            if s in r.get(which, {}) and r[which][s]]
                    if vals:
                        m, sd = _mean_std(vals)
                        cells.append(f"{m:.3f}" + (f" ± {sd:.3f}" if len(vals) > 1 else ""))
                    else:
                        cells.append("-")
            secs = np.mean([r["seconds"] for r in by_seed.values()])
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {secs:.0f} |")
        lines.append("")
    lines.append("The empty-mask baseline (no lesion predicted) scores Dice 0 on every scan with a lesion.")
    return "\n".join(lines) + "\n"


def plot_results(results: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, by_seed in results["methods"].items():
        curve = next(iter(by_seed.values()))["curve"]
        if curve:
            ax.plot(range(1, len(curve) + 1), curve, marker="o", ms=3, label=method)
    ax.set_xlabel("epoch (centralized) / round (federated)")
    ax.set_ylabel("validation Dice")
    ax.set_title(f"{results['study']}: validation Dice during training (seed {results['seeds'][0]})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(out / "dice_per_round.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    sites = sorted({s for m in results["methods"].values() for r in m.values() for s in r["final"]})
    methods = list(results["methods"])
    matrix = np.array([[np.mean([r["final"][s]["dice"] for r in results["methods"][m].values() if r["final"].get(s)])
                        if any(r["final"].get(s) for r in results["methods"][m].values()) else np.nan
                        for s in sites] for m in methods])
    fig, ax = plt.subplots(figsize=(1.6 * len(sites) + 3, 0.45 * len(methods) + 1.5))
    im = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(sites)), [f"tested at {s}" for s in sites])
    ax.set_yticks(range(len(methods)), methods)
    for i in range(len(methods)):
        for j in range(len(sites)):
            if not np.isnan(matrix[i, j]):
                ax.text(j, i, f"{matrix[i, j]:.3f}", ha="center", va="center",
                        color="white" if matrix[i, j] < 0.6 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, label="Dice (final model)")
    ax.set_title(f"{results['study']}: trained where (rows) x tested where (columns)")
    fig.tight_layout()
    written.append(out / "cross_site_matrix.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


def plot_study_overlays(out: Path, methods: list[str], eval_sets: dict[str, list[dict]], device: str,
                        seed: int = 0, n_cases: int = 3) -> list[Path]:
    """``overlays_<site>.png``: the final model (``seed<seed>/<method>/model_final.pt``) of each method (rows) on the
    site's first ``n_cases`` labeled evaluation scans (columns), ground truth outlined, prediction filled."""
    from .report import plot_overlay_grid
    from .trainer import load_checkpoint

    trainers = {}
    for name in methods:
        path = out / f"seed{seed}" / name / "model_final.pt"
        if path.is_file():
            state, cfg = load_checkpoint(path)
            trainers[name] = SegmentationTrainer(cfg, {}, device=device)
            trainers[name].set_weights(state)
    written = []
    for site, cases in eval_sets.items():
        chosen = [c for c in cases if c.get("label")][:n_cases]
        if chosen and trainers:
            path = out / f"overlays_{site}.png"
            plot_overlay_grid(trainers, chosen, path, prediction_label="final model of the row's method (lesion)",
                              title=f"{site}: {len(chosen)} evaluation scans; rows: each method's final model "
                                    f"(seed {seed})")
            written.append(path)
    return written


def _labels_per_site(value: str | int | None) -> int | None:
    if value is None or str(value) == "all":
        return None
    if not str(value).isdigit() or int(value) < 1:
        raise ValueError(f"--labels-per-site {value!r}: expected a number of scans (1 or more) or 'all'")
    return int(value)


def check_sites(study_name: str, sites: list[str] | None) -> None:
    """Refuse a ``--sites`` subset with an unknown or repeated site, or with no site that trains on masks."""
    if sites is None:
        return
    known = STUDY_SITES[study_name]
    unknown = [s for s in sites if s not in known]
    if unknown or len(set(sites)) != len(sites):
        raise ValueError(f"--sites {' '.join(sites)}: {study_name}'s sites are {', '.join(known)}, each once")
    if not any(known[s] for s in sites):
        raise ValueError(f"--sites {' '.join(sites)}: no site with masks "
                         f"({' or '.join(s for s, labeled in known.items() if labeled)} must be one)")


def select_sites(study: Study, sites: list[str] | None) -> None:
    """Keep ``sites`` of the study (in the study's order), and say so in its description."""
    if sites is None or set(sites) == set(study.sites):
        return
    study.sites = {s: d for s, d in study.sites.items() if s in sites}
    study.description += f" This run: sites {', '.join(study.sites)} only (--sites)."


def check_settings(study_name: str, settings: dict | None) -> None:
    """Refuse an unknown study, unknown keys and bad values of ``--set``, judged over the study's own preset (so a
    2D study takes 2D shapes), before anything is written."""
    if study_name not in STUDY_PRESETS:
        raise ValueError(f"unknown study '{study_name}' (synthetic3d or real2d)")
    if settings:
        resolve_config(deep_update(_preset(STUDY_PRESETS[study_name]), settings))


def main_experiment(study_name: str, out: str, quick: bool = False, device: str = "auto",
                    methods: list[str] | None = None, seeds: list[int] | None = None, data: str | None = None,
                    epochs: int | None = None, settings: dict | None = None,
                    labeled_weight: float | None = None, labels_per_site: str | None = None,
                    poc: bool = False, jobs: int = 1, fold: int | None = None,
                    sites: list[str] | None = None) -> dict:
    out_dir = Path(out).resolve()
    check_jobs(jobs, poc)  # before any data is written
    check_settings(study_name, settings)  # before any data is written
    check_sites(study_name, sites)
    if fold is not None and study_name != "real2d":
        raise ValueError(f"--fold is for real2d (italy's validation folds); {study_name} has its own test scans")
    if study_name == "synthetic3d":
        study = study_synthetic3d(out_dir, quick, mosmed=data, labels_per_site=_labels_per_site(labels_per_site))
    else:
        study = study_real2d(out_dir, quick, root=Path(data) if data else None, fold=fold or 0,
                             labels_per_site=_labels_per_site(labels_per_site))
    select_sites(study, sites)
    if seeds:
        study.seeds = seeds
    if epochs:
        set_epochs(study.config, epochs)
    if settings:
        study.config = resolve_config(deep_update(study.config, settings))  # bad keys or values fail here
    if labeled_weight is not None:
        study.executor_args["labeled_weight"] = float(labeled_weight)
    study.methods = with_teacher_ablation(study.methods, study.config)
    known = ["local", "centralized", "centralized_ssl", *FEDERATED]
    unknown = sorted(set(methods or []) - set(known))
    if unknown:
        raise ValueError(f"unknown methods {unknown} (known: {', '.join(known)})")
    t0 = time.time()
    with _stopped_with_descendants():
        results = run_study(study, out_dir, device=device, methods=methods, poc=poc, jobs=jobs)
    results["seconds_total"] = round(time.time() - t0, 1)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    print((out_dir / "results.md").read_text())
    print(f"results in {out_dir} ({results['seconds_total']:.0f} s)")
    return results
