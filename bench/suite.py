"""The benchmark suite: each comparison run side by side in one run, medians over repeats, ratios printed.

    python bench/suite.py [--quick] [--only throughput inference grid overhead scale] [--out DIR]

Writes ``results.json`` and ``results.md`` to ``--out`` (default ``.work/bench/<date-time>``).  Nothing here is a
test: the targets of the performance issue are printed next to the measured ratios, never asserted.

Comparisons
-----------
throughput  our training loop (``SegmentationTrainer``) against a plain MONAI loop written here (same network, data,
            batch, patch, loss, optimizer), with deterministic preprocessing cached and not cached.
inference   sliding-window segmentation of one full-size CT grid with our ``predict_logits`` against plain
            ``monai.inferers.sliding_window_inference`` (same model, window and overlap).
grid        one CT volume predicted on its own grid (``GridPredictor``: preprocessing, sliding windows, resampling
            back), peak memory and time: ours (back in slabs) against MONAI ``Invertd`` (the whole volume at once).
overhead    the same local training (rounds x iterations, validation before and after each round, the cross-site
            evaluations) done (a) by the trainer alone in a fresh process, (b) as the FSSL job in FLARE's
            simulator, (c) in POC mode (real server and client processes); at a short and a realistic round.
scale       FLARE simulator rounds with 3, 6 and 12 sites, small and full-size network: round wall time and the
            server process's peak resident memory.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "custom"))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
from monai.data import DataLoader, Dataset, list_data_collate  # noqa: E402
from monai.inferers import sliding_window_inference  # noqa: E402
from monai.losses import DiceCELoss  # noqa: E402
from monai.networks.nets import UNet  # noqa: E402
from monai.transforms import (  # noqa: E402
    Compose, EnsureChannelFirstd, EnsureTyped, LoadImaged, Orientationd, RandCropByPosNegLabeld,
    ScaleIntensityRanged, Spacingd, SpatialPadd,
)

from fssl_covid.config import resolve_config  # noqa: E402
from fssl_covid.data import load_datalist  # noqa: E402
from fssl_covid.jobs import (  # noqa: E402
    customize_job, deep_update, flare_env, job_training_config, run_simulator, write_site_configs,
)
from fssl_covid.synthetic import SiteSpec, make_federation  # noqa: E402
from fssl_covid.trainer import SegmentationTrainer, resolve_device  # noqa: E402

JOB = "fssl_covid_seg"

# The job's own training configuration is the benchmark's (what sites really run); the scale comparison also
# runs it with a full-size network (about 73 MB of weights instead of the job's 0.6 MB).
FULL_NET = {"channels": [32, 64, 128, 256, 512], "strides": [2, 2, 2, 2], "num_res_units": 2}


def job_config() -> dict:
    return job_training_config(ROOT / "jobs" / JOB)


def deep_merge(base: dict, override: dict) -> dict:
    """A merged copy (``base`` untouched)."""
    return deep_update(copy.deepcopy(base), override)


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def network_megabytes(cfg: dict) -> float:
    from fssl_covid.networks import build_network
    net = build_network(**resolve_config(cfg)["network"])
    return sum(p.numel() * p.element_size() for p in net.state_dict().values()) / 2**20


# ---------------------------------------------------------------------------------------------------- data
def bench_sites(n_sites: int, labeled: int = 4, unlabeled: int = 2,
                spacing: tuple = (3.0, 3.0, 4.0)) -> list[SiteSpec]:
    return [SiteSpec(f"site{i + 1}", labeled, 1, unlabeled, 1, spacing, noise_hu=20.0 + 5 * (i % 3),
                     hu_scale=1.0, hu_offset=10.0 * (i % 3), lesion_burden=4.0, ggo_fraction=0.6)
            for i in range(n_sites)]


def make_data(root: Path, n_sites: int, spacing: tuple = (3.0, 3.0, 4.0)) -> dict[str, str]:
    """Synthetic sites for the benchmarks (written once, reused).  The default 3 x 3 x 4 mm grid is the jobs'
    training grid (small files: FLARE's costs dominate); ``spacing`` (0.75, 0.75, 1.5) writes scanner-resolution
    volumes (256 x 256 x 85), whose loading and resampling is what caching saves on real CT."""
    tag = f"{n_sites}_sites" + ("" if tuple(spacing) == (3.0, 3.0, 4.0) else "_" + "x".join(f"{v:g}" for v in spacing))
    marker = root / f"{tag}.json"
    if marker.is_file():
        return json.loads(marker.read_text())
    lists = make_federation(root / tag, sites=bench_sites(n_sites, spacing=spacing), seed=0)
    marker.write_text(json.dumps(lists))
    return lists


# ---------------------------------------------------------------------------------------------------- throughput
def plain_monai_loop(cfg: dict, cases: list[dict], iterations: int, device: torch.device, amp: bool = False,
                     warmup: int = 0) -> tuple[float, int]:
    """The reference: what a MONAI tutorial would write (AMP as the tutorials do it). Returns (seconds, samples)
    of ``iterations`` iterations after ``warmup`` untimed ones."""
    d, n, t = cfg["data"], cfg["network"], cfg["train"]
    transform = Compose([
        LoadImaged(keys=["image", "label"], image_only=True), EnsureChannelFirstd(keys=["image", "label"]),
        Orientationd(keys=["image", "label"], axcodes="RAS"),
        Spacingd(keys=["image", "label"], pixdim=d["spacing"], mode=["bilinear", "nearest"]),
        ScaleIntensityRanged(keys="image", a_min=d["intensity_range"][0], a_max=d["intensity_range"][1],
                             b_min=0.0, b_max=1.0, clip=True),
        SpatialPadd(keys=["image", "label"], spatial_size=d["patch_size"]),
        RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=d["patch_size"], pos=1,
                               neg=1, num_samples=d["samples_per_image"]),
        EnsureTyped(keys=["image", "label"], dtype=torch.float32),
    ])
    loader = DataLoader(Dataset(cases, transform), batch_size=t["batch_size"], shuffle=True, num_workers=0,
                        collate_fn=list_data_collate)
    torch.manual_seed(0)
    model = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=n["channels"], strides=n["strides"],
                 num_res_units=n["num_res_units"], norm=n["norm"]).to(device)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    opt = torch.optim.AdamW(model.parameters(), lr=t["lr"])
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    model.train()
    samples, done, start = 0, 0, time.perf_counter()
    while done < warmup + iterations:
        for batch in loader:
            if done == warmup:
                _sync(device)
                samples, start = 0, time.perf_counter()
            x, y = batch["image"].to(device), batch["label"].to(device)
            opt.zero_grad()
            with torch.autocast(device.type, enabled=amp):
                loss = loss_fn(model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            samples += x.shape[0]
            done += 1
            if done == warmup + iterations:
                break
    _sync(device)
    return time.perf_counter() - start, samples


def our_loop(cfg: dict, datalist: dict, iterations: int, device: str, warmup: int = 0) -> tuple[float, int, float]:
    """Our trainer (supervised, so both loops do the same work). Returns (seconds, samples, setup seconds) of
    ``iterations`` iterations after ``warmup`` untimed ones."""
    cfg = deep_merge(cfg, {"ssl": {"enabled": False}, "train": {"iterations_per_epoch": iterations}})
    start = time.perf_counter()
    trainer = SegmentationTrainer(cfg, {"training": datalist["training"]}, device=device)
    setup = time.perf_counter() - start
    if warmup:
        trainer.cfg["train"]["iterations_per_epoch"] = warmup
        trainer.train_epochs(1)
        trainer.cfg["train"]["iterations_per_epoch"] = iterations
    _sync(trainer.device)
    start = time.perf_counter()
    stats = trainer.train_epochs(1)
    _sync(trainer.device)
    return time.perf_counter() - start, stats["labeled_samples"], setup


def bench_throughput(data: Path, quick: bool, repeats: int, device: str) -> dict:
    # scanner-resolution volumes (what a hospital has): loading + resampling them is the cost caching removes
    spacing = (1.5, 1.5, 2.0) if quick else (0.75, 0.75, 1.5)
    datalist = load_datalist(make_data(data, 1, spacing=spacing)["site1"])
    iterations = 10 if quick else 40
    cfg = deep_merge(job_config(), {"train": {"seed": 0}})
    rows = {"ours_cached": [], "ours_uncached": [], "plain_monai": []}
    setup = []
    for _ in range(repeats):
        secs, n = plain_monai_loop(resolve_config(cfg), datalist["training"], iterations, resolve_device(device))
        rows["plain_monai"].append(n / secs)
        for name, rate in (("ours_cached", 1.0), ("ours_uncached", 0.0)):
            secs, n, s = our_loop(deep_merge(cfg, {"data": {"cache_rate": rate}}), datalist, iterations, device)
            rows[name].append(n / secs)
            if rate == 1.0:
                setup.append(s)
    med = {k: median(v) for k, v in rows.items()}
    return {"iterations": iterations, "volume_spacing_mm": list(spacing), "batch_patches": resolve_config(cfg)["train"]["batch_size"]
            * resolve_config(cfg)["data"]["samples_per_image"], "samples_per_s": med, "all": rows,
            "cache_setup_s": median(setup),
            "ratio_cached": med["ours_cached"] / med["plain_monai"],
            "ratio_uncached": med["ours_uncached"] / med["plain_monai"]}


# ---------------------------------------------------------------------------------------------------- inference
def bench_inference(quick: bool, repeats: int, device: str) -> dict:
    cfg = resolve_config(job_config())
    shape = (256, 256, 60) if quick else (512, 512, 120)
    trainer = SegmentationTrainer(cfg, {}, device=device)
    x = torch.rand((1, 1) + shape, device=trainer.device)
    model = trainer.model.eval()
    inf = cfg["inference"]
    times = {"ours": [], "plain_monai": []}
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            sliding_window_inference(x, roi_size=cfg["data"]["patch_size"], sw_batch_size=1, predictor=model,
                                     overlap=inf["overlap"])
        _sync(trainer.device)
        times["plain_monai"].append(time.perf_counter() - start)
        start = time.perf_counter()
        trainer.predict_logits(x)
        _sync(trainer.device)
        times["ours"].append(time.perf_counter() - start)
    med = {k: median(v) for k, v in times.items()}
    return {"grid": list(shape), "patch": cfg["data"]["patch_size"], "overlap": inf["overlap"], "seconds": med,
            "all": times, "ratio": med["ours"] / med["plain_monai"]}


def grid_predict(path: str, contender: str, device: str) -> dict:
    """One CT file predicted on its own grid as ``fssl predict`` / ``fssl evaluate`` / cross-site validation do
    (``GridPredictor``: preprocessing, sliding windows, ``resample_to_grid`` back to the file's grid, in slabs), in
    this fresh process; ``contender`` "invertd": the same prediction brought back by MONAI's ``Invertd`` through
    the preprocessing's inverses, the whole volume at once (what ``GridPredictor`` did until 2026-12-03)."""
    import resource
    from monai.data import MetaTensor
    from monai.transforms import Compose, Invertd
    from fssl_covid.data import preprocessing
    from fssl_covid.inference import GridPredictor
    trainer = SegmentationTrainer(resolve_config(job_config()), {}, device=device)
    predict = GridPredictor(trainer)
    if contender == "invertd":
        pre = Compose(preprocessing(trainer.cfg, ("image",), pad=False))
        invert = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True)

        def predict(file):
            data = pre({"image": file})
            x = data["image"]
            prob = torch.softmax(trainer.predict_logits(x.unsqueeze(0)), dim=1)[0, 1:2].cpu()
            data["pred"] = MetaTensor(prob, meta=x.meta, applied_operations=x.applied_operations)
            return invert(data)["pred"][0].numpy()
    start = time.perf_counter()
    prob = predict(path)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "shape": list(prob.shape)}


def bench_grid(work: Path, quick: bool, repeats: int, threads: int, device: str) -> dict:
    """Peak memory and time of predicting one CT volume on its own grid: ours (resampled back in slabs) against
    MONAI's Invertd (the whole volume at once), each in a fresh process (peak RSS is per process)."""
    import nibabel as nib
    shape = (256, 256, 64) if quick else (512, 512, 300)
    work.mkdir(parents=True, exist_ok=True)
    path = work / f"ct_{'x'.join(map(str, shape))}.nii.gz"
    ct = np.random.default_rng(0).normal(-600, 300, shape).astype(np.int16)
    nib.save(nib.Nifti1Image(ct, np.diag([0.7, 0.7, 1.0, 1.0])), str(path))
    runs = {"ours": [], "invertd": []}
    for _ in range(repeats):
        for name in ("invertd", "ours"):
            proc = subprocess.run([sys.executable, __file__, "_grid_predict", str(path), name, str(threads), device],
                                  capture_output=True, text=True, env=_env())
            if proc.returncode:
                raise RuntimeError(f"grid prediction ({name}) failed:\n{proc.stderr[-2000:]}")
            runs[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    med = {k: {m: median([r[m] for r in v]) for m in ("seconds", "peak_rss_mb")} for k, v in runs.items()}
    return {"grid": list(shape), "spacing_mm": [0.7, 0.7, 1.0], "median": med, "all": runs,
            "ratio_rss": med["ours"]["peak_rss_mb"] / med["invertd"]["peak_rss_mb"],
            "ratio_seconds": med["ours"]["seconds"] / med["invertd"]["seconds"]}


# ---------------------------------------------------------------------------------------------------- FLARE overhead
def _site_settings(datalists: dict, threads: int, device: str) -> dict:
    return {s: {"datalist": p, "device": device, "num_threads": threads} for s, p in datalists.items()}


def trainer_alone(datalist_path: str, cfg: dict, rounds: int, threads: int, device: str) -> dict:
    """What one site's executor computes in a job, without FLARE: setup, per round validate-train-validate, then
    the cross-site evaluation of three models (final global, best global, own).  Returns per-phase seconds."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    trainer = SegmentationTrainer(cfg, load_datalist(datalist_path), device=device)
    out = {"setup_s": time.perf_counter() - start, "round_s": []}
    weights = trainer.get_weights()
    for r in range(rounds):
        start = time.perf_counter()
        weights = trainer.run_round(weights, r, rounds).weights
        out["round_s"].append(time.perf_counter() - start)
    start = time.perf_counter()
    for _ in range(3):
        trainer.evaluate()
    out["cross_site_s"] = time.perf_counter() - start
    return out


def bench_overhead(data: Path, work: Path, quick: bool, repeats: int, threads: int, device: str,
                   with_poc: bool = True) -> dict:
    """Whole-job wall time and per-round time (FLARE's own log: "Round N started" to the next) against the same
    work done by the trainer alone in a fresh process."""
    datalists = make_data(data, 1)
    # seconds per iteration on this machine, to size the "realistic" round (a minute of local training)
    probe = deep_merge(job_config(), {"train": {"iterations_per_epoch": 5}, "ssl": {"warmup_epochs": 0}})
    torch.set_num_threads(threads)
    t = SegmentationTrainer(probe, load_datalist(datalists["site1"]), device=device)
    t.train_epochs(1, 0, 1)
    start = time.perf_counter()
    t.train_epochs(1, 0, 1)
    per_iter = (time.perf_counter() - start) / 5
    realistic_s = 20.0 if quick else 60.0
    profiles = {"short": 3, "realistic": max(10, int(round(realistic_s / per_iter)))}
    rounds = 3
    out = {"seconds_per_iteration": per_iter, "rounds": rounds, "threads": threads, "profiles": {}}
    contenders = ["trainer_alone", "simulator"] + (["poc"] if with_poc else [])
    for name, iters in profiles.items():
        cfg = deep_merge(job_config(), {"train": {"iterations_per_epoch": iters},
                                        "ssl": {"warmup_epochs": 0, "rampup_epochs": 0}})
        job = customize_job(JOB, work / "jobs", rounds=rounds, config=cfg, min_clients=1, job_name=f"{JOB}_{name}")
        job_s = {c: [] for c in contenders}
        round_s = {c: [] for c in contenders}
        poc_total = []
        reps = repeats if name == "short" else max(1, repeats // 2)
        for rep in range(reps):
            start = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "_trainer_alone", datalists["site1"], json.dumps(cfg),
                                   str(rounds), str(threads), device], check=True, env=_env(), capture_output=True,
                                  text=True)
            job_s["trainer_alone"].append(time.perf_counter() - start)
            round_s["trainer_alone"] += json.loads(proc.stdout.strip().splitlines()[-1])["round_s"]

            run = work / f"sim_{name}_{rep}"
            env = flare_env(run, FSSL_SITE_CONFIGS=str(write_site_configs(
                run / "site_configs", _site_settings(datalists, threads, device))))
            start = time.perf_counter()
            proc = run_simulator(job, run / "workspace", ["site1"], env)
            job_s["simulator"].append(time.perf_counter() - start)
            _check(proc, run / "workspace", "simulator")
            round_s["simulator"] += _round_seconds(run / "workspace")

            if with_poc:
                seconds, total, workspace = _poc_run(job, datalists["site1"], work / f"poc_{name}_{rep}", threads,
                                                     device)
                job_s["poc"].append(seconds)
                poc_total.append(total)
                round_s["poc"] += _round_seconds(workspace)
        med_job = {c: median(v) for c, v in job_s.items()}
        med_round = {c: median(v) for c, v in round_s.items()}
        entry = {"iterations_per_round": iters, "train_seconds_per_round": iters * per_iter, "job_s": med_job,
                 "round_s": med_round, "all_job_s": job_s, "all_round_s": round_s,
                 "ratio_job": {c: med_job[c] / med_job["trainer_alone"] for c in contenders[1:]},
                 "ratio_round": {c: med_round[c] / med_round["trainer_alone"] for c in contenders[1:]}}
        if with_poc:
            entry["poc_cycle_s"] = median(poc_total)
        out["profiles"][name] = entry
    return out


def _poc_run(job: Path, datalist: str, work: Path, threads: int, device: str) -> tuple[float, float, Path]:
    """One job in POC mode with the demo's ``Poc`` helper.  Returns (seconds from submission to the job's last
    server log line, seconds of the whole cycle: prepare, start, submit, finish, download, stop and clean, the
    downloaded workspace).  Polled every 10 s: each ``nvflare job meta`` is a new Python process that would
    otherwise take CPU from the job being measured."""
    sys.path.insert(0, str(ROOT / "poc"))
    from run_demo import Poc

    from fssl_covid.site_settings import write_settings

    start = time.perf_counter()
    poc = Poc(work)
    poc.env["PYTHONPATH"] = str(ROOT / "custom")
    try:
        poc.prepare(["site1"])
        write_settings(poc.kits / "site1", {"datalist": datalist, "device": device, "num_threads": threads})
        poc.start()
        poc.wait_for_clients(["site1"])
        submitted = time.time()
        job_id = poc.submit(job)
        status = poc.follow(job_id, timeout=1800, poll=10.0)
        if not status.startswith("FINISHED"):
            raise RuntimeError(f"POC job ended as {status}")
        workspace = poc.download(job_id, work / "results") / "workspace"
    finally:
        poc.stop_and_clean()
    stamps = _log_times(workspace / "log.txt")
    return stamps[-1] - submitted, time.perf_counter() - start, workspace


# ---------------------------------------------------------------------------------------------------- scale
def bench_scale(data: Path, work: Path, quick: bool, threads: int, device: str) -> dict:
    counts = [3, 6] if quick else [3, 6, 12]
    out = {"sites": counts, "rounds": 3, "iterations_per_round": 2, "networks": {}}
    for net_name, net in (("small", {}), ("full", FULL_NET)):
        cfg = deep_merge(job_config(), {"network": net, "train": {"iterations_per_epoch": 2},
                                        "ssl": {"warmup_epochs": 0, "rampup_epochs": 0}})
        rows = []
        for n in counts:
            datalists = make_data(data, n)
            job = customize_job(JOB, work / "jobs", rounds=out["rounds"], config=cfg, min_clients=n,
                                job_name=f"{JOB}_{net_name}_{n}")
            _without_cross_site_eval(job)
            run = work / f"scale_{net_name}_{n}"
            env = flare_env(run, FSSL_SITE_CONFIGS=str(write_site_configs(
                run / "site_configs", _site_settings(datalists, threads, device))))
            start = time.perf_counter()
            proc, peak = _with_peak_rss(lambda: run_simulator(job, run / "workspace", sorted(datalists), env))
            wall = time.perf_counter() - start
            _check(proc, run / "workspace", "simulator")
            rounds = _round_seconds(run / "workspace")
            rows.append({"sites": n, "wall_s": wall, "round_s": rounds, "median_round_s": median(rounds[1:] or rounds),
                         "server_peak_rss_mb": peak / 2**20})
        out["networks"][net_name] = {"model_mb": network_megabytes(cfg), "rows": rows}
    return out


def _without_cross_site_eval(job: Path) -> None:
    """The scale runs measure the federated rounds; cross-site evaluation (N sites x (N + 2) models, every site's
    model held by the server) is a different cost, reported in the notes, not here."""
    path = job / "app" / "config" / "config_fed_server.json"
    server = json.loads(path.read_text())
    server["workflows"] = [w for w in server["workflows"] if "CrossSiteModelEval" not in w["path"]]
    path.write_text(json.dumps(server, indent=1))


def _with_peak_rss(fn):
    """Run ``fn`` (which starts the simulator below this process) while sampling the resident memory of the
    simulator's own processes (not its ``simulator_worker`` site processes); the largest is the one where FLARE's
    server (controller, aggregator, persistor) runs."""
    me = psutil.Process()
    peak, done = 0, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            for child in me.children(recursive=True):
                try:
                    cmd = " ".join(child.cmdline())
                    if "simulator" in cmd and "simulator_worker" not in cmd:  # workers are the sites
                        peak = max(peak, child.memory_info().rss)
                except psutil.Error:
                    pass
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join()
    return result, peak


def _log_times(log: Path, pattern=None) -> list[float]:
    """Timestamps (epoch seconds) of a FLARE log's lines, optionally only those ``pattern(line)`` accepts."""
    stamps = []
    for line in log.read_text(errors="replace").splitlines():
        if pattern is None or pattern(line):
            try:
                stamps.append(datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp())
            except ValueError:
                continue
    return stamps


def _round_seconds(workspace: Path) -> list[float]:
    """Seconds of each round as the server logs them ("Round N started." to "Round N finished.")."""
    log = workspace / "server" / "log.txt"
    if not log.is_file():
        log = workspace / "log.txt"
    starts = _log_times(log, lambda line: "Round " in line and " started." in line)
    ends = _log_times(log, lambda line: "Round " in line and " finished." in line)
    return [round(b - a, 2) for a, b in zip(starts, ends)]


# ---------------------------------------------------------------------------------------------------- helpers
def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "custom")
    return env


def _check(proc: subprocess.CompletedProcess, workspace: Path, what: str) -> None:
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed ({workspace}):\n{(proc.stdout + proc.stderr)[-3000:]}")


def machine() -> dict:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1)}


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [f"# Benchmark ({results['date']}, {m['cores']} CPU cores, GPU: {m['gpu'] or 'none'}, "
             f"torch {m['torch']}, {'quick' if results['quick'] else 'full'} profile)", ""]
    if "throughput" in results:
        r = results["throughput"]
        s = r["samples_per_s"]
        lines += ["## Trainer throughput (patches/s, median)", "",
                  "| loop | patches/s | ratio to plain MONAI | target |", "|---|---|---|---|",
                  f"| plain MONAI loop | {s['plain_monai']:.2f} | 1.00 | |",
                  f"| ours, preprocessing cached | {s['ours_cached']:.2f} | {r['ratio_cached']:.2f} | >= 1.5 |",
                  f"| ours, not cached | {s['ours_uncached']:.2f} | {r['ratio_uncached']:.2f} | >= 1.0 |", "",
                  f"{r['iterations']} iterations of {r['batch_patches']} patches from 4 volumes of a 192 mm field of "
                  f"view at {' x '.join(f'{v:g}' for v in r['volume_spacing_mm'])} mm, resampled to the job's grid; "
                  f"caching the site once took {r['cache_setup_s']:.1f} s.", ""]
    if "inference" in results:
        r = results["inference"]
        lines += ["## Sliding-window inference (seconds, median)", "",
                  "| grid | plain MONAI | ours | ratio | target |", "|---|---|---|---|---|",
                  f"| {'x'.join(map(str, r['grid']))} | {r['seconds']['plain_monai']:.2f} | {r['seconds']['ours']:.2f}"
                  f" | {r['ratio']:.2f} | <= 1.0 |", ""]
    if "grid" in results:
        r = results["grid"]
        m = r["median"]
        lines += ["## One CT volume predicted on its own grid (fresh process each; median)", "",
                  "| back to the scan's grid | peak RSS MB | seconds | ratio RSS | ratio s |", "|---|---|---|---|---|",
                  f"| MONAI Invertd, whole volume | {m['invertd']['peak_rss_mb']:.0f} | {m['invertd']['seconds']:.1f} | "
                  "1.00 | 1.00 |",
                  f"| ours, in slabs | {m['ours']['peak_rss_mb']:.0f} | {m['ours']['seconds']:.1f} | "
                  f"{r['ratio_rss']:.2f} | {r['ratio_seconds']:.2f} |", "",
                  f"{'x'.join(map(str, r['grid']))} voxels at {' x '.join(f'{v:g}' for v in r['spacing_mm'])} mm, "
                  "the job's network and grid; peak RSS includes the process's Python, torch and MONAI.", ""]
    if "overhead" in results:
        r = results["overhead"]
        lines += [f"## FLARE overhead (one site, {r['rounds']} rounds, same local work; seconds, median)", "",
                  "Per round: FLARE's own log, \"Round N started\" to \"Round N finished\" (task exchange, the "
                  "site's validation, training, aggregation, persisting), against the trainer's `run_round` "
                  "(validation, training, validation). Whole job: process start to results, against the trainer "
                  "in a fresh process.", "",
                  "| round | train s | contender | s/round | ratio/round | job s | ratio/job | target |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, p in r["profiles"].items():
            label = f"{name} ({p['iterations_per_round']} it)"
            lines.append(f"| {label} | {p['train_seconds_per_round']:.1f} | trainer alone | "
                         f"{p['round_s']['trainer_alone']:.1f} | 1.00 | {p['job_s']['trainer_alone']:.1f} | 1.00 | |")
            for c, target in (("simulator", "<= 1.05"), ("poc", "<= 1.10")):
                if c in p["job_s"]:
                    lines.append(f"| {label} | | {c} | {p['round_s'][c]:.1f} | {p['ratio_round'][c]:.2f} | "
                                 f"{p['job_s'][c]:.1f} | {p['ratio_job'][c]:.2f} | {target} |")
            if "poc_cycle_s" in p:
                lines.append(f"| {label} | | POC cycle incl. prepare/start/stop/clean | | | {p['poc_cycle_s']:.1f} | | |")
        lines.append("")
    if "scale" in results:
        r = results["scale"]
        lines += [f"## Scale (simulator, {r['rounds']} rounds of {r['iterations_per_round']} iterations per site, "
                  "no cross-site evaluation)", "",
                  "| network | model MB | sites | job wall s | round s (median of rounds 2..) | per site | "
                  "server peak RSS MB | RSS / model |", "|---|---|---|---|---|---|---|---|"]
        for name, net in r["networks"].items():
            for row in net["rows"]:
                lines.append(f"| {name} | {net['model_mb']:.1f} | {row['sites']} | {row['wall_s']:.1f} | "
                             f"{row['median_round_s']:.1f} | {row['median_round_s'] / row['sites']:.2f} | "
                             f"{row['server_peak_rss_mb']:.0f} | {row['server_peak_rss_mb'] / net['model_mb']:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_grid_predict":
        path, contender, threads, device = argv[1:]
        torch.set_num_threads(int(threads))
        print(json.dumps(grid_predict(path, contender, device)))
        return 0
    if argv and argv[0] == "_trainer_alone":
        path, cfg, rounds, threads, device = argv[1:]
        print(json.dumps(trainer_alone(path, json.loads(cfg), int(rounds), int(threads), device)))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats (minutes, not an hour)")
    p.add_argument("--only", nargs="+", choices=["throughput", "inference", "grid", "overhead", "scale"])
    p.add_argument("--repeats", type=int, default=None, help="repeats per comparison (default 3, quick 1)")
    p.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)),
                   help="torch threads for every contender")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-poc", action="store_true", help="skip the POC contender of the overhead comparison")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    out = Path(args.out or ROOT / ".work" / "bench" / datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(args.threads)
    which = args.only or ["throughput", "inference", "grid", "overhead", "scale"]
    data, work = ROOT / ".work" / "bench" / "data", out / "work"
    results = {"date": datetime.now().isoformat(timespec="seconds"), "machine": machine(), "quick": args.quick,
               "repeats": repeats}
    for name in which:
        print(f"== {name}", flush=True)
        start = time.perf_counter()
        if name == "throughput":
            results[name] = bench_throughput(data, args.quick, repeats, args.device)
        elif name == "inference":
            results[name] = bench_inference(args.quick, repeats, args.device)
        elif name == "grid":
            results[name] = bench_grid(work / "grid", args.quick, repeats, args.threads, args.device)
        elif name == "overhead":
            results[name] = bench_overhead(data, work, args.quick, repeats, args.threads, args.device,
                                           with_poc=not args.no_poc)
        else:
            results[name] = bench_scale(data, work, args.quick, args.threads, args.device)
        print(f"   {time.perf_counter() - start:.0f} s", flush=True)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    text = markdown(results)
    (out / "results.md").write_text(text)
    print(text)
    print(f"results: {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
