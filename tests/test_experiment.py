"""The experiment runner's --quick studies: methods run (federated ones through FLARE's simulator), learn, and
write one results folder with figures, tables, plots and checkpoints."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest
import torch

from conftest import COVID_SEMISEG, write_slice_site
from fssl_covid.cli import main as fssl
from fssl_covid.data import load_datalist
from fssl_covid.config import ConfigError
from fssl_covid.experiment import STUDY_SITES, check_settings, evaluate_model, study_real2d
from fssl_covid.inference import dice_at, threshold_averaged_dice
from fssl_covid.networks import build_network
from fssl_covid.trainer import SegmentationTrainer, save_checkpoint

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
    for png in ["dice_per_round.png", "cross_site_matrix.png", *(f"overlays_{s}.png" for s in sites)]:
        assert (out / png).stat().st_size > 5000
    return results


@pytest.mark.skipif(not COVID_SEMISEG.is_dir(), reason="real COVID-SemiSeg slices not present")
def test_quick_real2d_study(tmp_path):
    out = tmp_path / "b"
    methods = ["local", "centralized_ssl", "fssl"]
    assert fssl(["experiment", "real2d", "--quick", "--out", str(out), "--methods", *methods, "--jobs", "2",
                 "--labeled-weight", "10", "--set", "ssl.unsup_weight=0.5"]) == 0
    results = _check_results(out, methods, ["italy"], floor=0.2)
    # the settings reach every method, the federated one through its FLARE job's client config
    assert results["executor_args"] == {"labeled_weight": 10.0} and results["config"]["ssl"]["unsup_weight"] == 0.5
    client = json.loads((out / "seed0" / "fssl" / "job" / "fssl" / "app" / "config" / "config_fed_client.json")
                        .read_text())
    executor = client["executors"][0]["executor"]["args"]
    assert executor["labeled_weight"] == 10.0 and executor["config"]["ssl"]["unsup_weight"] == 0.5
    split = json.loads((out / "split.json").read_text())
    assert len(split["italy_validation_indices"]) == 10
    ckpt = torch.load(out / "seed0" / "fssl" / "model_best.pt", weights_only=True)
    build_network(**ckpt["config"]["network"]).load_state_dict(ckpt["model"])  # usable by fssl predict
    assert "coronacases" in results["description"]
    # the 2D preset's final models average the last half of the epochs (rounds); the last one's own is kept too
    assert results["config"]["train"]["average_last_epochs"] == 2
    for method in methods:
        assert (out / "seed0" / method / "model_last.pt").is_file() and "last" in results["methods"][method]["0"]
    assert "## last model" in (out / "results.md").read_text()
    # one numerics for all methods: the centralized trainers run on as many torch threads as each federated site
    local_threads = torch.load(out / "seed0" / "local" / "model_final.pt", weights_only=True)["config"]["train"]
    for site in ("italy", "coronacases", "radiopaedia"):
        settings = json.loads((out / "seed0" / "fssl" / "site_configs" / site / "local" / "fssl_site.json").read_text())
        assert settings["num_threads"] == local_threads["num_threads"] == 1, site


def test_quick_synthetic3d_study(tmp_path):
    out = tmp_path / "a"
    methods = ["local", "centralized", "fssl"]
    assert fssl(["experiment", "synthetic3d", "--quick", "--out", str(out), "--methods", *methods,
                 "--epochs", "6"]) == 0
    results = _check_results(out, ["local_china", "local_italy", "centralized", "fssl"],
                             ["china", "italy", "japan"], floor=0.05)
    assert results["methods"]["fssl"]["0"]["trained_at"] == ["china", "italy", "japan"]
    # paired by seed: FLARE's server starts from the network a centralized trainer of the same seed starts from
    job = out / "seed0" / "fssl" / "job" / "fssl" / "app"
    server = json.loads((job / "config" / "config_fed_server.json").read_text())
    persistor = next(c for c in server["components"] if c["id"] == "persistor")
    start = torch.load(job / "custom" / persistor["args"]["source_ckpt_file_full_name"], weights_only=True)["model"]
    cfg = {**results["config"], "train": {**results["config"]["train"], "seed": 0}}
    trainer_start = SegmentationTrainer(cfg, {}, device="cpu").get_weights()
    assert start.keys() == trainer_start.keys() and all(torch.equal(start[k], trainer_start[k]) for k in start)
    other_seed = SegmentationTrainer({**cfg, "train": {**cfg["train"], "seed": 1}}, {}, device="cpu").get_weights()
    assert not all(torch.equal(start[k], other_seed[k]) for k in start)


def _semiseg_like(root: Path, n_italy: int = 50) -> Path:
    """A folder laid out like COVID-SemiSeg (italy.json, coronacases.json, radiopaedia.json; relative paths) of
    small synthetic slices, so the split logic is tested without the real data."""
    for site, (n_labeled, n_unlabeled) in {"italy": (n_italy, 0), "coronacases": (0, 3),
                                           "radiopaedia": (0, 2)}.items():
        datalist = json.loads(write_slice_site(root / site, n_labeled, n_unlabeled).read_text())
        for items in datalist.values():
            for item in items:
                item.update({k: f"{site}/{v}" for k, v in item.items()})
        (root / f"{site}.json").write_text(json.dumps(datalist))
    return root


def test_real2d_folds_are_disjoint_validation_splits_never_trained_on(tmp_path, capsys):
    """--fold K: italy's 50 slices, shuffled once, cut into 5 disjoint validation folds of 10; fold 0 is the study's
    split (the first 10 of the shuffled order); a fold's slices never train; a fold out of range or a fold of the
    synthetic study is refused before anything is written."""
    data = _semiseg_like(tmp_path / "semiseg")
    seen = []
    for fold in range(5):
        out = tmp_path / f"fold{fold}"
        study = study_real2d(out, quick=True, root=data, fold=fold)
        italy = study.sites["italy"]
        validation = {c["image"] for c in italy["validation"]}
        training = {c["image"] for c in italy["training"]}
        assert len(validation) == 10 and len(training) == 40 and not validation & training
        split = json.loads((out / "split.json").read_text())
        assert (split["fold"], split["folds"]) == (fold, 5) and f"fold {fold} of 5" in study.description
        assert {f"{data}/italy/slice_{i:03d}_image.nii.gz" for i in split["italy_validation_indices"]} == validation
        seen.append(validation)
    assert set().union(*seen) == {c["image"] for c in load_datalist(data / "italy.json")["training"]}
    order = list(range(50))
    random.Random(0).shuffle(order)
    assert json.loads((tmp_path / "fold0" / "split.json").read_text())["italy_validation_indices"] == sorted(order[:10])
    for argv, message in ((["real2d", "--fold", "5", "--data", str(data)], "--fold 5: italy's 50 labeled slices"),
                          (["synthetic3d", "--fold", "1"], "--fold is for real2d")):
        out = tmp_path / "refused"
        assert fssl(["experiment", *argv, "--quick", "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
        assert not (out / "results.json").exists() and not (out / "seed0").exists()


def test_real2d_labels_per_site_keeps_n_masks_and_moves_italys_other_slices_to_its_unlabeled(tmp_path, capsys):
    """--labels-per-site N on real2d: italy keeps the masks of the first N training slices of the seeded order; its
    other training slices train unlabeled at italy (masks dropped); the validation fold is untouched; default: all
    40 labeled, as before; more than italy has is refused before anything is written."""
    data = _semiseg_like(tmp_path / "semiseg")
    full = study_real2d(tmp_path / "full", quick=True, root=data, fold=2).sites["italy"]
    few = study_real2d(tmp_path / "few", quick=True, root=data, fold=2, labels_per_site=15).sites["italy"]
    assert (len(full["training"]), full["unlabeled"]) == (40, [])
    assert len(few["training"]) == 15 and len(few["unlabeled"]) == 25
    assert all(set(c) == {"image"} for c in few["unlabeled"])
    assert {c["image"] for c in few["training"]} | {c["image"] for c in few["unlabeled"]} == \
        {c["image"] for c in full["training"]}
    assert few["validation"] == full["validation"]
    split = json.loads((tmp_path / "few" / "split.json").read_text())
    order = list(range(50))
    random.Random(0).shuffle(order)
    rest = [i for i in order if i not in split["italy_validation_indices"]]
    assert split["italy_labeled_indices"] == sorted(rest[:15])
    out = tmp_path / "refused"
    assert fssl(["experiment", "real2d", "--quick", "--data", str(data), "--labels-per-site", "41",
                 "--out", str(out)]) == 2
    assert "--labels-per-site 41: italy has 40 training slices" in capsys.readouterr().err
    assert not (out / "results.json").exists()


def test_sites_runs_a_study_on_a_subset_of_its_sites_federated_ones_included(tmp_path, capsys):
    """--sites: the study's own sites (and which train on masks) are what STUDY_SITES says; a subset runs through
    FLARE with those sites only (the other sites' data appear nowhere in the run) and says so in its tables; an
    unknown or repeated site, or a subset without a site that has masks, is refused before anything is written."""
    from fssl_covid.experiment import study_synthetic3d

    data = _semiseg_like(tmp_path / "semiseg")
    for name, study in (("real2d", study_real2d(tmp_path / "b", quick=True, root=data)),
                        ("synthetic3d", study_synthetic3d(tmp_path / "a", quick=True))):
        assert {s: bool(d["training"]) for s, d in study.sites.items()} == STUDY_SITES[name]
    out = tmp_path / "two"
    assert fssl(["experiment", "real2d", "--quick", "--data", str(data), "--sites", "italy", "coronacases",
                 "--methods", "fssl", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert "sites italy, coronacases only" in results["description"]
    assert "sites italy, coronacases only" in (out / "results.md").read_text()
    assert sorted(p.name for p in (out / "seed0" / "fssl" / "site_configs").iterdir()) == ["coronacases", "italy"]
    log = (out / "seed0" / "fssl" / "simulator.log").read_text()
    assert "site coronacases ready on" in log and "site italy ready on" in log and "radiopaedia" not in log
    assert set(results["methods"]["fssl"]["0"]["final"]) == {"italy"}
    for argv, message in ((["real2d", "--sites", "italy", "rome"],
                           "real2d's sites are italy, coronacases, radiopaedia"),
                          (["real2d", "--sites", "italy", "italy"], "each once"),
                          (["real2d", "--sites", "coronacases", "radiopaedia"], "no site with masks (italy must be"),
                          (["synthetic3d", "--sites", "japan"], "no site with masks (china or italy must be")):
        refused = tmp_path / "refused"
        assert fssl(["experiment", *argv, "--quick", "--data", str(data), "--out", str(refused)]) == 2
        assert message in capsys.readouterr().err
        assert not refused.exists()


def test_study_scores_are_what_fssl_predict_gives_on_each_slices_own_grid(tmp_path, tiny_2d):
    """Slices of 60-90 pixels a side under a 64 x 64 network: the runner scores a model the way its users (and Fan
    et al.) would, with `fssl predict --probabilities` against the masks as stored, not against resized masks."""
    cases = load_datalist(write_slice_site(tmp_path / "site", 6, 0))["training"]
    tiny_2d["train"].update({"iterations_per_epoch": 20, "epochs": 3, "lr": 0.01})
    trainer = SegmentationTrainer(tiny_2d, {"training": cases})
    trainer.fit()
    save_checkpoint(tmp_path / "model.pt", trainer.get_weights(), trainer.cfg)
    scores = evaluate_model(trainer.cfg, trainer.get_weights(), cases, "cpu")
    assert fssl(["predict", "--model", str(tmp_path / "model.pt"), "--probabilities", "--device", "cpu",
                 "--input", *[c["image"] for c in cases], "--out", str(tmp_path / "pred")]) == 0
    d05, dmean = [], []
    for case in cases:
        prob = nib.load(tmp_path / "pred" / Path(case["image"]).name).get_fdata()
        mask = nib.load(case["label"]).get_fdata()
        assert prob.shape == mask.shape != (64, 64, 1)
        d05.append(dice_at(prob, mask))
        dmean.append(threshold_averaged_dice(prob, mask))
    assert scores["n"] == 6 and np.mean(d05) > 0.3  # a model that finds the lesions, so the grids could differ
    assert scores["dice"] == pytest.approx(np.mean(d05), abs=1e-6)
    assert scores["mean_dice_256"] == pytest.approx(np.mean(dmean), abs=1e-6)


def test_settings_are_judged_over_the_studys_own_preset(tmp_path, capsys):
    """A 2D patch size is a valid --set for the 2D study and not for the 3D one, and the other way round; refusals
    come before anything is written."""
    check_settings("real2d", {"data": {"patch_size": [256, 256]}})
    check_settings("synthetic3d", {"data": {"patch_size": [48, 48, 16]}})
    with pytest.raises(ConfigError, match="must have 3 entries"):
        check_settings("synthetic3d", {"data": {"patch_size": [256, 256]}})
    data = _semiseg_like(tmp_path / "semiseg")
    out = tmp_path / "refused"
    assert fssl(["experiment", "real2d", "--quick", "--data", str(data), "--out", str(out),
                 "--set", "data.patch_size=[64,64,16]"]) == 2
    assert "data.patch_size [64, 64, 16] must have 2 entries" in capsys.readouterr().err
    assert not out.exists()


def test_experiment_refuses_bad_settings_before_training(tmp_path, capsys):
    out = tmp_path / "bad"
    assert fssl(["experiment", "synthetic3d", "--quick", "--out", str(out), "--set", "train.no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    assert not (out / "results.json").exists() and not (out / "seed0").exists()
    assert fssl(["experiment", "synthetic3d", "--quick", "--out", str(out), "--set", "lr=0.1"]) == 2
    assert "SECTION.KEY=VALUE" in capsys.readouterr().err
    assert fssl(["experiment", "synthetic3d", "--quick", "--out", str(out), "--labels-per-site", "none"]) == 2
    assert "--labels-per-site 'none'" in capsys.readouterr().err
    assert fssl(["experiment", "synthetic3d", "--quick", "--out", str(out), "--jobs", "2", "--poc"]) == 2
    assert "POC mode runs one job at a time" in capsys.readouterr().err
    assert not (out / "results.json").exists() and not (out / "seed0").exists()


def test_study_a_labels_per_site_moves_masks_to_unlabeled(tmp_path):
    from fssl_covid.experiment import study_synthetic3d

    full = study_synthetic3d(tmp_path / "full", quick=True).sites
    few = study_synthetic3d(tmp_path / "few", quick=True, labels_per_site=1).sites
    assert [len(full[s]["training"]) for s in ("china", "italy", "japan")] == [6, 4, 0]
    for site in full:
        n_moved = len(full[site]["training"]) - len(few[site]["training"])
        assert len(few[site]["training"]) == min(1, len(full[site]["training"]))
        assert len(few[site]["unlabeled"]) == len(full[site]["unlabeled"]) + n_moved
        assert all("label" not in c for c in few[site]["unlabeled"])  # the moved scans train without their masks
        assert [c["image"].split("/")[-1] for c in few[site]["test"]] == \
            [c["image"].split("/")[-1] for c in full[site]["test"]]  # test scans are untouched


def test_the_teacher_ablation_is_the_teacher_the_study_does_not_use():
    from fssl_covid.config import resolve_config
    from fssl_covid.experiment import ALL_METHODS, FEDERATED, with_teacher_ablation

    assert with_teacher_ablation(ALL_METHODS, resolve_config({"ssl": {"teacher": "global"}})) == ALL_METHODS
    swapped = with_teacher_ablation(ALL_METHODS, resolve_config({"ssl": {"teacher": "ema"}}))
    assert "fssl_ema_teacher" not in swapped and swapped[-1] == "fssl_global_teacher"
    assert FEDERATED["fssl_global_teacher"][1] == {"ssl": {"teacher": "global"}}


def test_federated_jobs_get_the_methods_unlabeled_term(tmp_path):
    """The study's configuration is merged over the job's: fedavg_supervised must still train without the unlabeled
    term (it once ran semi-supervised at the unlabeled sites), every fssl variant with it."""
    from fssl_covid.experiment import FEDERATED, federated_settings, study_synthetic3d
    from fssl_covid.jobs import customize_job, job_training_config

    study = study_synthetic3d(tmp_path / "study", quick=True)
    assert study.config["ssl"]["enabled"]
    for method in ("fedavg_supervised", "fssl", "fssl_no_threshold"):
        cfg, executor_args, rounds = federated_settings(study, method, seed=3)
        job = customize_job(FEDERATED[method][0], tmp_path / method, rounds=rounds, config=cfg,
                            executor_args=executor_args, job_name=method)
        written = job_training_config(job)
        assert written["ssl"]["enabled"] is (method != "fedavg_supervised"), method
        assert written["train"]["seed"] == 3 and written["train"]["epochs"] == 1
        assert rounds == study.config["train"]["epochs"]


def test_a_federated_run_in_which_no_site_trained_is_an_error(tmp_path, tiny_2d):
    """A study whose sites cannot open their scans must not report the untouched initial network as the method's
    result (it once did, when `--data` was a relative path the FLARE clients could not resolve)."""
    from fssl_covid.config import resolve_config
    from fssl_covid.data import load_datalist
    from fssl_covid.experiment import Study, run_federated

    from conftest import write_slice_site

    sites = {}
    for i, site in enumerate(("a", "b")):
        cases = load_datalist(write_slice_site(tmp_path / "data" / site, n_labeled=3, n_unlabeled=2, seed=i))
        sites[site] = {"training": cases["training"], "validation": cases["training"][:1],
                       "unlabeled": cases["unlabeled"], "test": []}
    for image in (tmp_path / "data").rglob("*_image.nii.gz"):
        image.unlink()  # every scan gone: each site skips all its cases
    cfg = resolve_config(tiny_2d)
    cfg["train"].update({"epochs": 2, "iterations_per_epoch": 2, "batch_size": 2, "unlabeled_batch_size": 2})
    study = Study("real2d", cfg, sites, "validation", ["fssl"])
    with pytest.raises(RuntimeError, match="never changed from its initial weights.*simulator.log"):
        run_federated(study, "fssl", seed=0, out=tmp_path / "out", device="cpu")


def test_cells_side_by_side_give_the_figures_of_cells_one_after_the_other(tmp_path, tiny_2d):
    """--jobs N trains N cells at once in spawned processes: the same figures (centralized cells repeat to the digit
    on one thread), the same order in results.json, every cell's checkpoints."""
    from fssl_covid.config import resolve_config
    from fssl_covid.data import load_datalist
    from fssl_covid.experiment import Study, run_study

    from conftest import write_slice_site

    cases = load_datalist(write_slice_site(tmp_path / "data", n_labeled=6, n_unlabeled=4))
    sites = {"a": {"training": cases["training"][:4], "validation": cases["training"][4:], "test": [],
                   "unlabeled": cases["unlabeled"]}}
    cfg = resolve_config(tiny_2d)
    cfg["train"].update({"epochs": 3, "iterations_per_epoch": 2, "batch_size": 2, "unlabeled_batch_size": 2})
    cfg["ssl"].update({"warmup_epochs": 1, "rampup_epochs": 1})
    results = {}
    for jobs in (1, 2):
        study = Study("real2d", cfg, sites, "validation", ["local", "centralized_ssl"], seeds=[0, 1])
        results[jobs] = run_study(study, tmp_path / f"jobs{jobs}", device="cpu", jobs=jobs, log=lambda _: None)
        for method in ("local", "centralized_ssl"):
            for seed in (0, 1):
                assert (tmp_path / f"jobs{jobs}" / f"seed{seed}" / method / "model_final.pt").is_file()
    for by_seed in (*results[1]["methods"].values(), *results[2]["methods"].values()):
        for entry in by_seed.values():
            entry.pop("seconds")
    assert list(results[2]["methods"]) == ["local", "centralized_ssl"]
    assert [list(v) for v in results[2]["methods"].values()] == [["0", "1"], ["0", "1"]]
    assert results[2]["methods"] == results[1]["methods"]
    assert results[1]["methods"]["local"]["0"] != results[1]["methods"]["local"]["1"]  # the seeds do differ
    # a cell that fails stops the study with its reason (here every cell diverges at a learning rate of 1e30)
    cfg["train"].update({"lr": 1e30, "scheduler": "constant", "max_nonfinite_steps": 2})
    study = Study("real2d", cfg, sites, "validation", ["local", "centralized_ssl"], seeds=[0])
    with pytest.raises(RuntimeError, match=r"(local|centralized_ssl) seed 0 failed: training diverged"):
        run_study(study, tmp_path / "diverged", device="cpu", jobs=2, log=lambda _: None)


RUNNER = '''
import multiprocessing, os, subprocess, sys, time
from concurrent.futures import ProcessPoolExecutor
from fssl_covid.experiment import _stop_with_runner

def cell(pid_file):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # stands in for a simulator
    with open(pid_file, "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    time.sleep(600)

if __name__ == "__main__":
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"), initializer=_stop_with_runner,
                             initargs=(os.getpid(), 0.2)) as pool:
        pool.submit(cell, sys.argv[1]).result()
'''


def test_a_cells_worker_and_its_simulator_end_when_the_runner_is_killed(tmp_path):
    """--jobs N: a runner stopped by a signal it cannot catch leaves no worker training on, nor the processes the
    worker started (before: orphans that finished cells no one recorded)."""
    script, pid_file = tmp_path / "runner.py", tmp_path / "pids"
    script.write_text(RUNNER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "custom")}
    runner = subprocess.Popen([sys.executable, str(script), str(pid_file)], env=env)

    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    try:
        for _ in range(600):  # the spawned worker imports torch: allow it a minute on a slow machine
            if pid_file.is_file() and len(pid_file.read_text().split()) == 2:
                break
            time.sleep(0.1)
        worker, child = map(int, pid_file.read_text().split())
        assert alive(worker) and alive(child)
        runner.send_signal(signal.SIGKILL)
        runner.wait()
        for _ in range(300):
            if not alive(worker) and not alive(child):
                break
            time.sleep(0.1)
        assert not alive(worker), "the cell's worker outlived its runner"
        assert not alive(child), "the process the worker started outlived it"
    finally:
        runner.kill()
        for pid in (int(p) for p in (pid_file.read_text().split() if pid_file.is_file() else [])):
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass


@pytest.mark.parametrize("jobs", [1, 2])
def test_a_runner_stopped_with_sigterm_ends_the_simulator_of_the_cell_it_runs(tmp_path, jobs):
    """`kill` / `timeout` (SIGTERM) on the runner ends its FLARE simulator and the simulator's site processes too,
    then the runner dies of the signal as before: --jobs 1 (the cell in the runner's own process; before: the
    simulator trained on as an orphan) and --jobs 2 (the cell in a worker process, which goes too)."""
    data = _semiseg_like(tmp_path / "semiseg")
    out = tmp_path / "study"
    runner = subprocess.Popen([sys.executable, "-m", "fssl_covid.cli", "experiment", "real2d", "--quick", "--data",
                               str(data), "--methods", "fssl", "--epochs", "40", "--jobs", str(jobs),
                               "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started: list[psutil.Process] = []
    try:
        for _ in range(1200):  # imports and the study's data first: allow two minutes on a slow machine
            started = psutil.Process(runner.pid).children(recursive=True)
            if any(p.info["cmdline"] and "simulator_worker" in " ".join(p.info["cmdline"])
                   for p in psutil.process_iter(["pid", "cmdline"]) if p.pid in {c.pid for c in started}):
                break
            assert runner.poll() is None, "the runner ended before its simulator's sites started"
            time.sleep(0.1)
        else:
            pytest.fail("no simulator site process started under the runner")
        started = psutil.Process(runner.pid).children(recursive=True)
        assert len(started) >= 3  # the simulator, its server side and a site process at least
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=60) == -signal.SIGTERM
        gone, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, f"outlived the runner: {[' '.join(p.cmdline()[:4]) for p in alive]}"
    finally:
        runner.kill()
        for p in started:
            try:
                p.kill()
            except psutil.Error:
                pass


NOHUP = """
import os, signal
signal.signal(signal.SIGHUP, signal.SIG_IGN)  # what nohup does
from fssl_covid.experiment import _stopped_with_descendants
with _stopped_with_descendants():
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    assert callable(signal.getsignal(signal.SIGTERM))
    os.kill(os.getpid(), signal.SIGHUP)
print("survived")
"""


def test_a_runner_started_with_nohup_still_ignores_sighup():
    """The runner's stop handler takes over SIGTERM and SIGHUP, but not a signal ignored when it started: a study
    run with `nohup` goes on when its terminal closes."""
    proc = subprocess.run([sys.executable, "-c", NOHUP], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "survived" in proc.stdout, proc.stderr


CLEANUP = """
import subprocess, sys, time
from pathlib import Path
from fssl_covid.experiment import _stopped_with_descendants
marker = Path(sys.argv[1])
with _stopped_with_descendants():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    # like `nvflare poc start`: a server the runner started, but not its descendant (its own session, no parent)
    detached = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        print(child.pid, detached.pid, flush=True)
        time.sleep(600)
    finally:  # what `_run_in_poc` does on the way out: `poc stop` ends the detached server
        detached.kill()
        marker.write_text("cleaned")
"""


def test_a_runner_stopped_with_sigterm_runs_its_cleanups_before_it_dies(tmp_path):
    """--poc: SIGTERM on the runner must still run the cell's `finally` (`poc stop`, `poc clean`), which ends the POC
    server and clients that `nvflare poc start` detached from the runner (before: the handler killed the runner's
    descendants and died at once, and 12 POC processes trained on, checked with a real `fssl experiment --poc`)."""
    marker = tmp_path / "marker"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "custom")}
    runner = subprocess.Popen([sys.executable, "-c", CLEANUP, str(marker)], stdout=subprocess.PIPE, text=True,
                              env=env)
    pids: list[int] = []
    try:
        pids = [int(p) for p in runner.stdout.readline().split()]
        assert len(pids) == 2, "the runner did not start its two processes"
        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=60) == -signal.SIGTERM  # it still dies of the signal
        assert marker.read_text() == "cleaned"
        gone, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=30)
        assert not alive, f"outlived the runner: {[p.pid for p in alive]}"
    finally:
        runner.kill()
        for pid in pids:
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
