"""The NVIDIA FLARE Executor: a thin layer over :class:`fssl_covid.trainer.SegmentationTrainer`.

Tasks: ``train`` (scatter-and-gather round), ``validate`` and ``submit_model`` (cross-site evaluation).
The job gives the hyper-parameters (``config``); the site gives its data and device in its own
``local/fssl_site.json`` (:mod:`fssl_covid.site_settings`).  Only model weights and aggregate metrics leave the
site: no paths, no images, no per-case values.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from nvflare.apis.dxo import DXO, DataKind, MetaKey, from_shareable
from nvflare.apis.event_type import EventType
from nvflare.apis.executor import Executor
from nvflare.apis.fl_constant import FLContextKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AppConstants

from .data import load_datalist
from .inference import score_cases
from .site_settings import find_settings
from .trainer import SegmentationTrainer
from .validation import data_expectations, usable_cases


def unlabeled_loss_kind(trainer: SegmentationTrainer) -> str:
    """What the site's unsupervised term is, for its log (ssl.class_balanced "auto" decides per site)."""
    ssl = trainer.cfg["ssl"]
    if not ssl["enabled"]:
        return "off (supervised)"
    if ssl["unsup_loss"] == "mse":
        return "mse (soft pseudo-labels)"
    return f"{ssl['unsup_loss']}, {'class-balanced' if trainer.class_balanced else 'unbalanced'}"


class FSSLExecutor(Executor):
    """Federated semi-supervised segmentation at one site.

    Args:
        config: training configuration (see :mod:`fssl_covid.config`), the same at every site.
        labeled_weight: aggregation weight of one labeled case relative to one unlabeled case (the paper's
            up-weighting of annotated data); the weight sent is ``labeled_weight * n_labeled + n_unlabeled``, times
            ``ssl.unlabeled_only_lr_scale`` at a site without labeled data.
        analytics_writer_id: optional id of a FLARE ``LogWriter`` component (e.g. ``TBWriter``) that streams the
            site's aggregate training curves to the server.
        send_weight_diff: send the round's update (``local - received`` weights, ``WEIGHT_DIFF``) instead of the
            full local model (``WEIGHTS``).  FLARE's privacy filters (``PercentilePrivacy``, ``SVTPrivacy``,
            ``ExcludeVars``) work on updates; the server's aggregator must then expect ``WEIGHT_DIFF``
            (``fssl job --privacy`` sets both, see docs/privacy.md).  ``submit_model`` always sends full weights.
    """

    def __init__(
        self,
        config: dict | None = None,
        labeled_weight: float = 1.0,
        analytics_writer_id: str = "",
        send_weight_diff: bool = False,
        train_task_name: str = AppConstants.TASK_TRAIN,
        validate_task_name: str = AppConstants.TASK_VALIDATION,
        submit_model_task_name: str = AppConstants.TASK_SUBMIT_MODEL,
    ):
        super().__init__()
        self.config = config or {}
        self.labeled_weight = float(labeled_weight)
        self.analytics_writer_id = analytics_writer_id
        self.send_weight_diff = bool(send_weight_diff)
        self.train_task_name = train_task_name
        self.validate_task_name = validate_task_name
        self.submit_model_task_name = submit_model_task_name
        self.trainer: SegmentationTrainer | None = None
        self.eval_cases: list = []
        self.writer = None
        self.setup_error: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def handle_event(self, event_type: str, fl_ctx: FLContext):
        if event_type == EventType.START_RUN:
            try:
                self._setup(fl_ctx)
            except Exception as e:  # the site reports the reason instead of crashing the federation
                self.setup_error = f"{type(e).__name__}: {e}"
                self.log_error(fl_ctx, f"site setup failed: {self.setup_error}")

    def _setup(self, fl_ctx: FLContext) -> None:
        site = fl_ctx.get_identity_name()
        workspace = fl_ctx.get_prop(FLContextKey.WORKSPACE_OBJECT)
        config_dir = workspace.get_site_config_dir() if workspace is not None else None
        settings = find_settings(config_dir, site)
        datalist = load_datalist(settings.datalist, settings.data_root)
        cfg = dict(self.config)
        if settings.num_threads:
            cfg["train"] = {**cfg.get("train", {}), "num_threads": settings.num_threads}
        self.trainer = SegmentationTrainer(cfg, datalist, device=settings.device, logger=self.logger,
                                           on_bad_case=settings.on_bad_case)
        key = settings.eval_key if settings.eval_key != "auto" else ("test" if datalist["test"] else "validation")
        skipped = sum(self.trainer.skipped_cases.values())  # a count only: files are named in the site log
        if key == "validation":
            self.eval_cases = self.trainer.validation_cases
        else:
            self.eval_cases = usable_cases(datalist[key], key, *data_expectations(self.trainer.cfg),
                                           on_bad=settings.on_bad_case, logger=self.logger)
            skipped += len(datalist[key]) - len(self.eval_cases)
        if self.analytics_writer_id:
            self.writer = fl_ctx.get_engine().get_component(self.analytics_writer_id)
        t = self.trainer
        self.log_info(fl_ctx, f"site {site} ready on {t.device}: {len(t.labeled_cases)} labeled, "
                              f"{len(t.unlabeled_cases)} unlabeled, {len(t.validation_cases)} validation, "
                              f"{len(self.eval_cases)} cross-site evaluation cases, {skipped} unusable cases "
                              f"skipped; unlabeled loss: {unlabeled_loss_kind(t)} (settings: {settings.source})")

    # ------------------------------------------------------------------ tasks
    def execute(self, task_name: str, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        if self.trainer is None:
            self.log_error(fl_ctx, f"cannot run '{task_name}': {self.setup_error or 'site not set up'}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)
        try:
            if task_name == self.train_task_name:
                return self._train(shareable, fl_ctx, abort_signal)
            if task_name == self.validate_task_name:
                return self._validate(shareable, fl_ctx, abort_signal)
            if task_name == self.submit_model_task_name:
                return DXO(DataKind.WEIGHTS, _to_numpy(self.trainer.get_weights())).to_shareable()
            self.log_error(fl_ctx, f"unknown task '{task_name}'")
            return make_reply(ReturnCode.TASK_UNKNOWN)
        except Exception as e:
            self.log_exception(fl_ctx, f"task '{task_name}' failed: {type(e).__name__}: {e}")
            return make_reply(ReturnCode.EXECUTION_EXCEPTION)

    def _train(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        dxo = from_shareable(shareable)
        if dxo.data_kind != DataKind.WEIGHTS:
            self.log_error(fl_ctx, f"expected WEIGHTS, got {dxo.data_kind}")
            return make_reply(ReturnCode.BAD_TASK_DATA)
        current_round = int(shareable.get_header(AppConstants.CURRENT_ROUND, 0) or 0)
        total_rounds = int(shareable.get_header(AppConstants.NUM_ROUNDS, current_round + 1) or current_round + 1)
        result = self.trainer.run_round(dxo.data, current_round, total_rounds, abort=lambda: abort_signal.triggered)
        if result.aborted:
            return make_reply(ReturnCode.TASK_ABORTED)
        # an unlabeled-only site takes scaled-down steps: its say in the average is scaled alike (no dilution)
        weight = (self.labeled_weight * result.n_labeled + result.n_unlabeled) * self.trainer.step_scale
        meta: dict[str, Any] = {MetaKey.NUM_STEPS_CURRENT_ROUND: weight}
        if result.metrics_before is not None:  # metric of the RECEIVED global model (IntimeModelSelector)
            meta[MetaKey.INITIAL_METRICS] = {"val_dice": result.metrics_before["val_dice"]}
        self.log_info(fl_ctx, f"round {current_round + 1}/{total_rounds}: {result.iterations} iterations, "
                              f"loss {result.losses['loss']:.4f} (sup {result.losses['sup_loss']:.4f}, "
                              f"unsup {result.losses['unsup_loss']:.4f}), val_dice received "
                              f"{_fmt(result.metrics_before)} -> local {_fmt(result.metrics_after)}, "
                              f"aggregation weight {weight:g}")
        self._stream(current_round, result)
        local = _to_numpy(result.weights)
        if self.send_weight_diff:
            # A site that trained nothing (weight 0: an unlabeled-only site in the warm-up) sends an empty update:
            # FLARE's filters pass a DXO without data through untouched (PercentilePrivacy and SVTPrivacy divide by
            # the weight: 0/0 = NaN, and SVTPrivacy's selection loop never ends on NaN).
            received = dxo.data
            diff = {} if weight == 0 else {
                k: (v - np.asarray(received[k]).astype(v.dtype, copy=False)) for k, v in local.items()}
            return DXO(DataKind.WEIGHT_DIFF, diff, meta=meta).to_shareable()
        return DXO(DataKind.WEIGHTS, local, meta=meta).to_shareable()

    def _validate(self, shareable: Shareable, fl_ctx: FLContext, abort_signal: Signal) -> Shareable:
        owner = shareable.get_header(AppConstants.MODEL_OWNER, "?")
        dxo = from_shareable(shareable)
        if not self.eval_cases:
            self.log_info(fl_ctx, f"no labeled evaluation cases here: no metrics for the model of {owner}")
            return DXO(DataKind.METRICS, {}).to_shareable()
        own = self.trainer.get_weights()
        try:
            self.trainer.set_weights(dxo.data)
            scores = score_cases(self.trainer, self.eval_cases)  # as `fssl evaluate` scores: each scan on its grid
        finally:
            self.trainer.set_weights(own)
        if abort_signal.triggered:
            return make_reply(ReturnCode.TASK_ABORTED)
        self.log_info(fl_ctx, f"model of {owner}: val_dice {scores['dice']:.4f} on {scores['n']} cases")
        return DXO(DataKind.METRICS, {"val_dice": scores["dice"]}).to_shareable()

    def _stream(self, current_round: int, result) -> None:
        if self.writer is None:
            return
        for key in ("loss", "sup_loss", "unsup_loss", "confident_fraction"):
            self.writer.add_scalar(f"train/{key}", float(result.losses[key]), global_step=current_round)
        if result.metrics_before is not None:
            self.writer.add_scalar("val/dice_global_model", result.metrics_before["val_dice"], global_step=current_round)
        if result.metrics_after is not None:
            self.writer.add_scalar("val/dice_local_model", result.metrics_after["val_dice"], global_step=current_round)


def _to_numpy(weights: dict) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in weights.items()}


def _fmt(metrics: dict | None) -> str:
    return "n/a" if metrics is None else f"{metrics['val_dice']:.4f}"
