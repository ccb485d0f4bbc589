"""Static checks of the job folders: importable class paths, one copy of the code, no data paths in jobs."""

import importlib
import json
import os

import pytest

from jobtools import JOBS, ROOT, customize_job, job_training_config
from fssl_covid.config import resolve_config

JOB_DIRS = sorted(p.parent for p in JOBS.glob("*/meta.json"))


def _paths(node):
    if isinstance(node, dict):
        if "path" in node:
            yield node["path"]
        for v in node.values():
            yield from _paths(v)
    elif isinstance(node, list):
        for v in node:
            yield from _paths(v)


def _configs(job):
    return [json.loads(p.read_text()) for p in sorted((job / "app" / "config").glob("config_fed_*.json"))]


def test_the_two_jobs_exist():
    assert {p.name for p in JOB_DIRS} >= {"fssl_covid_seg", "fedavg_supervised"}


@pytest.mark.parametrize("job", JOB_DIRS, ids=lambda p: p.name)
def test_every_class_path_is_importable(job):
    paths = [p for cfg in _configs(job) for p in _paths(cfg)]
    assert paths
    for dotted in paths:
        module, _, name = dotted.rpartition(".")
        assert getattr(importlib.import_module(module), name), dotted


@pytest.mark.parametrize("job", JOB_DIRS, ids=lambda p: p.name)
def test_job_ships_the_one_copy_of_the_code(job):
    package = ROOT / "custom" / "fssl_covid"
    shipped = job / "app" / "custom" / "fssl_covid"
    wanted = {p.relative_to(package) for p in package.rglob("*")
              if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".json")}
    have = {p.relative_to(shipped) for p in shipped.rglob("*") if p.is_symlink()}
    assert have == wanted, "run scripts/link_job_code.py"
    for rel in wanted:
        link = shipped / rel
        assert link.is_symlink() and link.resolve() == (package / rel).resolve()
    assert not [p for p in shipped.rglob("*") if p.is_file() and not p.is_symlink()], "copies instead of links"


@pytest.mark.parametrize("job", JOB_DIRS, ids=lambda p: p.name)
def test_server_and_sites_build_the_same_network_and_config_is_valid(job):
    server, client = (json.loads((job / "app" / "config" / f"config_fed_{s}.json").read_text())
                      for s in ("server", "client"))
    persistor = next(c for c in server["components"] if c["id"] == "persistor")
    executor_args = client["executors"][0]["executor"]["args"]
    assert persistor["args"]["model"]["args"] == executor_args["config"]["network"]
    resolve_config(executor_args["config"])  # every key known, every value valid
    meta = json.loads((job / "meta.json").read_text())
    assert meta["deploy_map"] == {"app": ["@ALL"]} and meta["name"] == job.name
    sag = next(w for w in server["workflows"] if w["path"].endswith("ScatterAndGather"))
    assert sag["args"]["persistor_id"] == "persistor"
    agg = next(c for c in server["components"] if c["id"] == "aggregator")
    assert agg["args"]["expected_data_kind"] == "WEIGHTS"


@pytest.mark.parametrize("job", JOB_DIRS, ids=lambda p: p.name)
def test_jobs_carry_no_data_locations(job):
    text = "".join((job / "app" / "config" / f).read_text() for f in os.listdir(job / "app" / "config"))
    for word in ("datalist", "data_root", "/data", ".nii"):
        assert word not in text


def test_baseline_differs_from_fssl_only_in_the_unlabeled_data():
    fssl = json.loads((JOBS / "fssl_covid_seg/app/config/config_fed_client.json").read_text())
    base = json.loads((JOBS / "fedavg_supervised/app/config/config_fed_client.json").read_text())
    a, b = (c["executors"][0]["executor"]["args"]["config"] for c in (fssl, base))
    assert a["ssl"]["enabled"] is True and b["ssl"]["enabled"] is False
    assert a["network"] == b["network"] and a["train"] == b["train"] and a["data"] == b["data"]
    sa, sb = (json.loads((JOBS / j / "app/config/config_fed_server.json").read_text())
              for j in ("fssl_covid_seg", "fedavg_supervised"))
    assert sa["num_rounds"] == sb["num_rounds"]


def test_customized_job_sets_rounds_and_min_clients_where_flare_reads_them(tmp_path):
    job = customize_job("fssl_covid_seg", tmp_path, rounds=3, min_clients=1, config={"train": {"lr": 0.002}})
    server = json.loads((job / "app/config/config_fed_server.json").read_text())
    client = json.loads((job / "app/config/config_fed_client.json").read_text())
    meta = json.loads((job / "meta.json").read_text())
    assert server["num_rounds"] == 3 and server["min_clients"] == 1
    assert meta["min_clients"] == 1  # the job scheduler's check: a larger value leaves the job SUBMITTED forever
    assert client["executors"][0]["executor"]["args"]["config"]["train"]["lr"] == 0.002
    assert not any(p.is_symlink() for p in job.rglob("*"))  # a self-contained copy, code included


@pytest.mark.parametrize("argv", [
    ["--set", "lr=0.1"],                                  # no section
    ["--set", "train.nonsense=1"],                        # unknown key
    ["--privacy-set", "percentile=5"],                    # no filter argument
    ["--privacy-set", "percentile.gamma=0.1"],            # a filter that was not added
    ["--privacy", "percentile", "--privacy-set", "percentile.a.b=1"],
])
def test_fssl_job_refuses_bad_settings_and_writes_nothing(tmp_path, argv):
    from fssl_covid.cli import main as fssl

    assert fssl(["job", "fssl_covid_seg", "--out", str(tmp_path / "jobs"), *argv]) == 2
    assert not (tmp_path / "jobs").exists()


def test_fssl_job_privacy_writes_filters_updates_and_aggregator_kind(tmp_path):
    from fssl_covid.cli import main as fssl

    assert fssl(["job", "fssl_covid_seg", "--out", str(tmp_path), "--privacy", "exclude_vars", "--privacy",
                 "percentile", "--privacy-set", "percentile.percentile=20"]) == 0
    client = json.loads((tmp_path / "fssl_covid_seg/app/config/config_fed_client.json").read_text())
    server = json.loads((tmp_path / "fssl_covid_seg/app/config/config_fed_server.json").read_text())
    assert client["executors"][0]["executor"]["args"]["send_weight_diff"] is True
    chain, = [c for c in client["task_result_filters"] if "train" in c["tasks"]]
    assert [f["path"].rsplit(".", 1)[1] for f in chain["filters"]] == ["ExcludeVars", "PercentilePrivacy"]
    assert chain["filters"][1]["args"] == {"percentile": 20, "gamma": 0.01}
    aggregator, = [c for c in server["components"] if c["id"] == "aggregator"]
    assert aggregator["args"]["expected_data_kind"] == "WEIGHT_DIFF"


def test_a_jobs_training_config_is_found_from_its_folder_or_client_config(tmp_path):
    from fssl_covid.config import ConfigError, load_config

    job = JOBS / "fssl_covid_seg"
    from_folder = load_config(job)
    from_file = load_config(job / "app" / "config" / "config_fed_client.json")
    assert from_folder == from_file == resolve_config(job_training_config(job))
    assert from_folder != load_config(None)  # the job's values, not the defaults

    other = tmp_path / "config_fed_client.json"  # a FLARE client config of some other app
    other.write_text(json.dumps({"format_version": 2, "executors": [
        {"tasks": ["train"], "executor": {"path": "some.OtherExecutor", "args": {}}}]}))
    with pytest.raises(ConfigError, match="without an FSSLExecutor"):
        load_config(other)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="without a job's config_fed_client.json"):
        load_config(empty)
