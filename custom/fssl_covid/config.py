"""Training configuration: one nested dict with documented defaults.

A configuration is plain JSON so that it can live in a FLARE job config (``config_fed_client.json``), in a
file passed to ``fssl train --config``, or inside a checkpoint.  :func:`resolve_config` merges a partial
configuration over :data:`DEFAULTS` and checks it, so every knob has a sane default and a typo fails loudly.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping

DEFAULTS: dict[str, Any] = {
    "data": {
        # 3 for CT volumes, 2 for single slices stored as (W, H, 1) NIfTI.
        "spatial_dims": 3,
        # Input intensity window mapped linearly to 0..1 and clipped (lung window in HU for CT;
        # [0, 255] for 8-bit display slices such as COVID-SemiSeg).
        "intensity_range": [-1000.0, 500.0],
        # How intensities become 0..1: "window" maps intensity_range linearly (HU are comparable between scanners);
        # "percentile" maps each image's own 0.5th..99.5th percentiles (for display-windowed 8-bit slices whose
        # window differs per source, e.g. COVID-SemiSeg: mean 140 at italy, 59 at coronacases); "histogram"
        # equalizes each image's histogram to 0..1 (MONAI HistogramNormalize): rank-based, so it also removes a
        # non-linear display curve (coronacases' wider window compresses the lung's grey levels), not only a linear one.
        "intensity_normalization": "window",
        # 3D only: target voxel size in mm (null: keep the file's grid) and orientation.
        "spacing": [1.5, 1.5, 3.0],
        "orientation": "RAS",
        # 3D: training patch size (voxels) and sliding-window size.  2D: every slice is resized to this.
        "patch_size": [64, 64, 32],
        # 3D patch sampling balanced between lesion (pos) and background (neg) centres.
        "pos": 1.0,
        "neg": 1.0,
        "samples_per_image": 2,
        # Deterministic preprocessing is cached in memory once per site (the data does not change between rounds).
        "cache_rate": 1.0,
        # Training loader worker processes for the random patch sampling; -1 = auto: 0 on CPU (workers would take
        # cores from the training itself), min(4, cores // 2) with CUDA, where they run beside the GPU.
        "num_workers": -1,
    },
    "network": {
        # "unet" (monai.networks.nets.UNet), "dynunet" (monai.networks.nets.DynUNet: nnU-Net's layout, a first
        # level at full resolution) or "segresnet" (monai.networks.nets.SegResNet).
        "name": "unet",
        "spatial_dims": 3,
        "in_channels": 1,
        "out_channels": 2,
        # UNet / DynUNet: encoder widths and strides; SegResNet: init_filters and blocks_down.
        "channels": [16, 32, 64, 128],
        "strides": [2, 2, 2],
        "num_res_units": 2,
        "norm": "instance",
        "dropout": 0.0,
        "init_filters": 16,
        "blocks_down": [1, 2, 2, 4],
        # DynUNet only: extra output heads at the next coarser levels, each trained against the mask too (MONAI
        # DeepSupervisionLoss, weights 1, 1/2, 1/4, ... scaled to sum to 1); 0: none.  Inference reads the main head.
        "deep_supervision": 0,
    },
    "ssl": {
        # Fed-Consist: the teacher predicts on a weakly perturbed view, confident voxels become pseudo-labels
        # and the student learns them on a strongly perturbed view.
        "enabled": True,
        # "global": frozen copy of the model received at the start of the round (or of the training call);
        # "ema": local exponential moving average of the student, never sent anywhere.
        "teacher": "global",
        "ema_decay": 0.99,
        # With the "global" teacher: in the last N epochs (FL: rounds) the teacher is the running average of the
        # models those epochs started from (FL: the global models the site received since then), i.e. the tail
        # average the server outputs with train.average_last_epochs N, built by each site from what it already
        # receives.  0: the received model itself.  Study B fssl, six seeds, N = 40 (fifteenth session): the same
        # Dice to +0.0000 (sd 0.0002) — the unlabeled sites there make up 0.9 % of each round's update.
        "teacher_average_last_epochs": 0,
        # Average the teacher's prediction over the weak view and its flips along each spatial axis (better
        # pseudo-labels for 1 + spatial_dims teacher forwards per unlabeled batch).  Study B fssl, 3 seeds (twelfth
        # session): 0.755 / 0.754 / 0.775 with it, 0.751 / 0.753 / 0.774 without; the 2D preset turned it on then.
        # Over six seeds (thirteenth session) fssl with it ties local (paired -0.002, sd 0.0065): a gain of that
        # size is inside the noise.  Twenty-fifth session, one forward: 0.754 / 0.762 / 0.776 against 0.756 / 0.761 /
        # 0.776 (paired -0.0005) for a third of the teacher's forwards; the 2D preset turned it off again (with
        # train.validation_tta off too, Study B's whole matrix took 62 min, 83 min before).
        "teacher_flip_tta": True,
        # Voxels whose teacher confidence (max softmax probability) is below this are ignored.
        # 0 keeps every voxel (the "no confidence threshold" ablation).
        "confidence_threshold": 0.9,
        # Scale the threshold per class by the teacher's relative confidence in that class (see
        # ssl.pseudo_labels), so the rare lesion class still yields hard pseudo-labels ("ce"/"dice_ce" losses).
        "class_adaptive_threshold": False,
        # "ce": hard pseudo-labels (arg-max) with masked cross-entropy (class-balanced: below); "dice_ce": "ce" plus a
        # masked soft Dice on the lesion class; "mse": soft pseudo-labels (squared difference between student and
        # teacher probabilities on the confident voxels).  Measured (issue notes, 2026-11-26): on synthetic 3D CT
        # with 2 labeled scans, "ce" + flip TTA beat supervised-only by +0.018..+0.031 mean test Dice (3 seeds) where
        # "mse" tied and "dice_ce" lost; on the real 2D COVID-SemiSeg slices "mse" lost least to supervised-only
        # (0.703 vs 0.721, "ce" + TTA 0.655), so the covid2d preset keeps "mse".
        "unsup_loss": "ce",
        # Average the cross-entropy within each pseudo-class (background cannot drown the rare lesion class): true,
        # false, or "auto": on at a site whose unlabeled training cases number at least class_balanced_min_ratio
        # times its labeled ones (and at a site without labels), off elsewhere.  The balanced term is what moves
        # the model, and it helps only where labels are scarce (docs/experiments.md, Study A, twenty-first and
        # twenty-second sessions; 3 seeds each): synthetic federation, 2 labeled + 10 unlabeled scans a site,
        # italy +0.030 against supervised FedAvg with it, +0.009 without; 2 labels and 12 unlabeled scans pooled
        # (tests/test_learning.py's setting) +0.028 / +0.031 / +0.040 at the shifted sites with it, where
        # unbalanced with lesion_weight 10 gave +0.019 / -0.011 / +0.008; at Study A's own counts (china 6 + 6,
        # italy 4 + 8) it cost -0.035 against FedAvg, where off cost -0.011 and "auto" -0.006.  Ratio boundary,
        # checked at 3 + 9 (balanced and unbalanced tie) and 4 + 8 (balanced -0.017, unbalanced -0.002).
        "class_balanced": "auto",
        "class_balanced_min_ratio": 3.0,
        # loss = supervised + lambda(t) * unsupervised; lambda is 0 during warm-up, then ramps up (sigmoid
        # ramp of Laine & Aila) to unsup_weight.  t counts epochs (in FL: round * epochs_per_round + epoch).
        "unsup_weight": 1.0,
        "warmup_epochs": 1,
        "rampup_epochs": 4,
        # The unsupervised term is off in the last N epochs of the horizon (in FL the last rounds: unlabeled-only
        # sites then train nothing and send weight 0), so training ends with supervised fine-tuning on the labeled
        # data, as Noisy Student / Semi-Inf-Net end on labels.  0: the term stays on to the end.  Measured on
        # Study B (eighth session, seed 0): 30 of 80 epochs pooled 0.738 vs 0.721 (supervised alone 0.759);
        # federated 0.733 vs 0.741 — not adopted by the presets.
        "final_supervised_epochs": 0,
        # Learning-rate factor for a site with no labeled data (it trains on the unsupervised term alone).
        # Adam's step does not shrink with the loss, so lambda cannot make such a site's update small; this does.
        # Measured on the synthetic federation (tiny 3D UNet, 4 rounds of 20 iterations, 4 seeds): 1.0 let the unlabeled-only site
        # pull the global model down (one round from a model at Dice 0.565: 0.287); 0.1 kept it (0.562) and
        # raised the final global Dice at the labeled sites from 0.54 to 0.57 on average.
        # The site's aggregation weight is scaled by the same factor (FSSLExecutor): at full weight its small step
        # pulled the average back toward the received model (in-process FedAvg replica of the demo federation, 8
        # rounds, seed 0: mean test Dice 0.511 at full weight, 0.538 scaled, 0.541 with the site left out).
        "unlabeled_only_lr_scale": 0.1,
        # Probability that an unlabeled sample's student view and pseudo-labels get a box cut from the next sample
        # of the batch (CutMix consistency, French et al. 2020); 0 disables it.  Measured on real 2D slices
        # (docs/experiments.md, in-domain protocol): +0.049 (hard labels, EMA teacher) and +0.074 (soft, global
        # teacher) Dice against the same objective without it: the teacher's background bias cannot be copied
        # into a mixed scene.  On Study B (40 labeled slices, 541 unlabeled from two other sources) the CutMix
        # objective lost 0.010 to the preset's (3 seeds), hence off by default.
        "cutmix_prob": 0.0,
        # Weight of the voxels the teacher calls lesion in the unsupervised loss (background 1): the pseudo-label
        # counterpart of train.lesion_ce_weight (class term weight for the class-balanced "ce"/"dice_ce").
        # Measured on Study B pooled (eighth session, seed 0, mse): 3 gave 0.681 against 0.721 at 1.
        "lesion_weight": 1.0,
        # The weak view is intensity-only, so the teacher's output stays on the image grid.
        "weak": {"noise_std": 0.0, "intensity_scale": 0.0, "intensity_shift": 0.0, "gamma": 0.0},
        # The 2D preset turns the strong view's rotation and zoom off, as for the labeled batches: Study B, 3 seeds,
        # fssl 0.743 / 0.749 / 0.768 with them, 0.751 / 0.753 / 0.774 without (docs/experiments.md).
        "strong": {"noise_std": 0.05, "intensity_scale": 0.15, "intensity_shift": 0.1,
                   "flip_prob": 0.5, "rotate_deg": 10.0, "scale": 0.1, "gamma": 0.0},
    },
    "train": {
        "optimizer": "adamw",  # "adamw" or "sgd"
        "lr": 1e-3,
        "min_lr": 1e-5,
        "weight_decay": 1e-5,
        "momentum": 0.9,
        # "cosine" over the whole training horizon (all rounds in FL) or "constant".
        "scheduler": "cosine",
        # The final model of centralized training is the average of the models after each of the last N epochs
        # (0: the last model; all epochs when N exceeds them; fssl_covid.averaging).  Federated training does the
        # same on the server over the last N rounds' global models: the job's persistor's ``average_last_rounds``
        # (customize_job and the experiment runner set it from this key; a site's rounds ignore it).
        "average_last_epochs": 0,
        "batch_size": 2,
        "unlabeled_batch_size": 2,
        # Iterations per epoch (one labeled and, when the unsupervised term is active, one unlabeled batch each).
        "iterations_per_epoch": 20,
        "epochs": 1,
        # Augmentation of labeled batches (same batched perturbation as the SSL strong view).  The 2D preset turns
        # rotation and zoom off: on Study B (real slices, 3 seeds, 800 iterations) the final Dice fell as the warp
        # grew — none 0.759, 5 deg / 5 % 0.748, 10 deg / 10 % 0.747, 30 deg / 25 % 0.717 (docs/experiments.md).
        "augment": {"noise_std": 0.02, "intensity_scale": 0.1, "intensity_shift": 0.05,
                    "flip_prob": 0.5, "rotate_deg": 10.0, "scale": 0.1, "gamma": 0.0},
        # Probability that a labeled sample gets a box cut from the next sample of its batch, image and mask alike
        # (supervised CutMix, after the augmentation above); 0 disables it.
        "cutmix_prob": 0.0,
        # Weight of the lesion class in the supervised cross-entropy (background 1; the Dice term keeps its scale).
        # Plain CE lets the abundant background pull uncertain lesion pixels below 0.5: models under-segment.
        "lesion_ce_weight": 1.0,
        # The supervised Dice term over the whole batch (True: one Dice of all its voxels) or per image, averaged
        # (False: every slice or scan counts alike, as in the per-image Dice the studies report).
        "dice_batch": True,
        "amp": True,  # mixed precision, only used on CUDA
        # "auto": bfloat16 where the GPU supports it (fp32's range: no overflow), else float16 with loss scaling.
        # float16 overflowed in the forward pass of a wider 2D U-Net on an H200 (Study B, 2026-11-27): NaN losses.
        "amp_dtype": "auto",
        # Training stops with an error after this many consecutive iterations whose loss is not finite (each such
        # step is skipped, so the weights are never touched by it).
        "max_nonfinite_steps": 20,
        # How the per-epoch (centralized) and per-round (federated: the received and the trained model) validation
        # reads the model: with the inference section's TTA (True) or with one forward (False).  That validation
        # only draws the Dice curves and picks the best model; final and cross-site scores always read with the
        # inference section's TTA.  The 2D preset turns it off: its nine-view reading (flips x 3 scales) of italy's
        # validation slices, twice a round, was about 40 % of italy's round by a count of forwards.
        "validation_tta": True,
        "seed": 0,
        "num_threads": 0,  # torch CPU threads; 0 keeps torch's default
    },
    "inference": {
        "sw_batch_size": 4,
        "overlap": 0.25,
        "threshold": 0.5,
        # Average the prediction over the image and its flips along each spatial axis (test-time augmentation:
        # 1 + spatial_dims forwards per image; averaged as tta_average says).  Used by evaluation, prediction and the
        # reports.
        "flip_tta": False,
        # Also predict the image resized by each of these factors (whole 2D images: to the nearest size the network
        # takes; 3D: sliding windows over the resized scan), map each probability back to the image's size and
        # average it with the original scale's: 1 + len(scale_tta) sizes, each with its flips when flip_tta is on.
        # [] predicts at the input size only.  The 2D preset uses [0.9, 1.1] (192 px: 176 and 208): against its
        # flips at the input size alone (logits averaged), Study B's 8 local models of the twenty-third session
        # (five folds) scored +0.008 at Dice 0.5 and +0.006 in mean Dice (7 of 8 higher); not measured in 3D.
        "scale_tta": [],
        # How the TTA views are averaged: "logits" (the softmax of their mean logits: a pixel the views agree on
        # keeps its confidence) or "probabilities" (their mean probability: before the twenty-third session).
        # Measured on Study B (8 local models over five folds, flips only): the same Dice at 0.5 (+0.0002), a
        # threshold-averaged ("mean") Dice +0.010 higher, 8 of 8 (docs/experiments.md).
        "tta_average": "logits",
    },
}


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent."""


def _merge(base: dict, override: Mapping, path: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key not in base:
            raise ConfigError(f"unknown configuration key '{path}{key}' (known: {', '.join(sorted(base))})")
        if isinstance(base[key], dict) and base[key] and not isinstance(value, Mapping):
            raise ConfigError(f"configuration key '{path}{key}' must be an object")
        if isinstance(base[key], dict) and base[key]:
            out[key] = _merge(base[key], value, f"{path}{key}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_config(partial: Mapping | None = None) -> dict:
    """Return a full configuration: ``partial`` merged over :data:`DEFAULTS`, then checked."""
    cfg = _merge(DEFAULTS, partial or {}, "")
    _check(cfg)
    return cfg


def job_training_config(where: str | Path) -> dict | None:
    """The sites' training configuration of a FLARE job: ``args.config`` of the FSSLExecutor in the job's
    ``config_fed_client.json``.  ``where``: that file, a job folder (``jobs/<name>``), a downloaded job (the
    server's copy ``workspace/app_server/config/`` first) or a simulator's run folder.  None when there is none."""
    where = Path(where)
    if where.is_file():
        candidates = [where]
    elif where.is_dir():
        candidates = sorted(where.rglob("config_fed_client.json"),
                            key=lambda p: ("app_server" not in p.parts, len(p.parts)))
    else:
        return None
    for path in candidates:
        try:
            client = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        for entry in client.get("executors", []) if isinstance(client, dict) else []:
            executor = entry.get("executor", {}) if isinstance(entry, dict) else {}
            if str(executor.get("path", "")).endswith("FSSLExecutor"):
                return dict(executor.get("args", {}).get("config") or {})
    return None


PRESETS_DIR = Path(__file__).resolve().parent / "presets"


def config_path(name_or_path: str | None) -> Path | None:
    """A config file path, or the name of a packaged preset (``fssl_covid/presets/<name>.json``)."""
    if name_or_path is None:
        return None
    p = Path(name_or_path)
    if p.suffix != ".json" and (PRESETS_DIR / f"{name_or_path}.json").is_file():
        return PRESETS_DIR / f"{name_or_path}.json"
    return p


def load_config(path: str | Path | None) -> dict:
    """Read a configuration and resolve it; ``None`` gives the defaults.  ``path``: a JSON configuration file
    (partial is fine), or a FLARE job's ``config_fed_client.json`` or job folder (its sites' training config)."""
    if path is None:
        return resolve_config()
    path = Path(path)
    if path.is_dir():
        partial = job_training_config(path)
        if partial is None:
            raise ConfigError(f"{path}: a folder without a job's config_fed_client.json (FSSLExecutor) in it")
    else:
        try:
            partial = json.loads(path.read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"configuration file {path} does not exist") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"configuration file {path} is not valid JSON: {e}") from e
        if isinstance(partial, dict) and "executors" in partial:  # a job's config_fed_client.json
            partial = job_training_config(path)
            if partial is None:
                raise ConfigError(f"{path}: a FLARE client config without an FSSLExecutor")
    try:
        return resolve_config(partial)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def _check(cfg: dict) -> None:
    data, net, ssl, train = cfg["data"], cfg["network"], cfg["ssl"], cfg["train"]
    dims = data["spatial_dims"]
    if dims not in (2, 3):
        raise ConfigError(f"data.spatial_dims must be 2 or 3, got {dims}")
    if net["spatial_dims"] != dims:
        raise ConfigError(f"network.spatial_dims ({net['spatial_dims']}) differs from data.spatial_dims ({dims})")
    if len(data["patch_size"]) != dims:
        raise ConfigError(f"data.patch_size {data['patch_size']} must have {dims} entries")
    if dims == 3 and data["spacing"] is not None and len(data["spacing"]) != 3:
        raise ConfigError(f"data.spacing {data['spacing']} must have 3 entries (or be null)")
    lo, hi = data["intensity_range"]
    if not lo < hi:
        raise ConfigError(f"data.intensity_range {data['intensity_range']} must be [low, high] with low < high")
    if data["intensity_normalization"] not in ("window", "percentile", "histogram"):
        raise ConfigError("data.intensity_normalization must be 'window', 'percentile' or 'histogram', got "
                          f"'{data['intensity_normalization']}'")
    if net["name"] not in ("unet", "dynunet", "segresnet"):
        raise ConfigError(f"network.name must be 'unet', 'dynunet' or 'segresnet', got '{net['name']}'")
    heads = net["deep_supervision"]
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 0:
        raise ConfigError(f"network.deep_supervision must be a whole number of heads, 0 or more, got {heads!r}")
    if heads and (net["name"] != "dynunet" or heads >= len(net["strides"])):
        raise ConfigError(f"network.deep_supervision {heads} needs network.name 'dynunet' and fewer heads than "
                          f"network.strides has levels ({len(net['strides'])}); got '{net['name']}'")
    if ssl["teacher"] not in ("global", "ema"):
        raise ConfigError(f"ssl.teacher must be 'global' or 'ema', got '{ssl['teacher']}'")
    if int(ssl["teacher_average_last_epochs"]) < 0:
        raise ConfigError("ssl.teacher_average_last_epochs must be 0 (off) or more, got "
                          f"{ssl['teacher_average_last_epochs']}")
    if ssl["unsup_loss"] not in ("ce", "dice_ce", "mse"):
        raise ConfigError(f"ssl.unsup_loss must be 'ce', 'dice_ce' or 'mse', got '{ssl['unsup_loss']}'")
    if not 0.0 <= ssl["unlabeled_only_lr_scale"] <= 1.0:
        raise ConfigError(f"ssl.unlabeled_only_lr_scale must be in [0, 1], got {ssl['unlabeled_only_lr_scale']}")
    for name, value in (("ssl.cutmix_prob", ssl["cutmix_prob"]), ("train.cutmix_prob", train["cutmix_prob"])):
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name} must be in [0, 1], got {value}")
    if not 0.0 <= ssl["confidence_threshold"] < 1.0:
        raise ConfigError(f"ssl.confidence_threshold must be in [0, 1), got {ssl['confidence_threshold']}")
    if train["optimizer"] not in ("adamw", "sgd"):
        raise ConfigError(f"train.optimizer must be 'adamw' or 'sgd', got '{train['optimizer']}'")
    if train["amp_dtype"] not in ("auto", "bfloat16", "float16"):
        raise ConfigError(f"train.amp_dtype must be 'auto', 'bfloat16' or 'float16', got '{train['amp_dtype']}'")
    if int(train["max_nonfinite_steps"]) < 1:
        raise ConfigError(f"train.max_nonfinite_steps must be at least 1, got {train['max_nonfinite_steps']}")
    if train["scheduler"] not in ("cosine", "constant"):
        raise ConfigError(f"train.scheduler must be 'cosine' or 'constant', got '{train['scheduler']}'")
    if int(train["average_last_epochs"]) < 0:
        raise ConfigError(f"train.average_last_epochs must be 0 (off) or more, got {train['average_last_epochs']}")
    if int(data["num_workers"]) < -1:
        raise ConfigError(f"data.num_workers must be -1 (auto) or at least 0, got {data['num_workers']}")
    if int(ssl["final_supervised_epochs"]) < 0:
        raise ConfigError(f"ssl.final_supervised_epochs must be at least 0, got {ssl['final_supervised_epochs']}")
    if not float(ssl["lesion_weight"]) > 0.0:
        raise ConfigError(f"ssl.lesion_weight must be positive, got {ssl['lesion_weight']}")
    if not float(train["lesion_ce_weight"]) > 0.0:
        raise ConfigError(f"train.lesion_ce_weight must be positive, got {train['lesion_ce_weight']}")
    for name, view in (("ssl.weak", ssl["weak"]), ("ssl.strong", ssl["strong"]), ("train.augment", train["augment"])):
        if not float(view["gamma"]) >= 0.0:
            raise ConfigError(f"{name}.gamma must be 0 (off) or more, got {view['gamma']}")
    if not (isinstance(ssl["class_balanced"], bool) or ssl["class_balanced"] == "auto"):
        raise ConfigError(f"ssl.class_balanced must be true, false or \"auto\", got {ssl['class_balanced']!r}")
    if not float(ssl["class_balanced_min_ratio"]) >= 0.0:
        raise ConfigError(f"ssl.class_balanced_min_ratio must be 0 or more, got {ssl['class_balanced_min_ratio']}")
    if cfg["inference"]["tta_average"] not in ("logits", "probabilities"):
        raise ConfigError("inference.tta_average must be 'logits' or 'probabilities', got "
                          f"{cfg['inference']['tta_average']!r}")
    scales = cfg["inference"]["scale_tta"]
    if not isinstance(scales, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                                               and v != 1 for v in scales):
        raise ConfigError(f"inference.scale_tta must be a list of positive factors other than 1, got {scales!r}")
    for key in ("dice_batch", "validation_tta"):
        if not isinstance(train[key], bool):
            raise ConfigError(f"train.{key} must be true or false, got {train[key]!r}")
    for key in ("batch_size", "unlabeled_batch_size", "iterations_per_epoch", "epochs"):
        if int(train[key]) < 1:
            raise ConfigError(f"train.{key} must be at least 1, got {train[key]}")
