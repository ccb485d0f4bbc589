"""Server-side validation of every model update before it is averaged: :class:`GuardedWeightedAggregator`.

FLARE's ``InTimeAccumulateWeightedAggregator`` adds each update into a running weighted sum the moment it arrives
and never looks at the values: one site sending NaN, a model of another shape, or weights scaled by 1e4 (a bug, a
broken GPU, or a poisoning attempt) ruins the global model of every site.

Why an aggregator subclass (and not a server-side ``task_result_filters`` filter):

* the outlier rule needs the *other* sites' updates of the round; a filter sees one result at a time;
* a rejected update must leave the round cleanly: ``Aggregator.accept`` returning False is FLARE's own way
  (``ScatterAndGather`` logs "Contribution from <site> REJECTED by the aggregator"), while a filter can only raise or
  return an error reply, which ``ScatterAndGather`` treats as a site *failure* (``ignore_result_error`` policy,
  possibly a system panic);
* "every update rejected" must keep the last good global model, which only the aggregation step can decide.

So this class reuses all of FLARE's weighted averaging (``InTimeAccumulateWeightedAggregator`` /
``DXOAggregator`` / ``WeightedAggregationHelper``: ``NUM_STEPS_CURRENT_ROUND`` sample weights, round and duplicate
checks, aggregation stats) and only changes *when* updates are handed to it: ``accept`` checks each update on its
own and keeps it aside; ``aggregate`` screens the round's updates against each other and passes the survivors to the
parent's ``accept`` and ``aggregate``.  The price is that the round's accepted updates are held in memory until
aggregation (one model per site; a few MB for this project's networks), which the in-time sum avoided.

Checks, each logged with the site's name and the reason (``log_warning``; every rejection also appears in FLARE's
own "Contribution from <site> REJECTED" line when made in ``accept``):

in ``accept`` (per update)
    return code not OK; not a DXO; data kind not the expected one; round not the current round; a second update
    from the same site; parameter names differ from the global model's; a shape differs; a value is not a number;
    a NaN or infinite value; a missing, negative or non-finite sample weight.  An update with sample weight 0
    (a site that trained nothing this round) is accepted and left out of the average without reading its values,
    which may be empty (what this project's sites send as a ``WEIGHT_DIFF`` then) or NaN (what FLARE's privacy
    filters make of an all-zero update with weight 0): it could not move the average.  (With ``WEIGHT_DIFF`` an update may
    leave parameters out, as FLARE's ``ExcludeVars`` filter does: ``FullModelShareableGenerator`` keeps them.)
in ``aggregate`` (per round)
    distance ``||update - global||_2`` (over the floating-point tensors; for ``WEIGHT_DIFF`` just ``||update||``)
    greater than ``max_norm_ratio`` x the median distance of the round's contributing updates (those with a positive
    sample weight; sites that sent weight 0 do not move the average and would drag the median to 0), when at least
    ``min_updates_for_median`` (3) updates contribute — a median of 1 or 2 updates is not robust to the one outlier.
    With fewer contributing updates (or a median of 0) the bound is absolute:
    ``max_relative_distance`` x ``||global||`` (default 10: a round of local training moves this project's U-Nets
    by well under their own norm, a scaled or exploded update by orders of magnitude more).

The global model of the round is read from the FLContext (``AppConstants.GLOBAL_MODEL``, set sticky by
``ScatterAndGather`` at the start of every round, the same place ``FullModelShareableGenerator`` reads it).  Without
it the checks that need it are skipped (names/shapes are then checked against the round's majority signature, values
for NaN/inf; no distance check) and a warning says so.

If no update survives (or the survivors' sample weights sum to 0, which would divide by zero), the aggregate *is*
the global model of the round, unchanged, with an error in the log: the last good global model is kept.
"""

from __future__ import annotations

import threading
from collections import Counter
from numbers import Number
from typing import Any

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.model import ModelLearnableKey
from nvflare.app_common.aggregators.intime_accumulate_model_aggregator import InTimeAccumulateWeightedAggregator
from nvflare.app_common.app_constant import AppConstants


class GuardedWeightedAggregator(InTimeAccumulateWeightedAggregator):
    """``InTimeAccumulateWeightedAggregator`` that rejects malformed, non-finite and outlying updates.

    Args:
        expected_data_kind: ``WEIGHTS`` (full models, what this project's sites send) or ``WEIGHT_DIFF``.
        max_norm_ratio: reject an update farther from the global model than this many times the median distance
            of the round's contributing updates (used with at least ``min_updates_for_median`` of them).
        max_relative_distance: with fewer contributing updates, reject an update farther from the global model
            than this many times the global model's norm.
        min_updates_for_median: smallest number of contributing updates for the median rule.
        exclude_vars, aggregation_weights, weigh_by_local_iter: as in ``InTimeAccumulateWeightedAggregator``.
    """

    def __init__(
        self,
        expected_data_kind: str = DataKind.WEIGHTS,
        max_norm_ratio: float = 10.0,
        max_relative_distance: float = 10.0,
        min_updates_for_median: int = 3,
        exclude_vars: str | None = None,
        aggregation_weights: dict | None = None,
        weigh_by_local_iter: bool = True,
    ):
        if expected_data_kind not in (DataKind.WEIGHTS, DataKind.WEIGHT_DIFF):
            raise ValueError(f"expected_data_kind must be WEIGHTS or WEIGHT_DIFF, got {expected_data_kind!r}")
        if not max_norm_ratio > 1 or not max_relative_distance > 0 or int(min_updates_for_median) < 3:
            raise ValueError("need max_norm_ratio > 1, max_relative_distance > 0, min_updates_for_median >= 3")
        super().__init__(exclude_vars=exclude_vars, aggregation_weights=aggregation_weights,
                         expected_data_kind=expected_data_kind, weigh_by_local_iter=weigh_by_local_iter)
        self.data_kind = expected_data_kind
        self.max_norm_ratio = float(max_norm_ratio)
        self.max_relative_distance = float(max_relative_distance)
        self.min_updates_for_median = int(min_updates_for_median)
        self._pending: dict[str, tuple[Shareable, dict, float, Any]] = {}  # site -> (result, data, weight, round)
        self._lock = threading.Lock()
        self._initialized = False

    # ------------------------------------------------------------------ lifecycle
    def handle_event(self, event_type: str, fl_ctx: FLContext):
        super().handle_event(event_type, fl_ctx)
        if event_type == EventType.START_RUN:
            self._initialized = True

    def _ensure_initialized(self):
        if not self._initialized:  # used without a FLARE run (unit tests, scripts): what START_RUN does
            self._initialize(self.aggregation_weights, self.exclude_vars, self.expected_data_kind)
            self._initialized = True

    def reset(self, fl_ctx: FLContext):
        with self._lock:
            self._pending.clear()

    # ------------------------------------------------------------------ per update
    def accept(self, shareable: Shareable, fl_ctx: FLContext) -> bool:
        self._ensure_initialized()
        site = _site_name(shareable, fl_ctx)
        rc = shareable.get_return_code()
        if rc and rc != ReturnCode.OK:
            return self._reject(fl_ctx, site, f"return code {rc}")
        try:
            dxo = from_shareable(shareable)
        except Exception as e:
            return self._reject(fl_ctx, site, f"not a DXO ({type(e).__name__})")
        if dxo.data_kind != self.data_kind:
            return self._reject(fl_ctx, site, f"data kind {_kind(dxo.data_kind)}, expected {_kind(self.data_kind)}")
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        contribution_round = shareable.get_cookie(AppConstants.CONTRIBUTION_ROUND)
        if contribution_round != current_round:
            return self._reject(fl_ctx, site, f"update for round {contribution_round}, current round {current_round}")
        weight = dxo.get_meta_prop(MetaKey.NUM_STEPS_CURRENT_ROUND, 1.0)
        if not _is_number(weight) or not np.isfinite(float(weight)) or float(weight) < 0:
            return self._reject(fl_ctx, site, f"sample weight {weight!r} is not a finite number >= 0")
        if float(weight) == 0:  # e.g. an unlabeled-only site in the warm-up: it trained nothing this round
            self.log_info(fl_ctx, f"update from {site} has sample weight 0: nothing to average (values not read)")
            return True

        data = dxo.data if isinstance(dxo.data, dict) else None
        if not data:
            return self._reject(fl_ctx, site, "no weights")
        global_weights = _global_weights(fl_ctx)
        partial = self.data_kind == DataKind.WEIGHT_DIFF  # a diff may leave parameters out (they stay as they are)
        reason = (_structure_problem(data, global_weights, partial) if global_weights is not None else None) \
            or _value_problem(data)
        if reason:
            return self._reject(fl_ctx, site, reason)
        with self._lock:
            if site in self._pending:
                return self._reject(fl_ctx, site, f"second update in round {current_round}")
            self._pending[site] = (shareable, data, float(weight), contribution_round)
        self.log_debug(fl_ctx, f"update from {site} passed the per-update checks (weight {float(weight):g})")
        return True

    # ------------------------------------------------------------------ per round
    def aggregate(self, fl_ctx: FLContext) -> Shareable:
        self._ensure_initialized()
        current_round = fl_ctx.get_prop(AppConstants.CURRENT_ROUND)
        with self._lock:
            pending = {s: p for s, p in self._pending.items() if p[3] == current_round}
            self._pending.clear()
        global_weights = _global_weights(fl_ctx)
        if global_weights is None:
            self.log_warning(fl_ctx, "no global model in the FLContext: names and shapes checked against the "
                                     "round's majority, no distance check")
            pending = self._majority_structure(pending, fl_ctx)
        else:
            pending = self._screen_distances(pending, global_weights, fl_ctx)

        accepted = []
        for site, (shareable, *_rest) in sorted(pending.items()):
            if super().accept(shareable, fl_ctx):  # FLARE's own accumulation (and its round/duplicate checks)
                accepted.append(site)
        if not any(pending[site][2] > 0 for site in accepted):
            for dxo_aggregator in self.dxo_aggregators.values():  # empty FLARE's accumulator: weight sum 0
                dxo_aggregator.reset_aggregation_helper()
            self.log_error(fl_ctx, f"round {current_round}: no usable update ({len(accepted)} passed the checks, "
                                   "with a total sample weight of 0) - keeping the global model unchanged")
            return self._unchanged(global_weights)
        self.log_info(fl_ctx, f"round {current_round}: averaging the updates of {accepted}")
        return super().aggregate(fl_ctx)

    def _screen_distances(self, pending: dict, global_weights: dict, fl_ctx: FLContext) -> dict:
        if not pending:
            return pending
        floats = [k for k, v in global_weights.items() if _is_float(v)]
        diff = self.data_kind == DataKind.WEIGHT_DIFF
        dist = {s: _l2(p[1], None if diff else global_weights, floats) for s, p in pending.items()}
        contributing = sorted(dist[s] for s, p in pending.items() if p[2] > 0)
        median = float(np.median(contributing)) if contributing else 0.0
        if len(contributing) >= self.min_updates_for_median and median > 0:
            bound, rule = self.max_norm_ratio * median, f"{self.max_norm_ratio:g} x median distance {median:.4g}"
        else:
            g_norm = _l2(global_weights, None, floats)
            if g_norm == 0:
                self.log_warning(fl_ctx, "global model has norm 0 and fewer than "
                                         f"{self.min_updates_for_median} contributing updates: no distance check")
                return pending
            bound = self.max_relative_distance * g_norm
            rule = f"{self.max_relative_distance:g} x global model norm {g_norm:.4g}"
        self.log_info(fl_ctx, "update distances from the global model: "
                      + ", ".join(f"{s} {d:.4g}" for s, d in sorted(dist.items())) + f" (bound {bound:.4g}: {rule})")
        kept = {}
        for site, p in pending.items():
            if dist[site] > bound:
                self._reject(fl_ctx, site, f"distance from the global model {dist[site]:.4g} > {bound:.4g} ({rule})")
            else:
                kept[site] = p
        return kept

    def _majority_structure(self, pending: dict, fl_ctx: FLContext) -> dict:
        signatures = {s: _signature(p[1]) for s, p in pending.items()}
        if not signatures:
            return pending
        majority, _ = Counter(signatures.values()).most_common(1)[0]
        kept = {}
        for site, p in pending.items():
            if signatures[site] != majority:
                self._reject(fl_ctx, site, "parameter names or shapes differ from the other sites' updates")
            else:
                kept[site] = p
        return kept

    def _unchanged(self, global_weights: dict | None) -> Shareable:
        # FullModelShareableGenerator turns WEIGHTS into the new global model; an empty dict keeps the old one too.
        if self.data_kind == DataKind.WEIGHT_DIFF:
            data = {k: np.zeros_like(np.asarray(v)) for k, v in (global_weights or {}).items()}
            return DXO(DataKind.WEIGHT_DIFF, data).to_shareable()
        return DXO(DataKind.WEIGHTS, dict(global_weights or {})).to_shareable()

    def _reject(self, fl_ctx: FLContext, site: str, reason: str) -> bool:
        self.log_warning(fl_ctx, f"REJECTED update from site '{site}': {reason}")
        return False


# ---------------------------------------------------------------------- helpers
def _site_name(shareable: Shareable, fl_ctx: FLContext) -> str:
    name = shareable.get_peer_prop(ReservedKey.IDENTITY_NAME, None)
    if not name:
        peer = fl_ctx.get_peer_context()
        name = peer.get_identity_name() if peer is not None else None
    return name or "?"


def _global_weights(fl_ctx: FLContext) -> dict | None:
    model = fl_ctx.get_prop(AppConstants.GLOBAL_MODEL)
    if isinstance(model, dict):
        weights = model.get(ModelLearnableKey.WEIGHTS)
        if isinstance(weights, dict) and weights:
            return weights
    return None


def _kind(kind) -> str:
    return str(getattr(kind, "value", kind))


def _as_array(v) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor
        v = v.detach().cpu().numpy()
    return np.asarray(v)


def _is_float(v) -> bool:
    return np.issubdtype(_as_array(v).dtype, np.floating)


def _is_number(v) -> bool:
    return isinstance(v, Number) and not isinstance(v, bool)


def _signature(data: dict) -> tuple:
    return tuple(sorted((k, tuple(np.shape(_as_array(v)))) for k, v in data.items()))


def _structure_problem(data: dict, global_weights: dict, allow_missing: bool = False) -> str | None:
    missing = [] if allow_missing else sorted(set(global_weights) - set(data))
    unexpected = sorted(set(data) - set(global_weights))
    if missing or unexpected:
        return (f"parameter names differ from the global model's: {len(missing)} missing {missing[:3]}, "
                f"{len(unexpected)} unexpected {unexpected[:3]}")
    for k, g in global_weights.items():
        if k not in data:
            continue
        got, want = tuple(np.shape(_as_array(data[k]))), tuple(np.shape(_as_array(g)))
        if got != want:
            return f"shape of '{k}' is {got}, the global model's is {want}"
    return None


def _value_problem(data: dict) -> str | None:
    for k, v in data.items():
        try:
            a = _as_array(v)
        except Exception:
            return f"'{k}' is not an array"
        if not (np.issubdtype(a.dtype, np.number) or a.dtype == np.bool_):
            return f"'{k}' is not numeric (dtype {a.dtype})"
        if np.issubdtype(a.dtype, np.inexact):
            finite = np.isfinite(a)
            if not finite.all():
                n_nan, n_inf = int(np.isnan(a).sum()), int(np.isinf(a).sum())
                return f"'{k}' has {n_nan} NaN and {n_inf} infinite value(s)"
    return None


def _l2(data: dict, reference: dict | None, keys: list) -> float:
    total = 0.0
    for k in keys:
        if k not in data:  # a parameter a WEIGHT_DIFF leaves out: no change
            continue
        a = _as_array(data[k]).astype(np.float64)
        if reference is not None:
            a = a - _as_array(reference[k]).astype(np.float64)
        total += float(np.dot(a.ravel(), a.ravel()))
    return float(np.sqrt(total))
