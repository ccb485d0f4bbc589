"""Learning: semi-supervised training on a small synthetic set learns to segment lesions (CPU, under a minute)."""

import json

from fssl_covid.data import load_datalist
from fssl_covid.trainer import SegmentationTrainer
from jobtools import JOBS

FLOOR = 0.4  # stated floor for validation Dice; the empty-mask baseline scores 0 on scans with lesions


def test_semi_supervised_training_learns_lesions(synthetic_sites):
    cfg = json.loads((JOBS / "fssl_covid_seg/app/config/config_fed_client.json").read_text())
    cfg = cfg["executors"][0]["executor"]["args"]["config"]  # the demo job's network and objective
    cfg["train"]["iterations_per_epoch"] = 12
    cfg["ssl"].update({"warmup_epochs": 4, "rampup_epochs": 2})
    sites = {s: load_datalist(p) for s, p in synthetic_sites.items()}
    data = {"training": sites["china"]["training"][:2],  # few labels
            "validation": sites["china"]["validation"] + sites["italy"]["validation"],
            "unlabeled": [c for s in sites.values() for c in s["unlabeled"]]}
    trainer = SegmentationTrainer(cfg, data)
    before = trainer.evaluate()["val_dice"]
    history = trainer.fit(10)["history"]
    assert history[-1]["unsup_loss"] > 0  # the unlabeled term was active after the warm-up
    final = history[-1]["val_dice"]
    assert final > FLOOR and final > before + 0.3, history
    test = [c for s in sites.values() for c in s["test"]]  # held-out scans of all three sites, unseen domains too
    assert trainer.evaluate(test)["val_dice"] > FLOOR
