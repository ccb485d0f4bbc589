"""Tail averaging: the final model is the average of the last epochs' (centralized) or rounds' (federated, on the
FLARE server) models; the last one alone is kept beside it."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import write_slice_site
from jobtools import SITES, customize_job, flare_env, run_simulator, write_site_configs
from fssl_covid.averaging import LAST_ROUND_MODEL, TailAverage, averaged_epochs
from fssl_covid.config import ConfigError, resolve_config
from fssl_covid.data import load_datalist
from fssl_covid.trainer import SegmentationTrainer


def test_tail_average_keeps_types_and_dtypes_and_averages_floats_only():
    avg = TailAverage()
    for i in range(3):
        avg.add({"w": torch.full((2,), float(i)), "h": torch.full((1,), i, dtype=torch.float16),
                 "steps": torch.tensor(i), "a": np.full((2,), i, dtype=np.float32)})
    out = avg.result()
    assert torch.equal(out["w"], torch.ones(2)) and out["h"].dtype == torch.float16 and float(out["h"]) == 1.0
    assert int(out["steps"]) == 2  # integer buffers: the last model's
    assert isinstance(out["a"], np.ndarray) and out["a"].dtype == np.float32 and np.allclose(out["a"], 1.0)
    with pytest.raises(ValueError, match="other parameter names"):
        avg.add({"w": torch.zeros(2)})
    with pytest.raises(ValueError, match="no models"):
        TailAverage().result()


def test_averaged_epochs_are_the_last_ones():
    assert list(averaged_epochs(10, 3)) == [7, 8, 9]
    assert list(averaged_epochs(4, 9)) == [0, 1, 2, 3] and list(averaged_epochs(5, 0)) == []
    with pytest.raises(ValueError):
        averaged_epochs(5, -1)
    with pytest.raises(ConfigError, match="average_last_epochs"):
        resolve_config({"train": {"average_last_epochs": -2}})


def test_fit_ends_on_the_average_of_the_last_epochs_models(tmp_path, tiny_2d):
    tiny_2d["train"].update({"epochs": 4, "average_last_epochs": 2, "seed": 1})
    data = load_datalist(write_slice_site(tmp_path, n_labeled=4, n_unlabeled=0))
    trainer = SegmentationTrainer(tiny_2d, {"training": data["training"], "validation": data["training"][:2]})
    snapshots = {}
    result = trainer.fit(on_epoch=lambda e, stats, metrics: snapshots.__setitem__(e, trainer.get_weights()))
    final = trainer.get_weights()
    assert result["averaged_epochs"] == 2
    for k, v in final.items():
        if v.is_floating_point():
            assert torch.allclose(v, (snapshots[3][k] + snapshots[4][k]) / 2, atol=1e-6), k
        assert torch.equal(trainer.last_weights[k], snapshots[4][k])
    assert any(not torch.equal(final[k], snapshots[4][k]) for k in final)
    assert result["final_val_dice"] == trainer.evaluate()["val_dice"]  # scored as it ends, averaged


def test_teacher_is_the_running_average_of_the_models_the_last_epochs_started_from(tmp_path, tiny_2d):
    """ssl.teacher_average_last_epochs 2 of 4: epochs 0-1 learn from the model they start from; epoch 2 from the
    model after epoch 2; epoch 3 from the mean of the models after epochs 2 and 3 (in FL: the received globals)."""
    tiny_2d["train"].update({"epochs": 4, "seed": 1})
    tiny_2d["ssl"].update({"teacher": "global", "warmup_epochs": 0, "rampup_epochs": 0,
                           "teacher_average_last_epochs": 2})
    data = load_datalist(write_slice_site(tmp_path, n_labeled=2, n_unlabeled=2))
    trainer = SegmentationTrainer(tiny_2d, data)
    teachers, objective = [], trainer.consistency

    def recording(student, teacher, u, autocast):
        teachers.append({k: v.detach().cpu().clone() for k, v in teacher.state_dict().items()})  # CUDA too
        return objective(student, teacher, u, autocast=autocast)

    trainer.consistency = recording
    starts = {}
    for e in range(4):
        starts[e] = trainer.get_weights()
        trainer.train_epochs(1, start_epoch=e, total_epochs=4)
    iters = tiny_2d["train"]["iterations_per_epoch"]
    assert len(teachers) == 4 * iters
    for e, expected in ((0, starts[0]), (1, starts[1]), (2, starts[2]),
                        (3, {k: (starts[2][k] + starts[3][k]) / 2 for k in starts[3]})):
        for teacher in teachers[e * iters:(e + 1) * iters]:
            for k, v in expected.items():
                assert torch.allclose(teacher[k], v, atol=1e-6), (e, k)
    assert any(not torch.allclose(teachers[-1][k], starts[3][k]) for k in starts[3])  # not the received model
    with pytest.raises(ConfigError, match="teacher_average_last_epochs"):
        resolve_config({"ssl": {"teacher_average_last_epochs": -1}})


def test_federated_final_model_is_the_average_of_the_last_rounds_global_models(tmp_path, synthetic_sites,
                                                                               tiny_3d):
    """Real FLARE simulator, 3 rounds, average of the last 2: the server's FL_global_model.pt (what cross-site
    evaluation scored and an admin downloads) is the mean of rounds 1 and 2; the last round's own is kept."""
    job = customize_job("fssl_covid_seg", tmp_path / "jobs", rounds=3, config=tiny_3d, average_last_rounds=2)
    shutil.copy(Path(__file__).with_name("capture_components.py"), job / "app" / "custom")
    server_file = job / "app" / "config" / "config_fed_server.json"
    server = json.loads(server_file.read_text())
    server["components"].append({"id": "save_globals", "path": "capture_components.SaveGlobalModels",
                                 "args": {"folder": str(tmp_path / "globals")}})
    server_file.write_text(json.dumps(server))
    env = flare_env(tmp_path, FSSL_SITE_CONFIGS=str(write_site_configs(tmp_path / "site_configs", synthetic_sites)))
    proc = run_simulator(job, tmp_path / "ws", SITES, env)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert "the average of the last 2 rounds' global models" in log
    app = tmp_path / "ws" / "server" / "simulate_job" / "app_server"
    final = torch.load(app / "FL_global_model.pt", weights_only=True)["model"]
    last = torch.load(app / LAST_ROUND_MODEL, weights_only=True)["model"]
    rounds = [np.load(tmp_path / "globals" / f"round{r}.npz") for r in range(3)]
    for k in final:
        assert np.allclose(final[k].numpy(), (rounds[1][k] + rounds[2][k]) / 2, atol=1e-6), k
        assert np.array_equal(last[k].numpy(), rounds[2][k]), k
    assert any(not np.allclose(final[k].numpy(), rounds[2][k]) for k in final)
    cross = json.loads(next((tmp_path / "ws" / "server").rglob("cross_val_results.json")).read_text())
    assert all(cross[site]["SRV_FL_global_model.pt"]["val_dice"] is not None for site in ("china", "italy"))
