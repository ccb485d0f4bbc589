#!/usr/bin/env python3
"""Two diagnostics of the semi-supervised objective (docs/experiments.md, "The objective, taken apart").

    # How biased are a model's confident pseudo-labels?  (on labeled scans, where the truth is known)
    python scripts/ssl_diagnostics.py pseudo-labels --model results/study_b/seed0/local/model_final.pt \
        --datalist ../shared/data/covid_semiseg/italy.json --key training

    # In-domain sweep: the first N labeled scans keep their masks, the site's other training scans are used
    # unlabeled (masks dropped); supervised alone, then each arm (a JSON object: name -> configuration patch).
    # "--datalist study_b": italy's 40 training and 10 validation slices of Study B's fixed split.
    python scripts/ssl_diagnostics.py in-domain --config covid2d --datalist study_b --labeled 10 \
        --arms arms.json [--seed 0] [--threads 2]

    # Offline self-training (Semi-Inf-Net style): a trained model pseudo-labels the unlabeled scans once (its
    # `fssl predict` masks: threshold 0.5, with the model's test-time flips), then a new model of the same configuration trains
    # supervised, from scratch and for the same budget, on the labeled scans (each repeated --repeat times) and
    # the pseudo-labeled ones.  "--datalist study_b": unlabeled = coronacases and radiopaedia.
    python scripts/ssl_diagnostics.py self-training --teacher results/study_b/seed0/local/model_final.pt \
        --datalist study_b --repeat 13 [--min-share 0] [--seed 0] [--threads 2]

Only aggregate figures are printed.  Centralized (no FLARE): these are for choosing an objective before spending a
federated run on it.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "custom"))

from fssl_covid.config import config_path, load_config, resolve_config  # noqa: E402
from fssl_covid.data import evaluation_dataset, load_datalist  # noqa: E402
from fssl_covid.inference import predict_files  # noqa: E402
from fssl_covid.jobs import deep_update  # noqa: E402
from fssl_covid.trainer import SegmentationTrainer, load_checkpoint  # noqa: E402


def pseudo_label_bias(model: str, cases: list[dict], thresholds=(0.5, 0.7, 0.9, 0.95)) -> dict:
    """Lesion share of the truth and of the prediction, and per confidence threshold the share of true lesion
    pixels the model labels confidently background / confidently lesion, and the precision of confident lesion."""
    state, cfg = load_checkpoint(model)
    trainer = SegmentationTrainer(cfg, {})
    trainer.set_weights(state)
    probs, truths = [], []
    for item in evaluation_dataset(cfg, cases):
        probs.append(torch.softmax(trainer.predict_logits(item["image"][None].to(trainer.device)), 1)[0, 1].cpu())
        truths.append(item["label"][0] > 0.5)
    p = torch.cat([x.flatten() for x in probs])
    y = torch.cat([x.flatten() for x in truths])
    out = {"cases": len(probs), "lesion_share_truth": float(y.float().mean()),
           "lesion_share_predicted": float((p >= 0.5).float().mean()), "by_threshold": {}}
    for tau in thresholds:
        bg, lesion = p < 1 - tau, p >= tau
        out["by_threshold"][str(tau)] = {
            "true_lesion_confidently_background": float((bg & y).sum() / y.sum().clamp(min=1)),
            "true_lesion_confidently_lesion": float((lesion & y).sum() / y.sum().clamp(min=1)),
            "confident_lesion_precision": float((lesion & y).sum() / lesion.sum().clamp(min=1)),
        }
    return out


def in_domain(cfg: dict, datalist: dict, n_labeled: int, arms: dict, seed: int, log=print) -> dict:
    """Supervised on the first ``n_labeled`` training scans, then every arm with the rest of them unlabeled."""
    training = datalist["training"]
    if not 0 < n_labeled < len(training):
        raise ValueError(f"--labeled must be between 1 and {len(training) - 1} (the datalist has {len(training)} "
                         "labeled training scans)")
    if not datalist.get("validation"):
        raise ValueError("the datalist needs 'validation' scans (with masks) to score on")
    labeled = training[:n_labeled]
    unlabeled = [{"image": c["image"]} for c in training[n_labeled:]]
    results = {}
    for name, patch in {"supervised": {"ssl": {"enabled": False}}, **arms}.items():
        run_cfg = resolve_config(deep_update(copy.deepcopy(cfg), patch))  # unknown keys fail here
        run_cfg["train"]["seed"] = seed
        t0 = time.time()
        trainer = SegmentationTrainer(run_cfg, {"training": labeled, "validation": datalist["validation"],
                                                "unlabeled": unlabeled})
        history = trainer.fit()["history"]
        curve = [h["val_dice"] for h in history]
        results[name] = {"final": curve[-1], "best": max(curve), "curve": curve, "seconds": time.time() - t0}
        log(f"{name}: final {curve[-1]:.3f} best {max(curve):.3f} ({results[name]['seconds']:.0f} s)")
    return results


def write_pseudo_labels(model: str, cases: list[dict], out: Path, min_share: float = 0.0) -> list[dict]:
    """The model's lesion mask for each unlabeled image (``fssl predict``'s: at ``inference.threshold``, on the
    image's own grid, same file name), written into ``out`` (never beside the data); masks whose lesion share is
    below ``min_share`` are left out.  Returns the datalist entries {"image": image, "label": its mask}."""
    images = [c["image"] for c in cases]
    if len({Path(i).name for i in images}) != len(images):
        raise ValueError("the unlabeled images' file names must be unique (their masks are named after them)")
    state, cfg = load_checkpoint(model)
    trainer = SegmentationTrainer(cfg, {})
    trainer.set_weights(state)
    pseudo = []
    for image, mask in zip(images, predict_files(trainer, images, out)):
        if np.asarray(nib.load(mask).dataobj).mean() < min_share:
            mask.unlink()
            continue
        pseudo.append({"image": image, "label": str(mask)})
    return pseudo


def self_training(teacher: str, datalist: dict, unlabeled: list[dict], repeat: int, seed: int, workdir: Path,
                  min_share: float = 0.0, log=print) -> dict:
    """Pseudo-label ``unlabeled`` with ``teacher`` once, then train the teacher's configuration from scratch,
    supervised, on ``training`` x ``repeat`` + the pseudo-labeled images; scored on ``validation`` each epoch."""
    if repeat < 1:
        raise ValueError("--repeat must be at least 1")
    if not datalist.get("validation"):
        raise ValueError("the datalist needs 'validation' scans (with masks) to score on")
    if not unlabeled:
        raise ValueError("the datalist has no 'unlabeled' scans to pseudo-label")
    t0 = time.time()
    pseudo = write_pseudo_labels(teacher, unlabeled, workdir, min_share)
    log(f"pseudo-labeled {len(pseudo)} of {len(unlabeled)} unlabeled images ({time.time() - t0:.0f} s)")
    _, cfg = load_checkpoint(teacher)
    cfg["ssl"]["enabled"] = False
    cfg["train"]["seed"] = seed
    t0 = time.time()
    trainer = SegmentationTrainer(cfg, {"training": list(datalist["training"]) * repeat + pseudo,
                                        "validation": datalist["validation"]})
    curve = [h["val_dice"] for h in trainer.fit()["history"]]
    result = {"pseudo_labeled": len(pseudo), "unlabeled": len(unlabeled), "final": curve[-1], "best": max(curve),
              "curve": curve, "seconds": time.time() - t0}
    log(f"self-training: final {curve[-1]:.3f} best {max(curve):.3f} ({result['seconds']:.0f} s)")
    return result


def _study_b() -> dict:
    """Study B's fixed split: italy's 40 training and 10 validation slices, and the two unlabeled sites."""
    from fssl_covid.experiment import study_real2d
    with tempfile.TemporaryDirectory() as tmp:  # study_real2d writes its split.json there
        sites = study_real2d(Path(tmp), quick=False).sites
    return {"training": sites["italy"]["training"], "validation": sites["italy"]["validation"],
            "unlabeled": sites["coronacases"]["unlabeled"] + sites["radiopaedia"]["unlabeled"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    pl = sub.add_parser("pseudo-labels", help="bias of a model's confident pseudo-labels on labeled scans")
    pl.add_argument("--model", required=True)
    pl.add_argument("--datalist", required=True)
    pl.add_argument("--key", default="validation")
    ind = sub.add_parser("in-domain", help="supervised vs semi-supervised arms with the site's own unlabeled scans")
    ind.add_argument("--config", required=True, help="a preset name (covid2d, synthetic3d) or a config JSON")
    ind.add_argument("--datalist", required=True,
                     help="with 'training' and 'validation' entries, or 'study_b' (italy, Study B's split)")
    ind.add_argument("--labeled", type=int, required=True)
    ind.add_argument("--arms", required=True, help="JSON file: {arm name: configuration patch}")
    ind.add_argument("--seed", type=int, default=0)
    ind.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ind.add_argument("--out", help="write the results as JSON here")
    st = sub.add_parser("self-training", help="pseudo-label the unlabeled scans once, retrain supervised")
    st.add_argument("--teacher", required=True, help="checkpoint that pseudo-labels (its config is the student's)")
    st.add_argument("--datalist", required=True,
                    help="with 'training', 'validation' and 'unlabeled' entries, or 'study_b'")
    st.add_argument("--repeat", type=int, default=1, help="each labeled scan counts this many times")
    st.add_argument("--min-share", type=float, default=0.0,
                    help="leave out images whose predicted lesion share is below this")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--threads", type=int, default=0)
    st.add_argument("--workdir", help="where the pseudo-label masks go (default: a temporary folder)")
    st.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.command == "pseudo-labels":
        print(json.dumps(pseudo_label_bias(args.model, load_datalist(args.datalist)[args.key]), indent=1))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    datalist = _study_b() if args.datalist == "study_b" else load_datalist(args.datalist)
    try:
        if args.command == "self-training":
            with tempfile.TemporaryDirectory() as tmp:
                results = self_training(args.teacher, datalist, datalist["unlabeled"], args.repeat, args.seed,
                                        Path(args.workdir or tmp), args.min_share)
        else:
            results = in_domain(load_config(config_path(args.config)), datalist, args.labeled,
                                json.loads(Path(args.arms).read_text()), args.seed)
    except (ValueError, OSError) as e:  # ConfigError is a ValueError; a bad --arms file too
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
