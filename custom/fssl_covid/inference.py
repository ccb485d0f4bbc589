"""Inference: lesion masks or probabilities written on the input's own grid.

Each input image is preprocessed exactly as in training (orientation, spacing, window, resize), segmented
(sliding windows in 3D), and the lesion probability is mapped back with MONAI's ``Invertd`` so that the output
NIfTI has the same shape and affine as the input file and the same file name, in the output folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

from .data import DataError, preprocessing


class GridPredictor:
    """The lesion probability of an image file on the file's own grid (its shape, without resampling): preprocessed
    as in training, segmented, mapped back with ``Invertd``.  The protocol of Fan et al. (2020): a prediction is
    scored against the mask as it was drawn, not against a resized copy."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.pre = Compose(preprocessing(trainer.cfg, ("image",), pad=False))
        self.invert = Invertd(keys="pred", transform=self.pre, orig_keys="image", nearest_interp=False,
                              to_tensor=True)

    def __call__(self, path: str | Path, shape: tuple) -> np.ndarray:
        """``shape``: the file's array shape (a 2D slice stored as (W, H, 1) gets its singleton axis back)."""
        data = self.pre({"image": str(path)})
        x = data["image"].unsqueeze(0).to(self.trainer.device)
        prob = torch.softmax(self.trainer.predict_logits(x), dim=1)[0, 1:2].cpu()
        data["pred"] = MetaTensor(prob, meta=data["image"].meta, applied_operations=data["image"].applied_operations)
        prob = self.invert(data)["pred"][0].detach().cpu().numpy().astype(np.float32)
        return _restore_shape(prob, shape, Path(path))


def predict_files(trainer, images: Iterable[str | Path], out_dir: str | Path, probabilities: bool = False,
                  threshold: float | None = None) -> list[Path]:
    """Segment ``images`` with ``trainer``'s model; returns the written paths.

    ``probabilities`` writes the lesion probability as float32; otherwise a 0/1 uint8 mask at ``threshold``
    (default ``inference.threshold`` of the configuration).
    """
    threshold = trainer.cfg["inference"]["threshold"] if threshold is None else threshold
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictor = GridPredictor(trainer)
    written = []
    for path in map(Path, images):
        src = nib.load(str(path))
        prob = predictor(path, src.shape)
        out = prob if probabilities else (prob >= threshold).astype(np.uint8)
        img = nib.Nifti1Image(out, src.affine, header=src.header.copy())
        img.set_data_dtype(np.float32 if probabilities else np.uint8)
        img.header.set_slope_inter(1.0, 0.0)
        target = out_dir / path.name
        nib.save(img, str(target))
        written.append(target)
    return written


def _restore_shape(prob: np.ndarray, shape: tuple, path: Path) -> np.ndarray:
    """Add back the singleton third axis of 2D slices; anything else must already match the input grid."""
    if prob.shape == tuple(shape):
        return prob
    if prob.ndim == len(shape) - 1 and prob.shape == tuple(shape[: prob.ndim]) and shape[-1] == 1:
        return prob[..., None]
    raise DataError(f"{path}: prediction shape {prob.shape} cannot be mapped back to the input shape {tuple(shape)}")


def threshold_averaged_dice(prob: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor,
                            n_thresholds: int = 256) -> float:
    """Dice averaged over ``n_thresholds`` evenly spaced thresholds of a probability map (the "mean Dice" of
    Inf-Net / Semi-Inf-Net, Fan et al. 2020).  An empty target with an empty prediction counts as 1."""
    p = torch.as_tensor(prob, dtype=torch.float32).flatten()
    t = torch.as_tensor(target).flatten() > 0.5
    thresholds = torch.linspace(0.0, 1.0, n_thresholds)
    pred = p[None, :] > thresholds[:, None]  # (T, N)
    inter = (pred & t[None, :]).sum(1).float()
    denom = pred.sum(1).float() + t.sum().float()
    dice = torch.where(denom > 0, 2.0 * inter / denom.clamp(min=1), torch.ones_like(denom))
    return float(dice.mean())


def dice_at(prob, target, threshold: float = 0.5) -> float:
    p = np.asarray(prob) >= threshold
    t = np.asarray(target) > 0.5
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2.0 * (p & t).sum() / denom)
