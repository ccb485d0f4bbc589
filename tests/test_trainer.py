"""Local trainer: label-only and unlabeled-only sites, counts, checkpoints, predict on the input grid."""

import functools
import json
import math
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_2D, write_slice_site
from fssl_covid.cli import main as fssl
from fssl_covid.config import ConfigError, resolve_config
from fssl_covid.data import load_datalist
from fssl_covid.inference import predict_files, threshold_averaged_dice
from fssl_covid.ssl import ConsistencyObjective
from fssl_covid.trainer import SegmentationTrainer, load_checkpoint, save_checkpoint


def test_site_with_labels_only_is_plain_supervised(synthetic_sites, tiny_3d):
    dl = load_datalist(synthetic_sites["china"])
    dl["unlabeled"] = []
    tr = SegmentationTrainer(tiny_3d, dl)
    res = tr.run_round(None, round_index=3, total_rounds=4)  # past warm-up: would use unlabeled data if any
    assert res.n_labeled == 4 and res.n_unlabeled == 0
    assert res.unlabeled_samples_seen == 0 and res.labeled_samples_seen == 3 * 2 * 2
    assert res.losses["unsup_loss"] == 0.0 and res.metrics_before is not None and res.metrics_after is not None


def test_pseudo_label_balancing_follows_the_sites_label_scarcity(synthetic_sites, tiny_3d):
    """ssl.class_balanced "auto" (the default): on where a site's unlabeled cases are at least
    ssl.class_balanced_min_ratio (3) times its labeled ones, or it has no labels; counted over usable cases."""
    dl = load_datalist(synthetic_sites["china"])
    assert 0 < len(dl["unlabeled"]) < 3 * len(dl["training"])  # the fixture's china: labels are not scarce
    assert SegmentationTrainer(tiny_3d, dl).class_balanced is False
    assert SegmentationTrainer(tiny_3d, {**dl, "training": dl["training"][:1]}).class_balanced is True
    japan = load_datalist(synthetic_sites["japan"])
    assert SegmentationTrainer(tiny_3d, japan).class_balanced is True  # no labels at all
    tiny_3d["ssl"]["class_balanced_min_ratio"] = 0.5
    assert SegmentationTrainer(tiny_3d, dl).class_balanced is True
    tiny_3d["ssl"]["class_balanced"] = False  # an explicit setting wins
    assert SegmentationTrainer(tiny_3d, japan).class_balanced is False
    with pytest.raises(ValueError, match="case counts"):  # "auto" cannot be resolved without the site's data
        ConsistencyObjective(resolve_config({})["ssl"])
    with pytest.raises(ConfigError, match="class_balanced"):
        resolve_config({"ssl": {"class_balanced": "yes"}})
    with pytest.raises(ConfigError, match="class_balanced"):
        resolve_config({"ssl": {"class_balanced": 1}})


def test_site_without_labels_trains_on_the_unsupervised_term_only(synthetic_sites, tiny_3d):
    # an untrained teacher is rarely 90 % sure of anything (less so averaged over flips): every voxel counts here
    tiny_3d["ssl"]["confidence_threshold"] = 0.0
    dl = load_datalist(synthetic_sites["japan"])
    tr = SegmentationTrainer(tiny_3d, dl)
    w0 = tr.get_weights()
    warm = tr.run_round(None, round_index=0, total_rounds=4)  # warm-up: lambda = 0, nothing to learn from
    assert warm.iterations == 0 and warm.n_labeled == 0 and warm.n_unlabeled == 0
    assert all(torch.equal(w0[k], warm.weights[k]) for k in w0)
    assert warm.metrics_before is None  # no labeled validation data: no (fake) metric
    res = tr.run_round(None, round_index=3, total_rounds=4)
    assert res.iterations == 3 and res.n_unlabeled == 4 and res.labeled_samples_seen == 0
    assert res.unlabeled_samples_seen == 3 * 2 * 2 and res.losses["sup_loss"] == 0.0
    assert any(not torch.equal(w0[k], res.weights[k]) for k in w0 if w0[k].dtype.is_floating_point)


def test_final_supervised_epochs_switch_the_unlabeled_term_off_at_the_end(synthetic_sites, tiny_3d):
    """ssl.final_supervised_epochs: in the last rounds an unlabeled-only site trains nothing and sends weight 0 (its
    model unchanged), a labeled site trains supervised only; before them both use the unlabeled term."""
    tiny_3d["ssl"].update({"confidence_threshold": 0.0, "final_supervised_epochs": 1})  # epochs per round: 1
    japan = SegmentationTrainer(tiny_3d, load_datalist(synthetic_sites["japan"]))
    w0 = japan.get_weights()
    assert japan.run_round(None, round_index=2, total_rounds=4).n_unlabeled == 4  # past warm-up, before the end
    japan.set_weights(w0)
    last = japan.run_round(None, round_index=3, total_rounds=4)
    assert last.iterations == 0 and last.n_unlabeled == 0 and last.unlabeled_samples_seen == 0
    assert all(torch.equal(w0[k], last.weights[k]) for k in w0)
    china = SegmentationTrainer(tiny_3d, load_datalist(synthetic_sites["china"]))
    assert china.run_round(None, round_index=2, total_rounds=4).unlabeled_samples_seen > 0
    last = china.run_round(None, round_index=3, total_rounds=4)
    assert last.unlabeled_samples_seen == 0 and last.labeled_samples_seen > 0 and last.losses["unsup_loss"] == 0.0


def _update_norm(before: dict, after: dict) -> float:
    return sum(float((after[k].float() - before[k].float()).pow(2).sum()) for k in before) ** 0.5


@pytest.mark.parametrize("site", ["japan", "china"])
def test_unlabeled_only_lr_scale_shrinks_only_the_unlabeled_only_sites_step(synthetic_sites, tiny_3d, site):
    """Adam's step does not shrink with the loss, so the unlabeled-only site's step is scaled by the lr instead."""
    dl = load_datalist(synthetic_sites[site])
    tiny_3d["ssl"]["confidence_threshold"] = 0.0  # an untrained teacher: let every voxel count
    norms = {}
    for scale in (1.0, 0.1, 0.0):
        tiny_3d["ssl"]["unlabeled_only_lr_scale"] = scale
        tr = SegmentationTrainer(tiny_3d, dl)  # same seed: same initial weights, same batches
        w0 = tr.get_weights()
        norms[scale] = _update_norm(w0, tr.run_round(None, round_index=3, total_rounds=4).weights)
    if site == "japan":
        assert norms[0.0] == 0.0 and 0.0 < norms[0.1] < 0.5 * norms[1.0], norms
    else:  # a site with labels trains at the configured learning rate whatever the scale
        assert norms[0.0] == norms[0.1] == norms[1.0] > 0.0, norms


def test_ema_teacher_and_abort(synthetic_sites, tiny_3d):
    tiny_3d["ssl"]["teacher"] = "ema"
    tr = SegmentationTrainer(tiny_3d, load_datalist(synthetic_sites["italy"]))
    res = tr.run_round(None, round_index=2, total_rounds=3)
    assert res.n_unlabeled == 4 and tr.ema_teacher is not None
    calls = iter(range(100))
    res = tr.run_round(None, round_index=2, total_rounds=3, abort=lambda: next(calls) >= 1)
    assert res.aborted and res.iterations == 1


def test_set_weights_refuses_wrong_shapes(synthetic_sites, tiny_3d):
    tr = SegmentationTrainer(tiny_3d, {})
    w = tr.get_weights()
    key = next(k for k in w if w[k].dim() > 1)
    bad = dict(w)
    bad[key] = torch.zeros(3)
    with pytest.raises(ValueError, match=key):
        tr.set_weights(bad)
    with pytest.raises(ValueError, match="missing"):
        tr.set_weights({k: v for k, v in w.items() if k != key})


def test_checkpoint_round_trip_and_predict_keeps_the_input_grid(tmp_path, synthetic_sites, tiny_3d):
    cfg_file = tmp_path / "cfg.json"
    tiny_3d["train"]["epochs"] = 1
    cfg_file.write_text(json.dumps(tiny_3d))
    out = tmp_path / "run"
    assert fssl(["train", "--datalist", synthetic_sites["china"], "--config", str(cfg_file), "--out", str(out)]) == 0
    state, cfg = load_checkpoint(out / "model_final.pt")
    tr = SegmentationTrainer(cfg, {})
    tr.set_weights(state)
    assert all(torch.equal(tr.get_weights()[k], state[k]) for k in state)
    history = json.loads((out / "history.json").read_text())
    assert len(history["history"]) == 1

    images = [c["image"] for c in load_datalist(synthetic_sites["japan"])["test"]]
    pred_dir = tmp_path / "pred"
    assert fssl(["predict", "--model", str(out / "model_final.pt"), "--input", *images, "--out", str(pred_dir),
                 "--probabilities"]) == 0
    for image in images:
        src, dst = nib.load(image), nib.load(pred_dir / image.split("/")[-1])
        assert dst.shape == src.shape and np.allclose(dst.affine, src.affine)
        p = dst.get_fdata()
        assert p.dtype == np.float64 and 0.0 <= p.min() and p.max() <= 1.0
    mask_dir = tmp_path / "mask"
    assert fssl(["predict", "--model", str(out / "model_final.pt"), "--input", images[0], "--out", str(mask_dir)]) == 0
    m = nib.load(mask_dir / images[0].split("/")[-1])
    assert m.get_data_dtype() == np.uint8 and set(np.unique(m.get_fdata())) <= {0.0, 1.0}
    assert json.loads(json.dumps(fssl(["evaluate", "--model", str(out / "model_final.pt"), "--datalist",
                                       synthetic_sites["china"], "--key", "test"]))) == 0


def test_predict_2d_slices_keeps_singleton_axis(tmp_path, tiny_2d):
    dl = load_datalist(write_slice_site(tmp_path / "site", 2, 1))
    tr = SegmentationTrainer(tiny_2d, dl)
    written = predict_files(tr, [c["image"] for c in dl["training"]], tmp_path / "out")
    for case, path in zip(dl["training"], written):
        src, dst = nib.load(case["image"]), nib.load(path)
        assert dst.shape == src.shape and src.shape[-1] == 1 and np.allclose(dst.affine, src.affine)


def test_a_2d_model_reads_pictures_as_it_reads_their_nifti_slices(tmp_path, tiny_2d, capsys):
    """COVID-SemiSeg's original release is pictures (JPEG slices, PNG masks): `fssl predict` and `fssl evaluate`
    take them with a 2D model and give what they give for the same slices as NIfTI, in the pictures' layout."""
    dl = load_datalist(write_slice_site(tmp_path / "site", 4, 0))
    tiny_2d["train"].update({"iterations_per_epoch": 20, "epochs": 3, "lr": 0.01})
    tr = SegmentationTrainer(tiny_2d, dl)
    tr.fit()
    model = tmp_path / "model.pt"
    save_checkpoint(model, tr.get_weights(), tr.cfg)
    pics, masks = tmp_path / "pics", tmp_path / "masks"
    pics.mkdir(), masks.mkdir()
    datalist = {"test": []}
    for i, case in enumerate(dl["training"]):
        gray = nib.load(case["image"]).get_fdata()[..., 0].astype(np.uint8).T  # stored (W, H); a picture is (H, W)
        picture = np.stack([gray] * 3, axis=-1) if i % 2 else gray  # colour and gray pictures of a gray slice
        Image.fromarray(picture).save(pics / f"slice{i}.png")
        Image.fromarray((nib.load(case["label"]).get_fdata()[..., 0].T * 255).astype(np.uint8)).save(
            masks / f"slice{i}.png")
        datalist["test"].append({"image": str(pics / f"slice{i}.png"), "label": str(masks / f"slice{i}.png")})
    (tmp_path / "pictures.json").write_text(json.dumps(datalist))
    nifti = predict_files(tr, [c["image"] for c in dl["training"]], tmp_path / "nifti", probabilities=True)
    assert fssl(["predict", "--model", str(model), "--input", str(pics), "--out", str(tmp_path / "p"),
                 "--probabilities", "--device", "cpu"]) == 0
    assert fssl(["predict", "--model", str(model), "--input", str(pics), "--out", str(tmp_path / "m"),
                 "--device", "cpu"]) == 0
    for i, path in enumerate(nifti):
        expected = nib.load(path).get_fdata()[..., 0].T  # (H, W), as the picture
        prob = np.asarray(Image.open(tmp_path / "p" / f"slice{i}.png"))
        mask = np.asarray(Image.open(tmp_path / "m" / f"slice{i}.png"))
        assert prob.dtype == mask.dtype == np.uint8 and prob.shape == mask.shape == expected.shape
        assert np.abs(prob.astype(float) - 255 * expected).max() <= 0.5 + 1e-3
        assert set(np.unique(mask)) <= {0, 255} and np.array_equal(mask == 255, expected >= 0.5)
        assert 0 < (mask == 255).sum() < mask.size  # a model that finds lesions, so the layout is tested
    jpeg = tmp_path / "jpeg"
    jpeg.mkdir()
    Image.open(pics / "slice1.png").save(jpeg / "slice1.jpg", quality=95)  # lossy: the same size, a PNG out
    assert fssl(["predict", "--model", str(model), "--input", str(jpeg), "--out", str(tmp_path / "j"),
                 "--device", "cpu"]) == 0
    assert np.asarray(Image.open(tmp_path / "j" / "slice1.png")).shape == Image.open(jpeg / "slice1.jpg").size[::-1]
    capsys.readouterr()
    scores = {}
    for name, args in (("nifti", [str(tmp_path / "site" / "datalist.json"), "--key", "training"]),
                       ("pictures", [str(tmp_path / "pictures.json"), "--key", "test"])):
        assert fssl(["evaluate", "--model", str(model), "--device", "cpu", "--datalist", *args]) == 0
        scores[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["pictures"]["n"] == 4 and scores["pictures"]["dice"] > 0.3
    assert scores["pictures"] == pytest.approx(scores["nifti"], abs=1e-6)


def test_a_3d_model_refuses_pictures_naming_the_file(tmp_path, synthetic_sites, tiny_3d, capsys):
    tr = SegmentationTrainer(tiny_3d, load_datalist(synthetic_sites["china"]))
    save_checkpoint(tmp_path / "model.pt", tr.get_weights(), tr.cfg)
    Image.fromarray(np.zeros((40, 30), np.uint8)).save(tmp_path / "slice.jpg")
    assert fssl(["predict", "--model", str(tmp_path / "model.pt"), "--input", str(tmp_path / "slice.jpg"),
                 "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    assert f"{tmp_path / 'slice.jpg'}: a picture needs a 2D model" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_site_config_command_writes_settings_and_refuses_bad_values(tmp_path, synthetic_sites):
    kit = tmp_path / "kit"
    (kit / "startup").mkdir(parents=True)
    assert fssl(["site-config", "--kit", str(kit), "--datalist", synthetic_sites["china"], "--num-threads", "1"]) == 0
    written = json.loads((kit / "local" / "fssl_site.json").read_text())
    assert written["datalist"] == synthetic_sites["china"] and written["num_threads"] == 1
    # refusals: missing datalist, non-existent datalist, not a kit, contradictory --from and options
    assert fssl(["site-config", "--kit", str(kit)]) == 2
    assert fssl(["site-config", "--kit", str(kit), "--datalist", str(tmp_path / "none.json")]) == 2
    assert fssl(["site-config", "--kit", str(tmp_path / "nokit"), "--datalist", synthetic_sites["china"]]) == 2
    src = tmp_path / "site_configs" / "china"
    (src / "local").mkdir(parents=True)
    (src / "local" / "fssl_site.json").write_text(json.dumps({"datalist": synthetic_sites["china"], "device": "cpu"}))
    assert fssl(["site-config", "--kit", str(kit), "--from", str(src), "--device", "cuda"]) == 2
    assert fssl(["site-config", "--kit", str(kit), "--from", str(src)]) == 0
    assert json.loads((kit / "local" / "fssl_site.json").read_text())["device"] == "cpu"
    # a refused command leaves the previous good settings in place
    assert fssl(["site-config", "--kit", str(kit), "--datalist", str(tmp_path / "none.json")]) == 2
    assert json.loads((kit / "local" / "fssl_site.json").read_text())["device"] == "cpu"


def test_loader_workers_give_the_same_kind_of_batches(synthetic_sites, tiny_3d):
    """data.num_workers > 0 (the GPU default) feeds the same loop: patch batches of the configured shape."""
    tiny_3d["data"]["num_workers"] = 2
    tr = SegmentationTrainer(tiny_3d, load_datalist(synthetic_sites["china"]))
    batch = next(tr._labeled_batches)
    assert tuple(batch["image"].shape) == (2 * 2, 1, 32, 32, 16) and batch["label"].shape == batch["image"].shape
    res = tr.run_round(None, round_index=0, total_rounds=1)
    assert res.labeled_samples_seen == 3 * 2 * 2 and res.metrics_after is not None


def _tta_mean(views: list[torch.Tensor], average: str) -> torch.Tensor:
    """The views' class probabilities averaged as inference.tta_average says."""
    if average == "logits":
        return torch.softmax(torch.stack([v.log() for v in views]).mean(0), dim=1)
    return torch.stack(views).mean(0)


@pytest.mark.parametrize("average", ["logits", "probabilities"])
@pytest.mark.parametrize("dims", [2, 3])
def test_flip_tta_averages_the_flipped_views(tiny_2d, tiny_3d, dims, average):
    """inference.flip_tta: the image and its flips along each axis; "logits" averages their logits (the softmax of
    the mean log-probability), "probabilities" their probabilities."""
    cfg = tiny_2d if dims == 2 else tiny_3d
    cfg["train"]["amp"] = False  # the arithmetic of the average is under test, not mixed precision's rounding
    cfg["inference"] = {"tta_average": average}
    tr = SegmentationTrainer(cfg, {})
    size = cfg["data"]["patch_size"]
    x = torch.rand(2, 1, *size, generator=torch.Generator().manual_seed(0))
    plain = torch.softmax(tr.predict_logits(x), dim=1)
    views = [plain] + [torch.flip(torch.softmax(tr.predict_logits(torch.flip(x, (a,))), dim=1), (a,))
                       for a in range(2, 2 + dims)]
    tr.cfg["inference"]["flip_tta"] = True
    tta = torch.softmax(tr.predict_logits(x), dim=1)
    assert tta.shape == plain.shape
    assert torch.allclose(tta, _tta_mean(views, average), atol=1e-5)
    other = _tta_mean(views, "probabilities" if average == "logits" else "logits")
    assert not torch.allclose(tta, other, atol=1e-4)  # the two averages differ, and the setting picks one
    assert not torch.allclose(tta, plain, atol=1e-4)  # the views do differ


@pytest.mark.parametrize("average", ["logits", "probabilities"])
@pytest.mark.parametrize("dims", [2, 3])
def test_scale_tta_averages_the_resized_views(tiny_2d, tiny_3d, dims, average):
    """inference.scale_tta: the image is also predicted resized by each factor — a whole 2D image to the nearest
    multiple of the U-Net's total stride (4 here: 57.6 -> 56, 83.2 -> 84; 58 would break its skip connections), a
    3D scan to the rounded size (sliding windows pad) — and each probability map, resized back, is averaged with
    the input size's as inference.tta_average says."""
    cfg = tiny_2d if dims == 2 else tiny_3d
    cfg["train"]["amp"] = False
    cfg["inference"] = {"scale_tta": [0.9, 1.3], "tta_average": average}
    tr = SegmentationTrainer(cfg, {})
    size = cfg["data"]["patch_size"]
    x = torch.rand(2, 1, *size, generator=torch.Generator().manual_seed(0))
    interp = functools.partial(torch.nn.functional.interpolate, mode="bilinear" if dims == 2 else "trilinear",
                               align_corners=False)
    plain = torch.softmax(tr._forward(x), dim=1)
    sizes = {2: ([56, 56], [84, 84]), 3: ([29, 29, 14], [42, 42, 21])}[dims]
    views = [plain] + [interp(torch.softmax(tr._forward(interp(x, size=s)), dim=1), size=size) for s in sizes]
    tta = torch.softmax(tr.predict_logits(x), dim=1)
    assert tta.shape == plain.shape
    assert torch.allclose(tta, _tta_mean(views, average), atol=1e-5)
    assert not torch.allclose(tta, plain, atol=1e-4)  # the views do differ
    for key, bad in [("scale_tta", v) for v in ([0.0], [1.0], [-0.5], 0.9, ["0.9"])] + [("tta_average", "mean")]:
        cfg["inference"] = {key: bad}
        with pytest.raises(ConfigError, match=key):
            SegmentationTrainer(cfg, {})


def test_validation_tta_off_reads_the_validation_with_one_forward(tmp_path, tiny_2d):
    """train.validation_tta false: the per-epoch / per-round validation reads the model with one forward per batch
    while inference keeps its flips and scales (9 views here); true reads it with the inference's TTA."""
    dl = load_datalist(write_slice_site(tmp_path / "site", n_labeled=4, n_unlabeled=0))
    dl["validation"] = dl["training"][:2]
    tiny_2d["train"]["amp"] = False
    tiny_2d["inference"] = {"flip_tta": True, "scale_tta": [0.9, 1.3]}
    readings = {}
    for tta in (True, False):
        tiny_2d["train"]["validation_tta"] = tta
        tr = SegmentationTrainer(tiny_2d, dl)
        forwards = []
        hook = tr.model.register_forward_hook(lambda *_: forwards.append(1))
        batches = sum(1 for _ in tr._validation_loader)
        readings[tta] = tr.evaluate()["val_dice"]
        hook.remove()
        assert len(forwards) == batches * (9 if tta else 1)
    tr.cfg["inference"] = {**tr.cfg["inference"], "flip_tta": False, "scale_tta": []}
    assert tr.evaluate()["val_dice"] == pytest.approx(readings[False])  # the one forward is the plain reading
    tiny_2d["train"]["validation_tta"] = "no"
    with pytest.raises(ConfigError, match="validation_tta"):
        SegmentationTrainer(tiny_2d, dl)


def test_dice_batch_off_averages_each_images_dice(tiny_2d):
    """train.dice_batch false: the Dice term is the mean of each image's Dice loss (a small lesion counts as much
    as a large one), not one Dice over the batch; the cross-entropy is the same either way."""
    from monai.losses import DiceLoss

    from fssl_covid.config import ConfigError
    from fssl_covid.trainer import supervised_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 2, 16, 16)
    labels = torch.zeros(2, 1, 16, 16)
    labels[0, :, 2:14, 2:14] = 1  # a large lesion
    labels[1, :, 5:7, 5:7] = 1  # a small one
    per_image = [DiceLoss(to_onehot_y=True, softmax=True, include_background=False)(logits[i:i + 1], labels[i:i + 1])
                 for i in range(2)]
    ce = torch.nn.functional.cross_entropy(logits, labels[:, 0].long(), weight=torch.tensor([1.0, 3.0]))
    off = supervised_loss(3.0, dice_batch=False)(logits, labels)
    assert off.item() == pytest.approx((sum(per_image) / 2 + ce).item(), rel=1e-5)
    assert abs(off.item() - supervised_loss(3.0)(logits, labels).item()) > 0.01
    trainer = SegmentationTrainer({**tiny_2d, "train": {**tiny_2d["train"], "dice_batch": False}}, {})
    assert trainer.sup_loss.loss.dice.batch is False
    tiny_2d["train"]["dice_batch"] = "no"
    with pytest.raises(ConfigError, match="dice_batch"):
        SegmentationTrainer(tiny_2d, {})


def test_lesion_ce_weight_reweights_only_the_cross_entropy(tiny_2d):
    """supervised_loss(w) = lesion Dice (unscaled) + cross-entropy with class weights [1, w]; w = 1 is plain
    DiceCE; a weight that is not positive is refused."""
    from monai.losses import DiceLoss

    from fssl_covid.config import ConfigError
    from fssl_covid.trainer import supervised_loss

    torch.manual_seed(0)
    logits = torch.randn(2, 2, 16, 16)
    labels = (torch.rand(2, 1, 16, 16) > 0.8).float()
    dice = DiceLoss(to_onehot_y=True, softmax=True, include_background=False, batch=True)(logits, labels)
    for w in (1.0, 3.0):
        ce = torch.nn.functional.cross_entropy(logits, labels[:, 0].long(), weight=torch.tensor([1.0, w]))
        assert supervised_loss(w)(logits, labels).item() == pytest.approx((dice + ce).item(), rel=1e-5)
    # with the weight, missing lesion pixels costs more than calling as many background pixels lesion
    def prediction(lesion: torch.Tensor) -> torch.Tensor:  # confident two-class logits of a 0/1 mask
        return torch.cat([1.0 - 2.0 * lesion, 2.0 * lesion - 1.0], dim=1) * 3.0

    lesion = labels.bool()
    missed = lesion & (torch.rand(lesion.shape) < 0.5)
    extra = torch.zeros_like(lesion).flatten()
    extra[torch.nonzero(~lesion.flatten())[: int(missed.sum())]] = True
    under, over = prediction((lesion & ~missed).float()), prediction((lesion | extra.view_as(lesion)).float())
    plain, weighted = supervised_loss(1.0), supervised_loss(3.0)
    assert weighted(under, labels) - weighted(over, labels) > plain(under, labels) - plain(over, labels) + 0.05
    tiny_2d["train"]["lesion_ce_weight"] = 0
    with pytest.raises(ConfigError, match="lesion_ce_weight"):
        SegmentationTrainer(tiny_2d, {})


def test_a_diverging_run_skips_nonfinite_steps_then_stops_with_a_clear_error(tmp_path, tiny_2d):
    """NaN losses (float16 overflow on a GPU, or a learning rate far too high) must neither reach the weights nor
    let training run on for hours producing an empty-mask model: each such step is skipped, and
    ``train.max_nonfinite_steps`` of them in a row end the training with TrainingDiverged."""
    from fssl_covid.config import ConfigError, resolve_config
    from fssl_covid.trainer import TrainingDiverged

    for bad in ({"amp_dtype": "fp8"}, {"max_nonfinite_steps": 0}):
        with pytest.raises(ConfigError, match=f"train.{next(iter(bad))}"):
            resolve_config({**tiny_2d, "train": {**tiny_2d["train"], **bad}})
    tiny_2d["train"].update({"lr": 1e30, "scheduler": "constant", "max_nonfinite_steps": 3, "epochs": 1,
                             "iterations_per_epoch": 30, "augment": {}})
    tr = SegmentationTrainer(tiny_2d, load_datalist(write_slice_site(tmp_path, n_labeled=4, n_unlabeled=0)))
    with pytest.raises(TrainingDiverged, match=r"NaN or infinite for 3 iterations in a row .*(float32|autocast \w+), lr 1e\+30"):
        tr.train_epochs(1)
    assert tr._nonfinite_steps == 3
    assert all(torch.isfinite(w).all() for w in tr.get_weights().values() if w.dtype.is_floating_point)


def _mean_dice_threshold_by_threshold(prob: np.ndarray, target: np.ndarray) -> float:
    """The definition, one threshold at a time (Fan et al.: 256 thresholds of the probability map)."""
    target = target > 0.5
    dice = []
    for threshold in torch.linspace(0.0, 1.0, 256).numpy():  # float32, as rounded by torch
        pred = prob > threshold  # NaN is never above a threshold
        denom = pred.sum() + target.sum()
        dice.append(1.0 if denom == 0 else 2.0 * (pred & target).sum() / denom)
    return float(np.mean(dice))


def test_mean_dice_is_the_threshold_by_threshold_definition():
    """Counting voxels by the thresholds below them gives each threshold's Dice exactly: probabilities on a
    threshold, NaN, an empty target, an empty prediction, any chunk size."""
    rng = np.random.default_rng(0)
    for i in range(60):
        n = int(rng.integers(1, 3000))
        prob = rng.random(n).astype(np.float32)
        if i % 3 == 0:
            prob = (rng.integers(0, 256, n) / 255).astype(np.float32)  # exactly on the thresholds
        if i % 5 == 0:
            prob[: n // 3] = np.nan
        if i % 7 == 0:
            prob[:] = 0.0
        target = rng.random(n) < (0.0 if i % 4 == 0 else rng.random())
        got = threshold_averaged_dice(prob, target, chunk=int(rng.integers(1, 1000)))
        assert got == pytest.approx(_mean_dice_threshold_by_threshold(prob, target), abs=1e-6), i


CT_VOLUME = """
import resource, sys
import numpy as np, torch
from fssl_covid.inference import threshold_averaged_dice
resource.setrlimit(resource.RLIMIT_AS, (int(sys.argv[1]) << 30,) * 2)
target = np.zeros((512, 512, 128), dtype=bool)
target[:, :256] = True
prob = target.astype(np.float32)  # 1 on the lesion, 0 elsewhere: right at every threshold but the last (p > 1)
print(threshold_averaged_dice(prob, target))
"""


def test_mean_dice_of_a_ct_volume_needs_memory_of_the_volume_only():
    """`fssl evaluate` and a site's cross-site validation score whole CT volumes: a 512 x 512 x 128 volume under a
    3 GB address-space limit (a (thresholds x voxels) mask needs 8.6 GB for it and failed here)."""
    proc = subprocess.run([sys.executable, "-c", CT_VOLUME, "3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout) == pytest.approx(255 / 256, abs=1e-6)


def test_deep_supervision_trains_every_head_and_predicts_with_the_main_one(tmp_path, tiny_2d):
    """network "dynunet" with deep_supervision 1: while training the network gives its full-size main head and one
    coarser head (resized to the input), and the supervised loss weights them 2/3 and 1/3; evaluating, the main head
    alone.  A model that has trained deep-copies (the SSL teacher is a copy), and the SSL student is read by its
    main head.  Deep supervision on another network, or more heads than levels, is refused."""
    import copy

    from fssl_covid.networks import build_network, main_output, output_heads
    from fssl_covid.trainer import supervised_loss

    tiny_2d["network"] = {**tiny_2d["network"], "name": "dynunet", "deep_supervision": 1}
    torch.manual_seed(0)
    model = build_network(**tiny_2d["network"]).train()
    x, y = torch.randn(2, 1, 64, 64), (torch.rand(2, 1, 64, 64) > 0.8).float()
    out = model(x)
    assert out.shape == (2, 2, 2, 64, 64)
    heads = output_heads(out, x)
    assert len(heads) == 2 and torch.equal(main_output(out, x), heads[0])
    plain = supervised_loss(3.0)
    assert supervised_loss(3.0, deep_supervision=1)(heads, y).item() == pytest.approx(
        (2 / 3 * plain(heads[0], y) + 1 / 3 * plain(heads[1], y)).item(), rel=1e-5)
    assert plain([heads[0]], y).item() == plain(heads[0], y).item()  # one head: plain Dice + CE, as before
    twin = copy.deepcopy(model).eval()
    assert twin(x).shape == (2, 2, 64, 64) and torch.equal(twin(x), model.eval()(x))

    dl = load_datalist(write_slice_site(tmp_path / "site", n_labeled=4, n_unlabeled=4))
    dl["validation"] = dl["training"][:2]
    tiny_2d["ssl"]["confidence_threshold"] = 0.0  # every pixel counts: the student's term cannot be empty
    tr = SegmentationTrainer(tiny_2d, dl)
    res = tr.run_round(None, round_index=1, total_rounds=2)
    assert res.labeled_samples_seen > 0 and res.unlabeled_samples_seen > 0
    assert math.isfinite(res.losses["sup_loss"]) and res.losses["unsup_loss"] > 0
    assert 0.0 <= res.metrics_after["val_dice"] <= 1.0
    for bad in ({"deep_supervision": 1}, {"name": "dynunet", "deep_supervision": 2}, {"deep_supervision": -1}):
        with pytest.raises(ConfigError, match="deep_supervision"):
            resolve_config({"data": TINY_2D["data"], "network": {**TINY_2D["network"], **bad}})
