"""Local trainer and evaluator: one training loop for supervised, semi-supervised and unlabeled-only sites.

``SegmentationTrainer`` knows nothing about FLARE.  The FLARE Executor calls :meth:`run_round` with the global
weights it received; a researcher calls :meth:`fit` (or ``fssl train``) for local or centralized training.
Everything heavy (cached datasets, loaders, model, optimizer) is built once and reused across rounds.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from monai.losses import DeepSupervisionLoss, DiceCELoss
from monai.metrics import DiceMetric
from torch.nn.functional import interpolate

from .averaging import TailAverage, averaged_epochs
from .config import job_training_config, resolve_config
from .data import evaluation_dataset, evaluation_loader, infinite_batches, loader_workers, training_dataset
from .networks import initial_network, output_heads, size_divisor, weights_mismatch
from .ssl import (ConsistencyObjective, Perturbation, class_balanced_at_site, cutmix, teacher_probabilities,
                  unsup_weight)
from .validation import data_expectations, usable_cases

log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    """What federated learning needs back from one round of local training."""

    weights: dict[str, torch.Tensor]
    n_labeled: int  # labeled training cases used this round
    n_unlabeled: int  # unlabeled cases used this round (0 while the unsupervised term is off)
    labeled_samples_seen: int
    unlabeled_samples_seen: int
    iterations: int
    metrics_before: dict | None  # validation metrics of the model as it arrived (None without validation data)
    metrics_after: dict | None  # ... and as it leaves
    losses: dict = field(default_factory=dict)
    aborted: bool = False


class TrainingDiverged(RuntimeError):
    """The loss stayed NaN or infinite for ``train.max_nonfinite_steps`` iterations in a row."""


def amp_dtype(name: str, device: torch.device) -> torch.dtype:
    """Autocast dtype of ``train.amp_dtype`` on a CUDA device: "auto" is bfloat16 where the device computes in it
    natively (compute capability 8.0 and up: Ampere, Hopper, ...), else float16."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float16
    return torch.bfloat16 if name == "bfloat16" else torch.float16


def resolve_device(device: str | None = "auto") -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class SegmentationTrainer:
    """Trains and evaluates one segmentation network on one site's (or a pooled) datalist.

    Args:
        config: a (partial) configuration, see :mod:`fssl_covid.config`.
        datalist: ``{"training": [...], "validation": [...], "unlabeled": [...]}`` with absolute paths
            (see :func:`fssl_covid.data.load_datalist`); any key may be missing or empty.
        device: "auto" (CUDA when available), "cpu", "cuda", "cuda:1", ...
        on_bad_case: "skip" drops unusable cases (corrupt files, NaN, wrong shape, ...; see
            :mod:`fssl_covid.validation`) with one warning each and counts them in ``skipped_cases``;
            "stop" raises :class:`~fssl_covid.data.DataError` naming the first one.
    """

    def __init__(self, config: Mapping | None, datalist: Mapping[str, list], device: str | None = "auto",
                 logger: logging.Logger | None = None, on_bad_case: str = "skip"):
        self.cfg = resolve_config(config)
        self.log = logger or log
        tcfg = self.cfg["train"]
        self.seed = int(tcfg["seed"])
        if tcfg["num_threads"]:
            torch.set_num_threads(int(tcfg["num_threads"]))
        self.device = resolve_device(device)
        # autocast dtype on CUDA with train.amp; None: float32 throughout
        use_amp = bool(tcfg["amp"]) and self.device.type == "cuda"
        self.amp_dtype = amp_dtype(tcfg["amp_dtype"], self.device) if use_amp else None

        self.labeled_cases = list(datalist.get("training") or [])
        self.unlabeled_cases = list(datalist.get("unlabeled") or []) if self.cfg["ssl"]["enabled"] else []
        self.validation_cases = list(datalist.get("validation") or [])
        self.skipped_cases: dict[str, int] = {}
        for key, attr in (("training", "labeled_cases"), ("unlabeled", "unlabeled_cases"),
                          ("validation", "validation_cases")):
            cases = getattr(self, attr)
            kept = usable_cases(cases, key, *data_expectations(self.cfg), on_bad=on_bad_case, logger=self.log)
            self.skipped_cases[key] = len(cases) - len(kept)
            setattr(self, attr, kept)

        self.model = initial_network(self.cfg["network"], self.seed).to(self.device)  # seeds the global RNGs
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # after set_determinism, which turns it off
        self.optimizer = self._make_optimizer()
        # loss scaling only for float16 (bfloat16 has float32's exponent range)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.sup_loss = supervised_loss(float(tcfg["lesion_ce_weight"]), tcfg["dice_batch"],
                                        int(self.cfg["network"]["deep_supervision"])).to(self.device)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.augment = Perturbation(tcfg["augment"], self.generator)
        self.consistency = ConsistencyObjective(self.cfg["ssl"], self.generator, class_balanced_at_site(
            self.cfg["ssl"], len(self.labeled_cases), len(self.unlabeled_cases)))
        self.ema_teacher: torch.nn.Module | None = None
        self._teacher_average: TailAverage | None = None  # ssl.teacher_average_last_epochs
        self._teacher_average_epoch = -1.0
        self._nonfinite_steps = 0  # consecutive iterations with a NaN/infinite loss, across calls (FL rounds)

        self._labeled_batches = self._batches(self.labeled_cases, True, tcfg["batch_size"])
        self._unlabeled_batches = self._batches(self.unlabeled_cases, False, tcfg["unlabeled_batch_size"])
        self._validation_loader = None
        if self.validation_cases:
            self._validation_loader = self._evaluation_loader(self.validation_cases)

    # ------------------------------------------------------------------ setup helpers
    def _make_optimizer(self) -> torch.optim.Optimizer:
        t = self.cfg["train"]
        if t["optimizer"] == "sgd":
            return torch.optim.SGD(self.model.parameters(), lr=t["lr"], momentum=t["momentum"],
                                   weight_decay=t["weight_decay"], nesterov=True)
        return torch.optim.AdamW(self.model.parameters(), lr=t["lr"], weight_decay=t["weight_decay"])

    def _batches(self, cases, labeled: bool, batch_size: int):
        if not cases:
            return None
        ds = training_dataset(self.cfg, cases, labeled=labeled, seed=self.seed + (0 if labeled else 1))
        return infinite_batches(ds, batch_size, seed=self.seed + (2 if labeled else 3),
                                num_workers=loader_workers(int(self.cfg["data"]["num_workers"]), self.device),
                                pin_memory=self.device.type == "cuda")

    def _evaluation_loader(self, cases):
        batch = 8 if self.cfg["data"]["spatial_dims"] == 2 else 1
        return evaluation_loader(evaluation_dataset(self.cfg, cases), batch_size=batch)

    def autocast(self):
        if self.amp_dtype is not None:
            return torch.autocast("cuda", dtype=self.amp_dtype)
        return contextlib.nullcontext()

    @property
    def class_balanced(self) -> bool:
        """Whether this site's pseudo-label loss is balanced per class (``ssl.class_balanced``, decided from its
        usable case counts when "auto")."""
        return self.consistency.class_balanced

    @property
    def step_scale(self) -> float:
        """Learning-rate factor of this trainer's steps: ``ssl.unlabeled_only_lr_scale`` without labeled data
        (Adam's step does not shrink with the weak unsupervised loss), else 1.  In FL the site's aggregation
        weight is scaled by it too, so its small step does not dilute the others' in the average."""
        return float(self.cfg["ssl"]["unlabeled_only_lr_scale"]) if self._labeled_batches is None else 1.0

    # ------------------------------------------------------------------ weights
    def get_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def set_weights(self, weights: Mapping[str, object]) -> None:
        """Load weights given as tensors or numpy arrays (what FLARE delivers); keys and shapes must match."""
        state = self.model.state_dict()
        tensors = {k: torch.as_tensor(np.asarray(v) if not isinstance(v, torch.Tensor) else v)
                   for k, v in weights.items()}
        problem = weights_mismatch(tensors, state)
        if problem:
            raise ValueError(f"weights do not fit the network: {problem}")
        self.model.load_state_dict({k: t.to(state[k].dtype) for k, t in tensors.items()})

    # ------------------------------------------------------------------ evaluation
    def predict_logits(self, x: torch.Tensor, tta: bool = True) -> torch.Tensor:
        """Logits (log-probabilities with ``inference.flip_tta`` or ``scale_tta``) for a batch of preprocessed images:
        whole image in 2D, sliding windows in 3D; on the trainer's device (``x`` is moved there).  ``tta`` False:
        one forward, whatever the inference section says."""
        x = x.to(self.device)
        self.model.eval()
        inf = self.cfg["inference"]
        if not tta or (not inf["flip_tta"] and not inf["scale_tta"]):
            return self._forward(x)
        # test-time augmentation: the SSL teacher's flip averaging at the input size and at each of
        # inference.scale_tta's, every view's probabilities (or logits: inference.tta_average) averaged alike; the
        # result is log-probabilities (argmax and softmax are those of the average)
        logits = inf["tta_average"] == "logits"
        spatial = tuple(x.shape[2:])
        mode = "bilinear" if len(spatial) == 2 else "trilinear"
        factors = (1.0, *inf["scale_tta"])
        total = 0.0
        for factor in factors:
            view = x if factor == 1.0 else interpolate(x, size=self._scaled_size(spatial, factor), mode=mode,
                                                        align_corners=False)
            p = teacher_probabilities(self._forward, view, flips=inf["flip_tta"], autocast=contextlib.nullcontext,
                                      average_logits=logits)
            p = p if factor == 1.0 else interpolate(p, size=spatial, mode=mode, align_corners=False)
            total = total + (p.clamp_min(1e-8).log() if logits else p)
        if logits:  # the softmax of the mean log-probability: every view's logits averaged
            return torch.log_softmax(total / len(factors), dim=1)
        return torch.log((total / len(factors)).clamp_min(1e-8))

    def _scaled_size(self, spatial: tuple[int, ...], factor: float) -> list[int]:
        """``spatial`` times ``factor``; a whole 2D image's sides rounded to the nearest multiple the network takes
        (a 3D scan's sliding windows pad what they need)."""
        if len(spatial) == 3:
            return [max(1, round(n * factor)) for n in spatial]
        k = size_divisor(self.cfg["network"])
        return [max(k, k * round(n * factor / k)) for n in spatial]

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self.autocast():
            if self.cfg["data"]["spatial_dims"] == 2:
                return self.model(x).float()
            inf = self.cfg["inference"]
            return sliding_window_inference(x, roi_size=self.cfg["data"]["patch_size"],
                                            sw_batch_size=inf["sw_batch_size"], predictor=self.model,
                                            overlap=inf["overlap"], mode="gaussian").float()

    def evaluate(self, cases: list | None = None) -> dict | None:
        """Mean Dice (lesion class) over cases with a non-empty mask; None when there is nothing to evaluate.

        Only aggregate values are returned (no per-case results), so the dict may leave a site.
        """
        loader = self._validation_loader if cases is None else (self._evaluation_loader(cases) if cases else None)
        if loader is None:
            return None
        metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
        n = 0
        for batch in loader:
            x = batch["image"].to(self.device)
            y = batch["label"].to(self.device)
            pred = self.predict_logits(x, tta=self.cfg["train"]["validation_tta"]).argmax(dim=1, keepdim=True)
            metric(y_pred=_onehot(pred), y=_onehot(y))
            n += x.shape[0]
        dice = metric.aggregate().item()
        return {"val_dice": 0.0 if math.isnan(dice) else float(dice), "val_cases": n}

    # ------------------------------------------------------------------ training
    def _lr_at(self, epoch: float, total_epochs: float) -> float:
        t = self.cfg["train"]
        if t["scheduler"] == "constant" or total_epochs <= 0:
            return t["lr"]
        p = min(1.0, max(0.0, epoch / total_epochs))
        return t["min_lr"] + 0.5 * (t["lr"] - t["min_lr"]) * (1.0 + math.cos(math.pi * p))

    def _teacher(self, global_teacher: torch.nn.Module | None) -> torch.nn.Module:
        if self.cfg["ssl"]["teacher"] == "ema":
            if self.ema_teacher is None:
                self.ema_teacher = _frozen_copy(self.model)
            return self.ema_teacher
        return global_teacher if global_teacher is not None else _frozen_copy(self.model)

    @torch.no_grad()
    def _averaged_teacher(self, received: torch.nn.Module, epoch: float, total_epochs: float) -> torch.nn.Module:
        """With ``ssl.teacher_average_last_epochs`` N, from epoch ``total - N`` on the global teacher is the running
        average of the models the training calls started from since then: in FL, of the global models this site
        received — the tail average the server will output, built locally with nothing extra sent."""
        n = int(self.cfg["ssl"]["teacher_average_last_epochs"])
        if n <= 0 or epoch < total_epochs - n:
            return received
        if self._teacher_average is None or epoch <= self._teacher_average_epoch:  # a new horizon starts over
            self._teacher_average = TailAverage()
        self._teacher_average_epoch = epoch
        self._teacher_average.add({k: v.clone() for k, v in received.state_dict().items()})
        received.load_state_dict(self._teacher_average.result())
        return received

    @torch.no_grad()
    def _update_ema(self) -> None:
        if self.ema_teacher is None:
            return
        decay = self.cfg["ssl"]["ema_decay"]
        for t, s in zip(self.ema_teacher.state_dict().values(), self.model.state_dict().values()):
            if t.dtype.is_floating_point:
                t.mul_(decay).add_(s.detach(), alpha=1.0 - decay)
            else:
                t.copy_(s)

    def train_epochs(self, epochs: int, start_epoch: float = 0.0, total_epochs: float | None = None,
                     abort: Callable[[], bool] = lambda: False) -> dict:
        """Run ``epochs`` epochs of ``iterations_per_epoch`` iterations from global epoch ``start_epoch``.

        The teacher for a "global" teacher is a frozen copy of the model as it is when this call starts (in FL:
        the received global model).  Returns counts and mean losses.
        """
        t = self.cfg["train"]
        iters = int(t["iterations_per_epoch"])
        total_epochs = total_epochs if total_epochs is not None else start_epoch + epochs
        use_global = self.cfg["ssl"]["teacher"] == "global" and self._unlabeled_batches is not None
        global_teacher = None  # the model this call starts from (FL: the received one), or the average of such
        if use_global:
            global_teacher = self._averaged_teacher(_frozen_copy(self.model), start_epoch, total_epochs)
        stats = {"labeled_samples": 0, "unlabeled_samples": 0, "iterations": 0, "aborted": False,
                 "used_unlabeled": False}
        sums = {"loss": 0.0, "sup_loss": 0.0, "unsup_loss": 0.0, "confident_fraction": 0.0}
        unsup_steps = 0
        self.model.train()
        for e in range(epochs):
            epoch = start_epoch + e
            lam = unsup_weight(self.cfg["ssl"], epoch, total_epochs) if self._unlabeled_batches is not None else 0.0
            if self._labeled_batches is None and lam == 0.0:
                continue  # unlabeled-only site during warm-up: nothing to learn from yet
            teacher = self._teacher(global_teacher) if lam > 0 else None
            lr_scale = self.step_scale
            for i in range(iters):
                if abort():
                    stats["aborted"] = True
                    return self._summarize(stats, sums, unsup_steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr_scale * self._lr_at(epoch + i / iters, total_epochs)
                loss = torch.zeros((), device=self.device)
                sup = unsup = None
                if self._labeled_batches is not None:
                    batch = next(self._labeled_batches)
                    x, y = _on(batch["image"], self.device), _on(batch["label"], self.device)
                    x, y = cutmix(*self.augment(x, y), t["cutmix_prob"], self.generator)
                    with self.autocast():
                        sup = self.sup_loss(output_heads(self.model(x), x), y)  # float32 in the loss
                    loss = loss + sup
                if lam > 0:
                    u = _on(next(self._unlabeled_batches)["image"], self.device)
                    unsup, ustats = self.consistency(self.model, teacher, u, autocast=self.autocast)
                    loss = loss + lam * unsup
                self.optimizer.zero_grad(set_to_none=True)
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    self._skip_nonfinite_step(epoch + i / iters)  # raises TrainingDiverged when it persists
                    continue
                self._nonfinite_steps = 0
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                if teacher is not None and teacher is self.ema_teacher:
                    self._update_ema()
                sums["loss"] += loss_value
                if sup is not None:
                    sums["sup_loss"] += sup.item()
                    stats["labeled_samples"] += x.shape[0]
                if unsup is not None:
                    sums["unsup_loss"] += unsup.item()
                    sums["confident_fraction"] += ustats["confident_fraction"]
                    unsup_steps += 1
                    stats["unlabeled_samples"] += u.shape[0]
                    stats["used_unlabeled"] = True
                stats["iterations"] += 1
        return self._summarize(stats, sums, unsup_steps)

    def _skip_nonfinite_step(self, epoch: float) -> None:
        """A NaN or infinite loss: its step is skipped (the weights stay as they were); too many in a row end the
        training with :class:`TrainingDiverged` rather than let it run on producing nothing."""
        self._nonfinite_steps += 1
        limit = int(self.cfg["train"]["max_nonfinite_steps"])
        self.log.warning(f"loss not finite at epoch {epoch:.2f}: step skipped ({self._nonfinite_steps} in a row)")
        if self._nonfinite_steps >= limit:
            amp = f"autocast {str(self.amp_dtype).replace('torch.', '')}" if self.amp_dtype is not None else "float32"
            raise TrainingDiverged(
                f"training diverged: the loss was NaN or infinite for {self._nonfinite_steps} iterations in a row "
                f"(epoch {epoch:.2f}, {amp}, lr {self.cfg['train']['lr']}); the weights are those before the "
                "first of them. Lower train.lr, or train without float16 (train.amp_dtype bfloat16, or "
                "train.amp false).")

    @staticmethod
    def _summarize(stats: dict, sums: dict, unsup_steps: int) -> dict:
        n = max(1, stats["iterations"])
        out = dict(stats)
        out["loss"] = sums["loss"] / n
        out["sup_loss"] = sums["sup_loss"] / n
        out["unsup_loss"] = sums["unsup_loss"] / max(1, unsup_steps)
        out["confident_fraction"] = sums["confident_fraction"] / max(1, unsup_steps)
        return out

    def run_round(self, weights: Mapping | None, round_index: int, total_rounds: int,
                  abort: Callable[[], bool] = lambda: False, evaluate_after: bool = True) -> RoundResult:
        """One federated round: load the received weights, score them, train ``train.epochs`` epochs, score again."""
        if weights is not None:
            self.set_weights(weights)
        before = self.evaluate()
        epochs = int(self.cfg["train"]["epochs"])
        stats = self.train_epochs(epochs, start_epoch=round_index * epochs, total_epochs=total_rounds * epochs,
                                  abort=abort)
        after = self.evaluate() if evaluate_after and not stats["aborted"] else None
        return RoundResult(
            weights=self.get_weights(),
            n_labeled=len(self.labeled_cases) if stats["labeled_samples"] else 0,
            n_unlabeled=len(self.unlabeled_cases) if stats["used_unlabeled"] else 0,
            labeled_samples_seen=stats["labeled_samples"],
            unlabeled_samples_seen=stats["unlabeled_samples"],
            iterations=stats["iterations"],
            metrics_before=before,
            metrics_after=after,
            losses={k: stats[k] for k in ("loss", "sup_loss", "unsup_loss", "confident_fraction")},
            aborted=stats["aborted"],
        )

    def fit(self, epochs: int | None = None, on_epoch: Callable[[int, dict, dict | None], None] | None = None,
            keep_best: bool = True) -> dict:
        """Local or centralized training: ``epochs`` epochs with validation after each; keeps the best weights
        (``best_weights``).  With ``train.average_last_epochs`` N the model is, at the end, the average of the
        models after each of the last N epochs (``last_weights``: the last epoch's own).

        Returns a history: per-epoch losses and validation metrics (of the model of that epoch), the best validation
        Dice, and the final model's.
        """
        epochs = int(epochs if epochs is not None else self.cfg["train"]["epochs"])
        history, best, best_weights = [], -1.0, None
        averaged, average = averaged_epochs(epochs, int(self.cfg["train"]["average_last_epochs"])), TailAverage()
        for e in range(epochs):
            stats = self.train_epochs(1, start_epoch=e, total_epochs=epochs)
            metrics = self.evaluate()
            history.append({"epoch": e + 1, **{k: stats[k] for k in ("loss", "sup_loss", "unsup_loss")},
                            "val_dice": None if metrics is None else metrics["val_dice"]})
            if on_epoch:
                on_epoch(e + 1, stats, metrics)
            if metrics is not None and metrics["val_dice"] > best:
                best, best_weights = metrics["val_dice"], self.get_weights()
            if e in averaged:
                average.add(self.get_weights())
        self.best_weights = best_weights
        self.last_weights = self.get_weights()
        final_val_dice = history[-1]["val_dice"] if history else None
        if average.count:  # the final model is the tail average; last_weights keeps the last epoch's own
            self.set_weights(average.result())
            metrics = self.evaluate()
            final_val_dice = None if metrics is None else metrics["val_dice"]
        return {"history": history, "best_val_dice": best if best >= 0 else None, "final_val_dice": final_val_dice,
                "averaged_epochs": average.count}

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str | Path, weights: Mapping | None = None, extra: Mapping | None = None) -> None:
        save_checkpoint(path, weights if weights is not None else self.get_weights(), self.cfg, extra)


def save_checkpoint(path: str | Path, weights: Mapping, config: Mapping, extra: Mapping | None = None) -> None:
    """Checkpoint readable by FLARE's ``PTFileModelPersistor`` (key "model") that also carries its config."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {k: torch.as_tensor(v).cpu() for k, v in weights.items()}, "config": dict(config),
                **(dict(extra) if extra else {})}, path)


def load_checkpoint(path: str | Path, config: Mapping | None = None) -> tuple[dict, dict]:
    """Return (state_dict, resolved config).  FLARE's FL_global_model.pt has no config: pass ``config`` then."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {path} holds no state dict")
    cfg = config if config is not None else ckpt.get("config")
    if cfg is None:  # FLARE's app_server/FL_global_model.pt: the job's config sits beside it in app_server/config/
        cfg = job_training_config(path.parent / "config" / "config_fed_client.json")
    if cfg is None:
        raise ValueError(f"checkpoint {path} carries no configuration and no job config is beside it: pass one "
                         "(--config: a config JSON, or the job's folder or config_fed_client.json)")
    return state, resolve_config(cfg)


def supervised_loss(lesion_ce_weight: float = 1.0, dice_batch: bool = True,
                    deep_supervision: int = 0) -> DeepSupervisionLoss:
    """Dice (lesion class, over the batch; per image, averaged, when not ``dice_batch``) + cross-entropy with the
    lesion class weighted ``lesion_ce_weight``, of a list of output heads (:func:`networks.output_heads`): of the
    main head alone, or of it and ``deep_supervision`` coarser heads, weighted 1, 1/2, 1/4, ... scaled to sum to 1
    (nnU-Net's weighting; the loss stays on the scale of one head's).

    MONAI's DiceCELoss passes its class ``weight`` to the Dice term too, which ignores it here (one class left
    without the background): only the cross-entropy's class balance changes (tests/test_trainer.py checks)."""
    weight = torch.tensor([1.0, lesion_ce_weight]) if lesion_ce_weight != 1.0 else None
    loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, batch=dice_batch, weight=weight)
    weights = [0.5 ** level for level in range(int(deep_supervision) + 1)]
    return DeepSupervisionLoss(loss, weights=[w / sum(weights) for w in weights])


def _frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    twin = copy.deepcopy(model).eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def _on(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Plain tensor on the training device (MetaTensor bookkeeping is not needed inside the loop)."""
    x = x.as_tensor() if hasattr(x, "as_tensor") else x
    return x.to(device, non_blocking=True)


def _onehot(labels: torch.Tensor) -> torch.Tensor:
    """(B, 1, *spatial) class indices -> (B, 2, *spatial) one-hot."""
    lab = labels.long().squeeze(1)
    return torch.nn.functional.one_hot(lab, 2).movedim(-1, 1).float()
