"""JobProgress, the server component behind `fssl watch` / `show_stats JOB server`, fed FLARE's own event objects.

The POC end-to-end test (tests/test_poc.py) checks the same through a real server and admin session."""

from nvflare.apis.analytix import AnalyticsDataType, LogWriterName
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import EventScope, FLContextKey, ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.apis.utils.analytix_utils import create_analytic_dxo
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.widgets.info_collector import GroupInfoCollector, InfoCollector

from fssl_covid.progress import GROUP, JobProgress, format_progress


def _metric_event(progress, site, tag, value, step):
    data = create_analytic_dxo(tag=tag, value=value, data_type=AnalyticsDataType.SCALAR,
                               writer=LogWriterName.TORCH_TB, global_step=step).to_shareable()
    data.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    ctx = FLContext()
    ctx.set_prop(FLContextKey.EVENT_DATA, data, private=True, sticky=False)
    ctx.set_prop(FLContextKey.EVENT_SCOPE, EventScope.FEDERATION, private=True, sticky=False)
    progress.handle_event("fed.analytix_log_stats", ctx)


def _contribution(progress, site, accepted):
    result = Shareable()
    result.set_peer_props({ReservedKey.IDENTITY_NAME: site})
    ctx = FLContext()
    ctx.set_prop(AppConstants.TRAINING_RESULT, result, private=True, sticky=False)
    ctx.set_prop(AppConstants.AGGREGATION_ACCEPTED, accepted, private=True, sticky=False)
    progress.handle_event(AppEventType.AFTER_CONTRIBUTION_ACCEPT, ctx)


def _stats(progress):
    ctx = FLContext()
    collector = GroupInfoCollector()
    ctx.set_prop(InfoCollector.CTX_KEY_STATS_COLLECTOR, collector, private=True, sticky=False)
    progress.handle_event(InfoCollector.EVENT_TYPE_GET_STATS, ctx)
    return collector.info


def test_progress_tracks_round_reports_and_site_metrics():
    progress = JobProgress()
    progress.handle_event(EventType.START_RUN, FLContext())
    ctx = FLContext()
    ctx.set_prop(AppConstants.CURRENT_ROUND, 2, private=True, sticky=False)
    progress.handle_event(AppEventType.ROUND_STARTED, ctx)
    _metric_event(progress, "china", "train/loss", 0.4321, 2)
    _metric_event(progress, "china", "val/dice_global_model", 0.61, 2)
    _metric_event(progress, "italy", "train/loss", 0.5, 1)
    _metric_event(progress, "italy", "train/some_other_tag", 7.0, 1)  # not shown
    _contribution(progress, "china", True)
    _contribution(progress, "japan", False)

    info = _stats(progress)[GROUP]
    assert info["round"] == 2
    assert info["reported_this_round"] == {"china": "accepted", "japan": "rejected"}
    assert info["sites"]["china"] == {"loss": 0.4321, "val_dice_received": 0.61, "round": 2}
    assert info["sites"]["italy"] == {"loss": 0.5, "round": 1}
    assert (info["china_loss"], info["china_val_dice"], info["italy_loss"]) == (0.4321, 0.61, 0.5)

    # what `fssl watch` prints from a show_stats reply (ScatterAndGather's own stats beside ours)
    lines = format_progress({"server": {"scatter_and_gather": {"phase": "train", "current_round": 2, "num_rounds": 8},
                                        GROUP: info}})
    assert lines[0] == "round 3 of 8 (train)"
    assert "china (accepted), japan (rejected)" in lines[1]
    assert any(line.strip().startswith("china: round 3, loss 0.432, Dice of the received global model 0.610")
               for line in lines)

    # a new round clears who reported; a new run clears everything
    ctx.set_prop(AppConstants.CURRENT_ROUND, 3, private=True, sticky=False)
    progress.handle_event(AppEventType.ROUND_STARTED, ctx)
    assert _stats(progress)[GROUP]["reported_this_round"] == {}
    progress.handle_event(EventType.START_RUN, FLContext())
    assert _stats(progress)[GROUP] == {"round": None, "round_running_s": None, "reported_this_round": {}, "sites": {}}


def test_nvflare_job_monitor_finds_the_site_metrics():
    """FLARE's own `nvflare job monitor JOB --metric china_val_dice` searches the stats for flat keys."""
    from nvflare.tool.job.job_cli import _build_monitor_key_aliases, _extract_monitor_metrics

    progress = JobProgress()
    progress.handle_event(EventType.START_RUN, FLContext())
    _metric_event(progress, "china", "val/dice_global_model", 0.61, 2)
    _metric_event(progress, "china", "train/loss", 0.25, 2)
    stats = {"server": {"scatter_and_gather": {"phase": "train", "current_round": 2, "num_rounds": 8},
                        **_stats(progress)}}
    found = _extract_monitor_metrics(stats, _build_monitor_key_aliases(["china_val_dice", "china_loss"]))
    assert found["china_val_dice"] == 0.61 and found["china_loss"] == 0.25 and found["round"] == 2


def test_watch_refuses_a_folder_that_is_not_an_admin_kit(tmp_path, capsys):
    from fssl_covid.cli import main

    assert main(["watch", "0123", "--kit", str(tmp_path)]) == 2
    assert f"--kit {tmp_path}: not an admin startup kit" in capsys.readouterr().err
