"""The FLARE Executor driven without a FLARE runtime: real FLContext, Workspace, Shareable, DXO and Signal."""

import json

import numpy as np
import pytest
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey, ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.signal import Signal
from nvflare.apis.workspace import Workspace
from nvflare.app_common.app_constant import AppConstants

from fssl_covid.executor import FSSLExecutor
from fssl_covid.networks import build_network


def _context(tmp_path, site, settings=None):
    kit = tmp_path / site
    (kit / "local").mkdir(parents=True)
    (kit / "startup").mkdir()
    if settings is not None:
        (kit / "local" / "fssl_site.json").write_text(settings if isinstance(settings, str) else json.dumps(settings))
    ctx = FLContext()
    ctx.set_prop(ReservedKey.IDENTITY_NAME, site, private=False, sticky=False)
    ctx.set_prop(FLContextKey.WORKSPACE_OBJECT, Workspace(str(kit), site), private=True, sticky=False)
    return ctx


def _task(weights, rnd=0, total=4):
    s = DXO(DataKind.WEIGHTS, weights).to_shareable()
    s.set_header(AppConstants.CURRENT_ROUND, rnd)
    s.set_header(AppConstants.NUM_ROUNDS, total)
    return s


@pytest.fixture
def global_weights(tiny_3d):
    return {k: v.numpy() for k, v in build_network(**{**tiny_3d["network"]}).state_dict().items()}


def _executor(tiny_3d, labeled_weight=2.0):
    return FSSLExecutor(config=tiny_3d, labeled_weight=labeled_weight)


def test_train_sends_full_weights_sample_weight_and_metric_of_received_model(tmp_path, synthetic_sites, tiny_3d,
                                                                              global_weights):
    ctx = _context(tmp_path, "china", {"datalist": synthetic_sites["china"], "num_threads": 1})
    ex = _executor(tiny_3d)
    ex.handle_event(EventType.START_RUN, ctx)
    reply = ex.execute("train", _task(global_weights, rnd=2), ctx, Signal())
    assert reply.get_return_code(ReturnCode.OK) == ReturnCode.OK
    dxo = from_shareable(reply)
    assert dxo.data_kind == DataKind.WEIGHTS
    assert set(dxo.data) == set(global_weights)
    assert all(dxo.data[k].shape == global_weights[k].shape for k in global_weights)
    assert any(not np.array_equal(dxo.data[k], global_weights[k]) for k in global_weights)
    # 4 labeled cases weighted 2x, plus 4 unlabeled cases (round 2 is past the 1-epoch warm-up)
    assert dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == 2.0 * 4 + 4
    # the metric is that of the RECEIVED model: the same as validating it directly
    sent = dxo.get_meta_prop(MetaKey.INITIAL_METRICS)["val_dice"]
    ex.trainer.set_weights(global_weights)
    assert sent == pytest.approx(ex.trainer.evaluate()["val_dice"])
    # privacy: only weights and aggregate numbers leave the site
    assert set(dxo.meta) <= {MetaKey.NUM_STEPS_CURRENT_ROUND, MetaKey.INITIAL_METRICS}
    assert "/" not in json.dumps({k: v for k, v in dxo.meta.items()})

    submitted = from_shareable(ex.execute("submit_model", _task({}), ctx, Signal()))
    assert submitted.data_kind == DataKind.WEIGHTS and set(submitted.data) == set(global_weights)

    val = _task(global_weights)
    val.set_header(AppConstants.MODEL_OWNER, "italy")
    metrics = from_shareable(ex.execute("validate", val, ctx, Signal()))
    assert metrics.data_kind == DataKind.METRICS and set(metrics.data) == {"val_dice"}
    assert 0.0 <= metrics.data["val_dice"] <= 1.0


def test_send_weight_diff_sends_the_update_that_the_full_weights_would_give(tmp_path, synthetic_sites, tiny_3d,
                                                                             global_weights):
    """The same seeded round sent as WEIGHTS and as WEIGHT_DIFF: received + diff == the full local model."""
    sent = {}
    for diff in (False, True):
        ctx = _context(tmp_path / str(diff), "china", {"datalist": synthetic_sites["china"], "num_threads": 1})
        ex = FSSLExecutor(config=tiny_3d, labeled_weight=2.0, send_weight_diff=diff)
        ex.handle_event(EventType.START_RUN, ctx)
        sent[diff] = from_shareable(ex.execute("train", _task(global_weights, rnd=2), ctx, Signal()))
        submitted = from_shareable(ex.execute("submit_model", _task({}), ctx, Signal()))
        assert submitted.data_kind == DataKind.WEIGHTS  # cross-site evaluation needs a whole model
    full, update = sent[False], sent[True]
    assert update.data_kind == DataKind.WEIGHT_DIFF and set(update.data) == set(global_weights)
    assert update.meta == full.meta
    for k, w in global_weights.items():
        np.testing.assert_allclose(w + update.data[k], full.data[k], rtol=1e-5, atol=1e-6)
    assert any(np.abs(v).max() > 0 for v in update.data.values())

    # a site that trains nothing this round (unlabeled only, warm-up) sends an empty update with weight 0
    ctx = _context(tmp_path / "japan", "japan", {"datalist": synthetic_sites["japan"], "num_threads": 1})
    ex = FSSLExecutor(config=tiny_3d, send_weight_diff=True)
    ex.handle_event(EventType.START_RUN, ctx)
    idle = from_shareable(ex.execute("train", _task(global_weights, rnd=0), ctx, Signal()))
    assert idle.data_kind == DataKind.WEIGHT_DIFF and idle.data == {}
    assert idle.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == 0


def test_site_without_labels_sends_no_fake_metric(tmp_path, synthetic_sites, tiny_3d, global_weights):
    ctx = _context(tmp_path, "japan", {"datalist": synthetic_sites["japan"], "eval_key": "validation"})
    ex = _executor(tiny_3d)
    ex.handle_event(EventType.START_RUN, ctx)
    dxo = from_shareable(ex.execute("train", _task(global_weights, rnd=3), ctx, Signal()))
    assert MetaKey.INITIAL_METRICS not in dxo.meta
    # its 4 unlabeled cases, scaled like its learning rate (ssl.unlabeled_only_lr_scale, 0.1)
    assert dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND) == pytest.approx(4 * 0.1)
    val = _task(global_weights)
    val.set_header(AppConstants.MODEL_OWNER, "china")
    assert from_shareable(ex.execute("validate", val, ctx, Signal())).data == {}


def test_abort_signal_stops_training(tmp_path, synthetic_sites, tiny_3d, global_weights):
    ctx = _context(tmp_path, "italy", {"datalist": synthetic_sites["italy"]})
    ex = _executor(tiny_3d)
    ex.handle_event(EventType.START_RUN, ctx)
    signal = Signal()
    signal.trigger("stop")
    assert ex.execute("train", _task(global_weights), ctx, signal).get_return_code() == ReturnCode.TASK_ABORTED
    assert ex.execute("nonsense", _task(global_weights), ctx, Signal()).get_return_code() == ReturnCode.TASK_UNKNOWN


@pytest.mark.parametrize("settings, message", [
    (None, "has no fssl_site.json: looked for .*china/local/fssl_site.json"),
    ("{oops", "fssl_site.json is not valid JSON"),
    ({"datalist": "/nowhere/datalist.json"}, "datalist /nowhere/datalist.json does not exist"),
    ({"datalist": "x.json", "gpu": 1}, "unknown keys \\['gpu'\\]"),
])
def test_missing_or_wrong_site_settings_give_a_clear_error(tmp_path, tiny_3d, global_weights, settings, message,
                                                          monkeypatch):
    monkeypatch.delenv("FSSL_SITE_CONFIGS", raising=False)
    ctx = _context(tmp_path, "china", settings)
    ex = _executor(tiny_3d)
    ex.handle_event(EventType.START_RUN, ctx)
    assert ex.trainer is None
    import re
    assert re.search(message, ex.setup_error), ex.setup_error
    assert ex.execute("train", _task(global_weights), ctx, Signal()).get_return_code() == ReturnCode.EXECUTION_EXCEPTION


def test_wrong_weights_are_refused_without_crashing(tmp_path, synthetic_sites, tiny_3d, global_weights):
    ctx = _context(tmp_path, "china", {"datalist": synthetic_sites["china"]})
    ex = _executor(tiny_3d)
    ex.handle_event(EventType.START_RUN, ctx)
    bad = dict(global_weights)
    bad.pop(next(iter(bad)))
    assert ex.execute("train", _task(bad), ctx, Signal()).get_return_code() == ReturnCode.EXECUTION_EXCEPTION
