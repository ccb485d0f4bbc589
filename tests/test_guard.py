"""The server-side guard on every received update (fssl_covid.guard.GuardedWeightedAggregator).

Unit tests drive the aggregator the way ScatterAndGather does, without a runtime: real FLContext (global model and
round as the workflow sets them, the sender as peer context), real DXO/Shareable results carrying the sender's peer
props and the CONTRIBUTION_ROUND cookie.  The simulator test poisons one site for real and checks the federation
survives it.
"""

import json
import logging

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import make_reply
from nvflare.app_common.abstract.model import ModelLearnable, ModelLearnableKey
from nvflare.app_common.app_constant import AppConstants

from conftest import TINY_3D
from jobtools import SITES, flare_env, run_simulator, write_site_configs
from fssl_covid.guard import GuardedWeightedAggregator
from fssl_covid.jobs import customize_job
from fssl_covid.networks import build_network

ROUND = 3
RNG = np.random.default_rng(0)
GLOBAL = {"conv.weight": RNG.normal(size=(4, 1, 3, 3)).astype(np.float32),
          "conv.bias": RNG.normal(size=(4,)).astype(np.float32),
          "norm.num_batches_tracked": np.array(7, dtype=np.int64)}


def _global_model(weights=GLOBAL):
    model = ModelLearnable()
    model[ModelLearnableKey.WEIGHTS] = weights
    model[ModelLearnableKey.META] = {}
    return model


def _ctx(site=None, global_model=True, rnd=ROUND):
    """The server's FLContext as ScatterAndGather leaves it; with the submitting site as peer context."""
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, "server", private=False, sticky=False)
    ctx.set_prop(AppConstants.CURRENT_ROUND, rnd, private=True, sticky=True)
    if global_model:
        ctx.set_prop(AppConstants.GLOBAL_MODEL, _global_model(), private=True, sticky=True)
    if site is not None:
        peer = FLContext()
        peer.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
        ctx.set_peer_context(peer)
    return ctx


def _result(site, data, weight=1.0, rnd=ROUND, kind=DataKind.WEIGHTS):
    """A site's train result as the server runner hands it to the workflow."""
    s = DXO(kind, data, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: weight}).to_shareable()
    s.add_cookie(AppConstants.CONTRIBUTION_ROUND, rnd)
    s.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    return s


def _trained(scale=0.01, seed=1):
    rng = np.random.default_rng(seed)
    return {k: (v + scale * rng.normal(size=v.shape).astype(v.dtype)) if v.dtype.kind == "f" else v.copy()
            for k, v in GLOBAL.items()}


def _aggregator(**kw):
    agg = GuardedWeightedAggregator(**kw)
    agg.handle_event(EventType.START_RUN, FLContext())
    return agg


def _submit(agg, site, data, **kw):
    return agg.accept(_result(site, data, **kw), _ctx(site))


def _rejections(caplog, site):
    return [r.getMessage() for r in caplog.records
            if r.name.startswith("fssl_covid.guard") and f"REJECTED update from site '{site}'" in r.getMessage()]


def _weighted_mean(updates):
    total = sum(w for _, w in updates)
    return {k: sum(u[k].astype(np.float64) * w for u, w in updates) / total
            for k in GLOBAL if GLOBAL[k].dtype.kind == "f"}


def _aggregate(agg, ctx=None):
    out = from_shareable(agg.aggregate(ctx or _ctx()))
    assert out.data_kind == DataKind.WEIGHTS
    return out.data


@pytest.mark.parametrize("fault, reason", [
    ("missing_key", "parameter names differ"),
    ("extra_key", "parameter names differ"),
    ("shape", "shape of 'conv.weight'"),
    ("nan", "NaN"),
    ("inf", "infinite"),
    ("text", "not numeric"),
])
def test_malformed_or_non_finite_update_is_rejected_on_arrival(caplog, fault, reason):
    caplog.set_level(logging.INFO)
    agg = _aggregator()
    bad = _trained(seed=9)
    if fault == "missing_key":
        del bad["conv.bias"]
    elif fault == "extra_key":
        bad["head.weight"] = np.zeros(3, np.float32)
    elif fault == "shape":
        bad["conv.weight"] = np.zeros((4, 1, 3, 4), np.float32)
    elif fault == "nan":
        bad["conv.weight"][0, 0, 1, 1] = np.nan
    elif fault == "inf":
        bad["conv.bias"][2] = -np.inf
    elif fault == "text":
        bad["conv.bias"] = np.array(["/data/italy/imagesTr/a.nii.gz"] * 4)
    good = [(_trained(seed=1), 2.0), (_trained(seed=2), 1.0)]
    assert _submit(agg, "china", good[0][0], weight=2.0)
    assert not _submit(agg, "italy", bad, weight=5.0)
    assert _submit(agg, "japan", good[1][0], weight=1.0)
    lines = _rejections(caplog, "italy")
    assert len(lines) == 1 and reason in lines[0], lines
    assert not _rejections(caplog, "china") and not _rejections(caplog, "japan")

    result = _aggregate(agg)
    for k, want in _weighted_mean(good).items():  # the weighted mean of the accepted ones only
        np.testing.assert_allclose(result[k], want, rtol=1e-5, atol=1e-6)


def test_norm_outlier_among_three_normal_updates_is_rejected_at_aggregation(caplog):
    caplog.set_level(logging.INFO)
    agg = _aggregator()
    normal = {"china": (_trained(seed=1), 8.0), "italy": (_trained(seed=2), 6.0), "japan": (_trained(seed=3), 4.0)}
    for site, (data, w) in normal.items():
        assert _submit(agg, site, data, weight=w)
    outlier = {k: (GLOBAL[k] + 1000 * (v - GLOBAL[k])) if v.dtype.kind == "f" else v
               for k, v in _trained(seed=4).items()}  # 1000x the usual step away from the global model
    assert _submit(agg, "korea", outlier, weight=100.0)  # looks fine on its own: judged against the others later
    result = _aggregate(agg)
    lines = _rejections(caplog, "korea")
    assert len(lines) == 1 and "distance from the global model" in lines[0] and "median" in lines[0], lines
    for k, want in _weighted_mean(list(normal.values())).items():
        np.testing.assert_allclose(result[k], want, rtol=1e-5, atol=1e-6)
    assert all(np.isfinite(v).all() for v in result.values())


def test_with_fewer_than_three_updates_the_bound_is_relative_to_the_global_norm(caplog):
    caplog.set_level(logging.INFO)
    agg = _aggregator(max_relative_distance=10.0)
    scaled = {k: v * 1e4 if v.dtype.kind == "f" else v for k, v in _trained(seed=5).items()}  # model weights x 1e4
    assert _submit(agg, "china", _trained(seed=1), weight=3.0)
    assert _submit(agg, "italy", scaled, weight=3.0)
    result = _aggregate(agg)
    assert "global model norm" in _rejections(caplog, "italy")[0]
    for k, want in _weighted_mean([(_trained(seed=1), 3.0)]).items():
        np.testing.assert_allclose(result[k], want, rtol=1e-6)


def test_all_updates_rejected_keeps_the_global_model(caplog):
    caplog.set_level(logging.INFO)
    agg = _aggregator()
    nan = _trained(seed=1)
    nan["conv.bias"][:] = np.nan
    assert not _submit(agg, "china", nan)
    assert not _submit(agg, "italy", {"conv.weight": GLOBAL["conv.weight"]})
    assert not agg.accept(make_reply(ReturnCode.EXECUTION_EXCEPTION), _ctx("japan"))
    result = _aggregate(agg)
    assert set(result) == set(GLOBAL)
    for k in GLOBAL:
        np.testing.assert_array_equal(result[k], GLOBAL[k])
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and "keeping the global model"
              in r.getMessage()]
    assert errors
    # the next round works normally again
    assert _submit(agg, "china", _trained(seed=1), weight=1.0)
    np.testing.assert_allclose(_aggregate(agg)["conv.bias"], _trained(seed=1)["conv.bias"], rtol=1e-6)


def test_only_zero_weight_updates_keep_the_global_model_instead_of_dividing_by_zero():
    agg = _aggregator()
    assert _submit(agg, "japan", _trained(seed=1), weight=0)  # e.g. the unlabeled-only site in the supervised job
    result = _aggregate(agg)
    np.testing.assert_array_equal(result["conv.weight"], GLOBAL["conv.weight"])


def test_stale_and_duplicate_updates_are_rejected(caplog):
    caplog.set_level(logging.INFO)
    agg = _aggregator()
    assert not _submit(agg, "china", _trained(seed=1), rnd=ROUND - 1)
    assert "round" in _rejections(caplog, "china")[0]
    assert _submit(agg, "italy", _trained(seed=2))
    assert not _submit(agg, "italy", _trained(seed=3))
    assert "second update" in _rejections(caplog, "italy")[0]


def test_without_global_model_nan_and_structure_are_still_checked(caplog):
    caplog.set_level(logging.INFO)
    agg = _aggregator()
    ctx = lambda site=None: _ctx(site, global_model=False)  # noqa: E731
    nan = _trained(seed=1)
    nan["conv.weight"][:] = np.inf
    assert not agg.accept(_result("china", nan), ctx("china"))
    assert agg.accept(_result("italy", _trained(seed=2), weight=1.0), ctx("italy"))
    assert agg.accept(_result("japan", _trained(seed=3), weight=1.0), ctx("japan"))
    odd = _trained(seed=4)
    odd["conv.weight"] = np.zeros((2, 2), np.float32)
    assert agg.accept(_result("korea", odd, weight=1.0), ctx("korea"))
    result = _aggregate(agg, ctx())
    assert _rejections(caplog, "china") and "differ from the other sites" in _rejections(caplog, "korea")[0]
    for k, want in _weighted_mean([(_trained(seed=2), 1.0), (_trained(seed=3), 1.0)]).items():
        np.testing.assert_allclose(result[k], want, rtol=1e-5)


def test_weight_diff_updates_may_leave_parameters_out_but_not_add_any(caplog):
    caplog.set_level(logging.INFO)
    agg = _aggregator(expected_data_kind=DataKind.WEIGHT_DIFF)
    diff = {k: (v - GLOBAL[k]) for k, v in _trained(seed=1).items() if GLOBAL[k].dtype.kind == "f"}
    partial = {k: v for k, v in diff.items() if k != "conv.bias"}  # what ExcludeVars sends
    assert _submit(agg, "china", partial, weight=1.0, kind=DataKind.WEIGHT_DIFF)
    assert not _submit(agg, "italy", {**diff, "head.weight": np.ones(2, np.float32)}, kind=DataKind.WEIGHT_DIFF)
    assert not _submit(agg, "japan", _trained(seed=2), kind=DataKind.WEIGHTS)  # wrong kind
    assert "parameter names differ" in _rejections(caplog, "italy")[0]
    assert "data kind WEIGHTS" in _rejections(caplog, "japan")[0]
    out = from_shareable(agg.aggregate(_ctx()))
    assert out.data_kind == DataKind.WEIGHT_DIFF and set(out.data) == {"conv.weight"}
    np.testing.assert_allclose(out.data["conv.weight"], partial["conv.weight"], rtol=1e-6)


def test_a_zero_weight_update_is_left_out_without_reading_its_values(caplog):
    """PercentilePrivacy divides an update by its sample weight: a site that trained nothing (weight 0, all-zero
    diff) arrives as 0/0 = NaN.  It cannot move the average, so it is accepted and ignored, not flagged."""
    caplog.set_level(logging.INFO)
    agg = _aggregator(expected_data_kind=DataKind.WEIGHT_DIFF)
    diff = {k: (v - GLOBAL[k]) for k, v in _trained(seed=1).items() if GLOBAL[k].dtype.kind == "f"}
    nan = {k: np.full_like(v, np.nan) for k, v in diff.items()}
    assert _submit(agg, "china", diff, weight=2.0, kind=DataKind.WEIGHT_DIFF)
    assert _submit(agg, "japan", nan, weight=0.0, kind=DataKind.WEIGHT_DIFF)
    assert not _rejections(caplog, "japan")
    out = from_shareable(agg.aggregate(_ctx()))
    for k in diff:
        np.testing.assert_allclose(out.data[k], diff[k], rtol=1e-6)


def test_torch_tensors_are_handled_like_numpy():
    agg = _aggregator()
    data = {k: torch.as_tensor(v) for k, v in _trained(seed=1).items()}
    assert _submit(agg, "china", data, weight=1.0)
    bad = {k: torch.as_tensor(v) for k, v in _trained(seed=2).items()}
    bad["conv.bias"][0] = float("nan")
    assert not _submit(agg, "italy", bad, weight=1.0)
    np.testing.assert_allclose(np.asarray(_aggregate(agg)["conv.bias"]), _trained(seed=1)["conv.bias"], rtol=1e-6)


# ---------------------------------------------------------------------- a poisoned site in a real federation

POISON_FILTER = '''
"""Test-only: the site named `site` sends its weights multiplied by `factor` (a poisoned or broken site)."""
from nvflare.apis.dxo import DXO
from nvflare.apis.dxo_filter import DXOFilter


class PoisonFilter(DXOFilter):
    def __init__(self, site="italy", factor=1e4):
        super().__init__(supported_data_kinds=["WEIGHTS"], data_kinds_to_filter=["WEIGHTS"])
        self.site, self.factor = site, float(factor)

    def process_dxo(self, dxo: DXO, shareable, fl_ctx):
        if fl_ctx.get_identity_name() != self.site:
            return None
        self.log_warning(fl_ctx, f"POISONING the update of {self.site} (x{self.factor:g})")
        dxo.data = {k: v * self.factor if v.dtype.kind == "f" else v for k, v in dxo.data.items()}
        return dxo
'''



def test_poisoned_site_is_rejected_every_round_and_the_federation_finishes(tmp_path, synthetic_sites):
    config = json.loads(json.dumps(TINY_3D))
    job = customize_job("fssl_covid_seg", tmp_path / "jobs", rounds=2, config=config, job_name="guard_poisoned")
    # the job is deployed to every site, so the filter decides by the site's identity (only italy is poisoned)
    (job / "app" / "custom" / "poison_filter.py").write_text(POISON_FILTER)
    client_file = job / "app" / "config" / "config_fed_client.json"
    client = json.loads(client_file.read_text())
    client["task_result_filters"] = [{"tasks": ["train"], "filters": [
        {"path": "poison_filter.PoisonFilter", "args": {"site": "italy", "factor": 1e4}}]}]
    client_file.write_text(json.dumps(client, indent=1))

    env = flare_env(tmp_path, FSSL_SITE_CONFIGS=str(write_site_configs(tmp_path / "site_configs", synthetic_sites)))
    proc = run_simulator(job, tmp_path / "ws", SITES, env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    run = tmp_path / "ws" / "server" / "simulate_job"
    server_log = (tmp_path / "ws" / "server" / "log.txt").read_text()
    assert log.count("POISONING the update of italy") == 2  # the fault was injected in both rounds
    rejected = [line for line in server_log.splitlines()
                if "REJECTED update from site 'italy'" in line and "distance from the global model" in line]
    assert len(rejected) == 2, "\n".join(line for line in server_log.splitlines() if "REJECTED" in line)
    # round 1: japan sits out the warm-up (weight 0), so 2 contributors -> absolute bound; round 2: median rule
    assert "global model norm" in rejected[0] and "median" in rejected[1]
    assert not [line for line in server_log.splitlines()
                if "REJECTED update from site" in line and "'italy'" not in line]
    assert "Contribution from italy REJECTED by the aggregator" not in server_log  # judged at aggregation

    initial_norm = float(torch.sqrt(sum((v.float() ** 2).sum()
                                        for v in build_network(**config["network"]).state_dict().values())))
    state = torch.load(run / "app_server" / "FL_global_model.pt", weights_only=True)["model"]
    build_network(**config["network"]).load_state_dict(state)
    norm = float(torch.sqrt(sum((v.float() ** 2).sum() for v in state.values() if v.is_floating_point())))
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert norm < 3 * initial_norm, (norm, initial_norm)  # not blown up (a 1e4-scaled average would be ~1e3x)
