"""Live progress of a running job, for the FL admin, through FLARE's own job monitoring.

``JobProgress`` is a server component: it keeps, for the running job, the scatter-gather round, which sites'
updates the aggregator received this round (and whether it accepted them), and each site's latest streamed
aggregate metrics (training loss, validation Dice: the values the sites already send for TensorBoard). It answers
FLARE's stats request, so an admin anywhere sees it with the console's ``show_stats <job_id> server`` or with
``fssl watch <job_id>`` (FLARE's admin API, ``Session.show_stats``) - no log files, no access to the server's disk.

Only what the sites already send leaves them: round numbers, accept/reject, aggregate scalars.
"""

from __future__ import annotations

import threading
import time

from nvflare.apis.analytix import ANALYTIC_EVENT_TYPE, AnalyticsData
from nvflare.apis.dxo import from_shareable
from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.app_constant import AppConstants
from nvflare.app_common.app_event_type import AppEventType
from nvflare.app_common.widgets.streaming import AnalyticsReceiver
from nvflare.widgets.info_collector import GroupInfoCollector, InfoCollector

GROUP = "fssl_progress"

#: streamed tags shown in the progress (tag written by the executor -> short name)
TAGS = {"train/loss": "loss", "val/dice_global_model": "val_dice_received", "val/dice_local_model": "val_dice_local"}


class JobProgress(AnalyticsReceiver):
    """FLARE's ``AnalyticsReceiver`` (which finds each record's site and filters the events) keeping the latest
    values in memory instead of writing them, plus the round and the sites' updates from scatter-gather's events."""

    def __init__(self, events: list[str] | None = None):
        """Args:
        events: analytics events to read the sites' streamed metrics from (default: the federated
            ``analytix_log_stats`` event that ``TBAnalyticsReceiver`` also records).
        """
        super().__init__(events=events or [f"fed.{ANALYTIC_EVENT_TYPE}"])
        self._lock = threading.Lock()
        self.initialize(None)

    def initialize(self, fl_ctx: FLContext | None):
        with self._lock:
            self.round = None
            self.round_started = None
            self.reported: dict[str, str] = {}
            self.sites: dict[str, dict] = {}

    def finalize(self, fl_ctx: FLContext):
        pass  # nothing to close: the values stay readable until the next run starts

    def handle_event(self, event_type: str, fl_ctx: FLContext):
        super().handle_event(event_type, fl_ctx)  # START_RUN -> initialize, analytics events -> save
        if event_type == AppEventType.ROUND_STARTED:
            with self._lock:
                self.round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
                self.round_started = time.time()
                self.reported = {}
        elif event_type == AppEventType.AFTER_CONTRIBUTION_ACCEPT:
            result = fl_ctx.get_prop(AppConstants.TRAINING_RESULT)
            site = result.get_peer_prop(ReservedKey.IDENTITY_NAME, None) if isinstance(result, Shareable) else None
            if site:
                accepted = bool(fl_ctx.get_prop(AppConstants.AGGREGATION_ACCEPTED, False))
                with self._lock:
                    self.reported[site] = "accepted" if accepted else "rejected"
        elif event_type == InfoCollector.EVENT_TYPE_GET_STATS:
            collector = fl_ctx.get_prop(InfoCollector.CTX_KEY_STATS_COLLECTOR, None)
            if isinstance(collector, GroupInfoCollector):
                collector.add_info(group_name=GROUP, info=self.snapshot())

    def save(self, fl_ctx: FLContext, shareable: Shareable, record_origin: str):
        try:
            record = AnalyticsData.from_dxo(from_shareable(shareable))
        except Exception:  # not an analytics record: nothing to show
            return
        name = TAGS.get(record.tag)
        if name is None:
            return
        try:
            value = float(record.value)
        except (TypeError, ValueError):
            return
        with self._lock:
            entry = self.sites.setdefault(record_origin, {})
            entry[name] = round(value, 4)
            if record.step is not None:
                entry["round"] = int(record.step)

    def snapshot(self) -> dict:
        """What the stats request returns: plain JSON-able values."""
        with self._lock:
            info = {
                "round": self.round,
                "round_running_s": None if self.round_started is None else round(time.time() - self.round_started),
                "reported_this_round": dict(sorted(self.reported.items())),
                "sites": {site: dict(values) for site, values in sorted(self.sites.items())},
            }
        # flat keys too, for `nvflare job monitor JOB --metric china_loss --metric china_val_dice`
        for site, values in info["sites"].items():
            for name, value in values.items():
                if name != "round":
                    info[f"{site}_{'val_dice' if name == 'val_dice_received' else name}"] = value
        return info


def format_progress(stats: dict) -> list[str]:
    """Readable lines from a ``show_stats <job> server`` reply (``Session.show_stats(job_id, "server")``)."""
    server = stats.get("server", stats) if isinstance(stats, dict) else {}
    lines = []
    sag = next((v for v in server.values() if isinstance(v, dict) and "current_round" in v), None)
    ours = server.get(GROUP) if isinstance(server, dict) else None
    workflow = str((server.get("ServerRunner") or {}).get("workflow", ""))
    if "cross" in workflow.lower():
        lines.append("cross-site evaluation (every site scores the global models and the other sites' models)")
    elif sag:
        phase, rnd, total = sag.get("phase"), sag.get("current_round"), sag.get("num_rounds")
        if phase == "finished":
            lines.append(f"training finished ({total} rounds)")
        elif rnd is not None:
            lines.append(f"round {int(rnd) + 1} of {total} ({phase})")
    if isinstance(ours, dict):
        reported = ours.get("reported_this_round") or {}
        if reported:
            lines.append("  updates this round: " + ", ".join(f"{s} ({v})" for s, v in reported.items()))
        for site, values in (ours.get("sites") or {}).items():
            parts = []
            if "round" in values:
                parts.append(f"round {values['round'] + 1}")
            if "loss" in values:
                parts.append(f"loss {values['loss']:.3f}")
            if "val_dice_received" in values:
                parts.append(f"Dice of the received global model {values['val_dice_received']:.3f}")
            if "val_dice_local" in values:
                parts.append(f"after local training {values['val_dice_local']:.3f}")
            lines.append(f"  {site}: " + ", ".join(parts))
    return lines


FINAL_STATES = ("FINISHED", "FAILED", "ABORTED")


def job_progress_lines(session, job_id: str) -> list[str]:
    """Progress lines of a running job from the server's stats (empty when the job is not running)."""
    try:
        return format_progress(session.show_stats(job_id, "server"))
    except Exception:  # noqa: BLE001 - not running yet / finished between two calls: nothing to show
        return []


def watch(session, job_id: str, interval: float = 10.0, once: bool = False, out=print) -> str:
    """Print the job's status and progress whenever it changes, until it ends; returns the final status.

    ``session``: an open FLARE admin API session (``nvflare.fuel.flare_api.flare_api.new_secure_session``).
    """
    last = None
    while True:
        meta = session.get_job_meta(job_id) or {}
        status = str(meta.get("status", "?"))
        block = [f"job {job_id} {status}"] + (job_progress_lines(session, job_id) if status == "RUNNING" else [])
        if block != last:
            out("\n".join(block))
            last = block
        if once or status.startswith(FINAL_STATES):
            return status
        time.sleep(interval)
