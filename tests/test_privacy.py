"""What leaves a site, as the server receives it (FSSL job in the simulator, with cross-site evaluation), and the
privacy filters FLARE offers (docs/privacy.md).

A test-only server-side ``task_result_filters`` filter records everything each site sends for every task (train,
submit_model, validate): headers, cookies, peer props, the DXO's kind, data keys / shapes / dtypes, meta, and the
peer context's public props.  A test-only server component records the training curves the sites stream
(``fed.analytix_log_stats`` events).  The assertions are the project's privacy rule: only model weights and
aggregate metrics leave a site - no paths, file names, images or per-case values.
"""

import importlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.fl_context import FLContext

from conftest import ROOT, TINY_3D
from jobtools import SITES, flare_env, run_simulator, write_site_configs
from fssl_covid.networks import build_network






def _strings(node):
    """Every string in a captured record: dict keys and values, at any depth."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield k
            yield from _strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _strings(v)


def _number_lists(node, path=""):
    """Lists of several numbers anywhere in a record (per-case values would look like this); array descriptors
    (shapes) excepted."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k != "__array__":
                yield from _number_lists(v, f"{path}/{k}")
    elif isinstance(node, list):
        if len([v for v in node if isinstance(v, (int, float)) and not isinstance(v, bool)]) > 1:
            yield path, node
        for i, v in enumerate(node):
            yield from _number_lists(v, f"{path}[{i}]")


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)


def _forbidden_words(datalists: dict, site_configs: Path) -> list[str]:
    words = [".nii", "imagesTr", "labelsTr", "datalist", str(site_configs), "fssl_site.json"]
    for path in datalists.values():
        folder = Path(path).parent
        words.append(str(folder))
        for items in json.loads(Path(path).read_text()).values():
            for item in items if isinstance(items, list) else []:
                for v in item.values() if isinstance(item, dict) else []:
                    if isinstance(v, str):
                        words.append(Path(v).name.split(".")[0])  # the case's file name without extensions
    return sorted(set(words))


@pytest.fixture(scope="module")
def captured(simulated_fssl_job, synthetic_sites):
    return {**simulated_fssl_job,
            "forbidden": _forbidden_words(synthetic_sites, simulated_fssl_job["site_configs"])}


def _results(captured, task):
    return [r for r in captured["records"] if r["what"] == "task_result" and r["task"] == task]


def _dxo(record):
    return record["shareable"]["DXO"]


def test_every_task_result_was_captured(captured):
    assert len(_results(captured, "train")) == 2 * len(SITES)  # 2 rounds
    assert len(_results(captured, "submit_model")) == len(SITES)
    # every site scores every site's model and the two global models
    assert len(_results(captured, "validate")) == len(SITES) * (len(SITES) + 2)
    assert {r["site"] for r in captured["records"] if r["what"] == "task_result"} == set(SITES)
    assert all(r["peer_ctx"] and r["peer_ctx"].get("__identity_name__", r["site"]) == r["site"]
               for r in captured["records"] if r["what"] == "task_result")


@pytest.mark.parametrize("task", ["train", "submit_model"])
def test_model_results_hold_exactly_the_networks_parameters(captured, task):
    state = build_network(**captured["config"]["network"]).state_dict()
    want = {k: list(v.shape) for k, v in state.items()}
    for record in _results(captured, task):
        dxo = _dxo(record)
        assert dxo["kind"] == DataKind.WEIGHTS
        assert set(dxo["data"]) == set(want), record["site"]
        for k, v in dxo["data"].items():
            assert set(v) == {"__array__", "dtype"}, (k, v)  # an array, nothing else
            assert v["__array__"] == want[k], k
            assert np.issubdtype(np.dtype(v["dtype"]), np.number), (k, v["dtype"])
        meta = dxo["meta"]
        if task == "submit_model":
            assert meta == {}
            continue
        assert set(meta) <= {MetaKey.NUM_STEPS_CURRENT_ROUND, MetaKey.INITIAL_METRICS}, meta
        assert _is_number(meta[MetaKey.NUM_STEPS_CURRENT_ROUND])
        if MetaKey.INITIAL_METRICS in meta:
            metrics = meta[MetaKey.INITIAL_METRICS]
            assert set(metrics) == {"val_dice"} and _is_number(metrics["val_dice"])
    # the unlabeled-only site has no validation labels: it sends no metric rather than a fake one
    assert all(MetaKey.INITIAL_METRICS not in _dxo(r)["meta"] for r in _results(captured, "train")
               if r["site"] == "japan")


def test_validation_results_hold_one_aggregate_number(captured):
    for record in _results(captured, "validate"):
        dxo = _dxo(record)
        assert dxo["kind"] == DataKind.METRICS
        assert dxo["data"] in ({},) or (set(dxo["data"]) == {"val_dice"} and _is_number(dxo["data"]["val_dice"]))
        assert dxo["meta"] == {}
    assert any(_dxo(r)["data"] for r in _results(captured, "validate"))


def test_streamed_training_curves_are_aggregate_scalars(captured):
    events = [r for r in captured["records"] if r["what"] == "event"]
    assert events, "the sites stream training curves (TBWriter -> fed.analytix_log_stats)"
    tags = {"train/loss", "train/sup_loss", "train/unsup_loss", "train/confident_fraction",
            "val/dice_global_model", "val/dice_local_model"}
    for e in events:
        assert e["data"]["__headers__"]["_origin"] in SITES
        dxo = e["data"]["DXO"]
        assert dxo["kind"] == "ANALYTIC", dxo["kind"]
        data = dxo["data"]  # one scalar of one curve at one round
        assert set(data) <= {"track_key", "track_value", "global_step", "analytics_kwargs"}, data
        assert data["track_key"] in tags and _is_number(data["track_value"]) and _is_number(data["global_step"])
        assert data.get("analytics_kwargs", {}) in ({}, {"global_step": data["global_step"]})


def test_nothing_sent_names_the_data_or_lists_per_case_values(captured):
    forbidden = captured["forbidden"]
    assert any(".nii" == w for w in forbidden) and len(forbidden) > 10  # the case file names are in the list
    for record in captured["records"]:
        for s in _strings(record):
            hits = [w for w in forbidden if w in s]
            assert not hits, (record.get("task") or record.get("event"), record.get("site"), hits, s[:300])
        assert not list(_number_lists(record)), list(_number_lists(record))[:3]


# ---------------------------------------------------------------------- FLARE's privacy filters (docs/privacy.md)
DOC = ROOT / "docs" / "privacy.md"


def _doc_snippets():
    """The JSON ``task_result_filters`` snippets of docs/privacy.md."""
    blocks = re.findall(r"```json\n(.*?)```", DOC.read_text(), flags=re.S)
    snippets = [json.loads(b) for b in blocks]
    return [s for s in snippets if "task_result_filters" in s]


def _build(spec):
    module, _, name = spec["path"].rpartition(".")
    return getattr(importlib.import_module(module), name)(**spec.get("args", {}))


def test_doc_snippets_are_valid_filter_configs_and_do_what_the_doc_says_to_an_update():
    snippets = _doc_snippets()
    built = {}
    for snippet in snippets:
        for chain in snippet["task_result_filters"]:
            assert chain["tasks"] == ["train"]
            for spec in chain["filters"]:
                built[spec["path"].rpartition(".")[2]] = _build(spec)
    assert set(built) == {"PercentilePrivacy", "SVTPrivacy", "ExcludeVars"}

    # an update (local - received weights) of this project's U-Net, the size one round of training gives
    state = {k: v.numpy() for k, v in build_network(**TINY_3D["network"]).state_dict().items()}
    rng = np.random.default_rng(0)
    update = {k: (rng.normal(size=v.shape) * 1e-2).astype(v.dtype) for k, v in state.items()}
    ctx = FLContext()

    def filtered(f, sample_weight=12.0):
        data = {k: v.copy() for k, v in update.items()}
        dxo = DXO(DataKind.WEIGHT_DIFF, data, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: sample_weight})
        return f.process_dxo(dxo, dxo.to_shareable(), ctx).data

    def zero_fraction(weights):
        return sum(int((v == 0).sum()) for v in weights.values()) / sum(v.size for v in weights.values())

    # PercentilePrivacy: the smallest `percentile` % of the entries become 0, the others are clipped to
    # +-gamma x NUM_STEPS_CURRENT_ROUND (this project's sample weight); the large entries are kept as they were
    pct = built["PercentilePrivacy"]
    out = filtered(pct)
    assert zero_fraction(out) >= 0.99 * pct.percentile / 100
    assert max(np.abs(v).max() for v in out.values()) <= pct.gamma * 12.0 + 1e-6
    big = {k: np.abs(v) > np.percentile(np.abs(v), 50) for k, v in update.items() if v.size > 100}
    assert all(np.allclose(out[k][m], update[k][m]) for k, m in big.items())  # gamma x 12 = 0.12 clips nothing
    with np.errstate(divide="ignore", invalid="ignore"):  # weight 0 and all zeros: 0/0 = NaN everywhere ...
        zeros = {k: np.zeros_like(v) for k, v in update.items()}
        dxo = DXO(DataKind.WEIGHT_DIFF, zeros, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 0.0})
        assert all(np.isnan(v).all() for v in pct.process_dxo(dxo, dxo.to_shareable(), ctx).data.values() if v.ndim)
    for f in built.values():  # ... so a site that trained nothing sends no data, which every filter passes through
        empty = DXO(DataKind.WEIGHT_DIFF, {}, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: 0.0}).to_shareable()
        assert from_shareable(f.process(empty, ctx)).data == {}

    # SVTPrivacy keeps a noisy `fraction` of the entries and zeros all the others
    svt = built["SVTPrivacy"]
    out = filtered(svt)
    assert zero_fraction(out) > 1 - 1.5 * svt.fraction

    # ExcludeVars leaves the matched parameters out of the update (the global model keeps its values for them)
    out = filtered(built["ExcludeVars"])
    assert set(out) < set(update) and all(k.endswith("adn.A.weight") for k in set(update) - set(out))


RECORD_UPDATES = '''
"""Test-only: record what each train result holds after the sites' privacy filters (kind, names, zero share)."""
import json
import threading

import numpy as np
from nvflare.apis.dxo import MetaKey, from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import ReservedKey

_LOCK = threading.Lock()


class RecordUpdates(Filter):
    def __init__(self, path):
        super().__init__()
        self.path = path

    def process(self, shareable, fl_ctx):
        dxo = from_shareable(shareable)
        values = [np.asarray(v) for v in dxo.data.values()]
        floats = [v for v in values if v.dtype.kind == "f"]
        record = {"site": shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, None), "kind": str(dxo.data_kind),
                  "names": sorted(dxo.data), "weight": dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND),
                  "zero_fraction": sum(int((v == 0).sum()) for v in floats) / max(1, sum(v.size for v in floats)),
                  "max_abs": max((float(np.nanmax(np.abs(v))) for v in floats if v.size), default=0.0)}
        with _LOCK, open(self.path, "a") as f:
            f.write(json.dumps(record) + "\\n")
        return shareable
'''


def test_privacy_filters_run_on_updates_in_a_federated_job(tmp_path, synthetic_sites):
    """``fssl job --privacy exclude_vars --privacy percentile``: the sites send updates (WEIGHT_DIFF) without the
    excluded parameters and with the smallest entries zeroed; the server averages them (nothing rejected); the
    excluded parameters keep the starting model's values and the others learn."""
    from fssl_covid.cli import main as fssl
    import torch

    config = json.loads(json.dumps(TINY_3D))
    config["ssl"]["warmup_epochs"] = 1
    start = tmp_path / "start.pt"
    torch.manual_seed(0)
    start_state = build_network(**config["network"]).state_dict()
    torch.save({"model": start_state}, start)
    settings = [f"{section}.{key}={json.dumps(value)}" for section, values in config.items()
                for key, value in values.items()]
    assert fssl(["job", "fssl_covid_seg", "--out", str(tmp_path / "jobs"), "--rounds", "2",
                 "--init-model", str(start), "--privacy", "exclude_vars", "--privacy", "percentile",
                 "--privacy-set", "percentile.percentile=30", *[a for s in settings for a in ("--set", s)]]) == 0
    job = tmp_path / "jobs" / "fssl_covid_seg"
    records_file = tmp_path / "updates.jsonl"
    (job / "app" / "custom" / "record_updates.py").write_text(RECORD_UPDATES)
    server_file = job / "app" / "config" / "config_fed_server.json"
    server = json.loads(server_file.read_text())
    server["task_result_filters"] = [{"tasks": ["train"], "filters": [
        {"path": "record_updates.RecordUpdates", "args": {"path": str(records_file)}}]}]
    server_file.write_text(json.dumps(server, indent=1))

    env = flare_env(tmp_path, FSSL_SITE_CONFIGS=str(write_site_configs(tmp_path / "site_configs", synthetic_sites)))
    proc = run_simulator(job, tmp_path / "ws", SITES, env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "REJECTED" not in log

    excluded = {k for k in start_state if re.search(r"adn\.A\.weight$", k)}
    assert excluded  # the U-Net has PReLU slopes to exclude
    records = [json.loads(line) for line in records_file.read_text().splitlines()]
    assert len(records) == 2 * len(SITES)
    for r in records:
        assert r["kind"].endswith("WEIGHT_DIFF")
        if r["weight"]:
            assert set(r["names"]) == set(start_state) - excluded
        else:  # japan in the warm-up trained nothing and sends nothing
            assert r["site"] == "japan" and r["names"] == []
        if r["site"] != "japan":  # the labeled sites learned: at least the filter's 30 % of an update is zero
            assert 0.29 <= r["zero_fraction"] < 1 and 0 < r["max_abs"] < 10

    final = torch.load(tmp_path / "ws" / "server" / "simulate_job" / "app_server" / "FL_global_model.pt",
                       weights_only=True)["model"]
    assert all(torch.isfinite(v).all() for v in final.values() if v.dtype.is_floating_point)
    for k in excluded:  # never sent, so never averaged: still the starting values
        assert torch.equal(final[k], start_state[k]), k
    kernels = [k for k in start_state if k not in excluded and start_state[k].dim() > 1]  # (biases before an
    assert kernels and all(not torch.allclose(final[k], start_state[k], atol=1e-6) for k in kernels)  # instance norm
    # get no gradient, so only the kernels are sure to move)
