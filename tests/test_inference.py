"""Predictions mapped back onto each input's own grid: the resampling against MONAI's and PyTorch's own."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd
from torch.nn.functional import interpolate

from fssl_covid.cli import main as fssl
from fssl_covid.config import resolve_config
from fssl_covid.data import DataError, load_datalist, loading, preprocessing
from fssl_covid.inference import GridPredictor, predict_files, resample_to_grid
from fssl_covid.trainer import SegmentationTrainer, save_checkpoint


def _smooth_map(shape: tuple, seed: int = 0) -> torch.Tensor:
    """A (1, *shape) map with structure along every axis and some noise, so that misplaced samples show."""
    axes = torch.meshgrid(*[torch.linspace(0, 3, n) for n in shape], indexing="ij")
    noise = torch.rand(1, *shape, generator=torch.Generator().manual_seed(seed))
    return (torch.cos(sum((k + 1) * a for k, a in enumerate(axes)))[None] + 0.3 * noise).float()


@pytest.mark.parametrize("max_voxels", [1 << 22, 97 * 83 * 3, 97 * 83])
def test_3d_maps_go_back_to_the_scan_grid_as_monai_invertd_takes_them_slab_by_slab(tmp_path, tiny_3d, max_voxels):
    """An oblique scan in LPS with anisotropic voxels: reoriented and resampled by the preprocessing, a map on the
    network's grid comes back onto the scan's grid as MONAI's Invertd brings it (the whole volume at once), whatever
    the slab size (all planes; 3 planes, not dividing the 41; one plane)."""
    rng = np.random.default_rng(0)
    affine = np.array([[-0.7, 0.02, 0, 30], [0.01, -0.75, 0, -20], [0, 0, 2.5, 7], [0, 0, 0, 1]])
    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(rng.normal(-600, 200, size=(97, 83, 41)).astype(np.int16), affine), str(path))
    cfg = resolve_config({**tiny_3d, "data": {**tiny_3d["data"], "spacing": [3.0, 3.0, 4.0], "orientation": "RAS"}})
    pre = Compose(preprocessing(cfg, ("image",), pad=False))
    data = pre({"image": str(path)})
    x = data["image"]
    assert x.shape[1:] != (97, 83, 41)  # the preprocessing did resample
    values = _smooth_map(tuple(x.shape[1:]))
    data["pred"] = MetaTensor(values, meta=x.meta, applied_operations=x.applied_operations)
    expected = Invertd(keys="pred", transform=pre, orig_keys="image", nearest_interp=False, to_tensor=True)(data)
    got = resample_to_grid(values, x.affine, torch.as_tensor(affine), (97, 83, 41), max_voxels=max_voxels)
    assert got.shape == (1, 97, 83, 41) and got.dtype == torch.float32
    assert torch.allclose(got, expected["pred"].as_tensor().float(), atol=1e-5)


def test_2d_maps_go_back_to_the_slice_size_as_bilinear_interpolation_takes_them(tmp_path, tiny_2d):
    """A slice resized to the network's input comes back to its own size as PyTorch's bilinear interpolation
    (voxels as squares) brings it, not as the preprocessing's area resize would (blocks of repeated pixels)."""
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(1).integers(0, 255, (150, 97, 1)).astype(np.uint8),
                             np.diag([0.8, 0.8, 1.0, 1.0])), str(path))
    cfg = resolve_config(tiny_2d)
    image = Compose(loading(("image",), 2))({"image": str(path)})["image"]
    x = Compose(preprocessing(cfg, ("image",), pad=False))({"image": str(path)})["image"]
    assert tuple(x.shape[1:]) == (64, 64) and tuple(image.shape[1:]) == (150, 97)
    values = _smooth_map((64, 64))
    got = resample_to_grid(values, x.affine, image.affine, (150, 97))
    expected = interpolate(values[None], size=(150, 97), mode="bilinear", align_corners=False)[0]
    assert torch.allclose(got, expected, atol=1e-4)


def test_the_probability_on_the_networks_own_grid_is_the_softmax_of_its_lesion_class(tmp_path, tiny_2d):
    """A slice already of the network's input size is not resampled: the predictor's probability (the sigmoid of
    the lesion's log-odds it resamples) is the softmax's lesion channel of the model's own output."""
    path = tmp_path / "slice.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(2).integers(0, 255, (64, 64, 1)).astype(np.uint8),
                             np.eye(4)), str(path))
    trainer = SegmentationTrainer(resolve_config(tiny_2d), {}, device="cpu")
    prob = GridPredictor(trainer)(path, (64, 64, 1))
    x = Compose(preprocessing(trainer.cfg, ("image",), pad=False))({"image": str(path)})["image"]
    expected = torch.softmax(trainer.predict_logits(x.unsqueeze(0)), dim=1)[0, 1].numpy()
    assert prob.shape == (64, 64, 1) and prob.dtype == np.float32
    assert np.allclose(prob[..., 0], expected, atol=1e-5) and 0.01 < expected.std()


def test_one_bad_scan_is_named_and_skipped_and_every_other_scan_is_predicted(tmp_path, synthetic_sites, tiny_3d,
                                                                              capsys):
    """`fssl predict` on a folder with a corrupt file (bytes that are not gzip, named .nii.gz) and a truncated one
    among good scans: the good scans' masks are written, each bad file is named with its problem, the exit status
    says something failed; called without a handler, `predict_files` raises naming the file."""
    trainer = SegmentationTrainer(resolve_config(tiny_3d), {}, device="cpu")
    save_checkpoint(tmp_path / "model.pt", trainer.get_weights(), trainer.cfg)
    scans = tmp_path / "scans"
    scans.mkdir()
    good = [c["image"] for c in load_datalist(synthetic_sites["china"])["training"][:2]]
    shutil.copy(good[0], scans / "a.nii.gz")
    (scans / "b.nii.gz").write_bytes(b"not a scan")
    data = (scans / "a.nii.gz").read_bytes()
    (scans / "c.nii.gz").write_bytes(data[: len(data) // 2])  # cut off mid-transfer
    shutil.copy(good[1], scans / "d.nii.gz")
    capsys.readouterr()
    assert fssl(["predict", "--model", str(tmp_path / "model.pt"), "--input", str(scans), "--out",
                 str(tmp_path / "out"), "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    out, err = captured.out, captured.err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.nii.gz", "d.nii.gz"]
    assert f"[1/4] {scans / 'a.nii.gz'} -> {tmp_path / 'out' / 'a.nii.gz'}" in out  # progress, input by input
    assert f"[4/4] {scans / 'd.nii.gz'} -> " in out and "[2/4] error: " in err
    for name in ("a", "d"):
        assert nib.load(tmp_path / "out" / f"{name}.nii.gz").shape == nib.load(scans / f"{name}.nii.gz").shape
    assert f"{scans / 'b.nii.gz'}: not gzip-compressed" in err
    assert f"{scans / 'c.nii.gz'}: " in err and "truncated" in err
    assert "2 of 4 inputs could not be predicted" in err
    with pytest.raises(DataError, match="b.nii.gz: not gzip-compressed"):
        predict_files(trainer, [scans / "b.nii.gz"], tmp_path / "strict")


def test_evaluate_stops_at_an_unreadable_scan_naming_it_and_its_problem(tmp_path, synthetic_sites, tiny_3d, capsys):
    """A score over part of a test set would mislead, so `fssl evaluate` stops — with validate-data's diagnosis of
    the file, not only the reader's exception, even where MONAI's transforms wrap it."""
    trainer = SegmentationTrainer(resolve_config(tiny_3d), {}, device="cpu")
    save_checkpoint(tmp_path / "model.pt", trainer.get_weights(), trainer.cfg)
    good = load_datalist(synthetic_sites["china"])["test"][0]
    (tmp_path / "bad.nii.gz").write_bytes(b"not a scan")
    for case in ({"image": str(tmp_path / "bad.nii.gz"), "label": good["label"]},
                 {"image": good["image"], "label": str(tmp_path / "bad.nii.gz")}):
        (tmp_path / "dl.json").write_text(json.dumps({"test": [good, case]}))
        capsys.readouterr()
        assert fssl(["evaluate", "--model", str(tmp_path / "model.pt"), "--datalist", str(tmp_path / "dl.json"),
                     "--key", "test", "--device", "cpu"]) == 2
        assert f"error: {tmp_path / 'bad.nii.gz'}: not gzip-compressed" in capsys.readouterr().err
