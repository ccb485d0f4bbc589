"""Inference: lesion masks or probabilities written on the input's own grid, and scores computed the same way.

Each input image is preprocessed exactly as in training (orientation, spacing, window, resize), segmented
(sliding windows in 3D), and the lesion log-odds are resampled back onto the input's grid (``resample_to_grid``) so
that the output has the same shape as the input file and the same name, in the output folder: a NIfTI with the
input's affine for NIfTI inputs; for a 2D picture (PNG, JPEG, BMP, TIFF: the format of COVID-SemiSeg's original
release) a PNG, the mask 0/255 and the probability in 8 bits (round(255 p), as Inf-Net writes its maps).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Iterable, Mapping

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import to_affine_nd
from monai.transforms import Compose, SpatialResample
from PIL import Image

from .data import RESAMPLING, DataError, innermost, loading, preparation
from .validation import check_case, data_expectations

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def is_picture(path: str | Path) -> bool:
    return Path(path).suffix.lower() in PICTURE_SUFFIXES


class GridPredictor:
    """The lesion probability of an image file on the file's own grid (its shape and affine): preprocessed as in
    training, segmented, its lesion log-odds resampled back (``resample_to_grid``).  The protocol of Fan et al.
    (2020): a prediction is scored against the mask as it was drawn, not against a resized copy."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.load = Compose(loading(("image",), trainer.cfg["data"]["spatial_dims"]))
        self.prepare = Compose(preparation(trainer.cfg, ("image",), pad=False))

    def __call__(self, path: str | Path, shape: tuple | None = None) -> np.ndarray:
        """``shape``: the file's array shape (a 2D slice stored as (W, H, 1) gets its singleton axis back); None:
        the grid as read (a picture's (W, H))."""
        image = self.load({"image": str(path)})["image"]
        grid_affine, grid_shape = image.affine, tuple(image.shape[1:])
        x = self.prepare({"image": image})["image"]
        del image  # the scan as read: only its grid is needed from here on
        logits = self.trainer.predict_logits(x.unsqueeze(0))[0].float().cpu()
        # the lesion's log-odds against the other classes: resampled, they give sharper outlines than the
        # probability does (docs/experiments.md, twenty-seventh session); its sigmoid is the softmax's lesion class
        log_odds = logits[1:2] - torch.logsumexp(torch.cat([logits[:1], logits[2:]]), dim=0, keepdim=True)
        prob = resample_to_grid(log_odds, x.affine, grid_affine, grid_shape).sigmoid_()[0].numpy()
        return prob if shape is None else _restore_shape(prob, shape, Path(path))


def resample_to_grid(values: torch.Tensor, src_affine: torch.Tensor, dst_affine: torch.Tensor, shape: tuple,
                     max_voxels: int = 1 << 22) -> torch.Tensor:
    """Channel-first ``values`` on the grid of ``src_affine`` resampled linearly onto the grid of ``dst_affine`` and
    spatial ``shape`` (float32), as the preprocessing resamples (``data.RESAMPLING``), with MONAI's
    ``SpatialResample``: what ``Invertd`` does through the preprocessing's inverses, in one step, and in slabs of
    the last axis of at most ``max_voxels`` voxels each — MONAI samples a whole grid at once, 3 coordinates a
    voxel, which for a 512 x 512 x 300 scan is 0.9 GB."""
    dims = len(shape)
    values = values.as_tensor() if isinstance(values, MetaTensor) else values
    src = MetaTensor(values.float(), affine=to_affine_nd(dims, src_affine))
    dst_affine = to_affine_nd(dims, torch.as_tensor(dst_affine, dtype=torch.float64))
    resample = SpatialResample(mode="bilinear", dtype=torch.float32, **RESAMPLING)
    out = torch.empty((values.shape[0], *shape), dtype=torch.float32)
    step = max(1, max_voxels // math.prod(shape[:-1]))
    for start in range(0, shape[-1], step):
        n = min(step, shape[-1] - start)
        offset = torch.eye(dims + 1, dtype=torch.float64)
        offset[dims - 1, dims] = start  # the slab's first plane as the grid's origin
        with resample.trace_transform(False):
            out[..., start:start + n] = torch.as_tensor(resample(src, dst_affine=dst_affine @ offset,
                                                                 spatial_size=(*shape[:-1], n)))
    return out


def predict_files(trainer, images: Iterable[str | Path], out_dir: str | Path, probabilities: bool = False,
                  threshold: float | None = None, on_error: Callable[[Path, str], None] | None = None,
                  on_written: Callable[[Path, Path], None] | None = None) -> list[Path]:
    """Segment ``images`` with ``trainer``'s model; returns the written paths.

    ``probabilities`` writes the lesion probability (float32 NIfTI; 8-bit PNG for a picture); otherwise a mask at
    ``threshold`` (default ``inference.threshold`` of the configuration): 0/1 uint8 NIfTI, 0/255 PNG.  An input that
    cannot be predicted raises ``DataError`` naming it and the problem; with ``on_error`` it is reported there
    instead (the input, the message) and the other inputs are still predicted.  ``on_written`` hears of each
    output as it is written (the input, the output).
    """
    threshold = trainer.cfg["inference"]["threshold"] if threshold is None else threshold
    images = [Path(p) for p in images]
    pictures = [p for p in images if is_picture(p)]
    if pictures and trainer.cfg["data"]["spatial_dims"] != 2:
        raise DataError(f"{pictures[0]}: a picture needs a 2D model; this checkpoint's model is 3D")
    names = [_output_name(p) for p in images]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise DataError(f"two inputs would write the same output file {clash[0]} (e.g. a.png and a.jpg): "
                        "predict them into separate folders")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    predictor = GridPredictor(trainer)
    written = []
    for path, name in zip(images, names):
        target = out_dir / name
        try:
            if is_picture(path):
                prob = predictor(path)
                out = np.rint(prob * 255) if probabilities else (prob >= threshold) * 255
                Image.fromarray(np.ascontiguousarray(out.astype(np.uint8).T)).save(target)  # (W, H) read, (H, W)
            else:
                src = nib.load(str(path))
                prob = predictor(path, src.shape)
                out = prob if probabilities else (prob >= threshold).astype(np.uint8)
                img = nib.Nifti1Image(out, src.affine, header=src.header.copy())
                img.set_data_dtype(np.float32 if probabilities else np.uint8)
                img.header.set_slope_inter(1.0, 0.0)
                nib.save(img, str(target))
        except Exception as e:  # one bad input: readers and transforms raise many types
            problem = _input_problem(path, e, trainer.cfg)
            if on_error is None:
                raise DataError(problem) from e
            on_error(path, problem)
            continue
        written.append(target)
        if on_written is not None:
            on_written(path, target)
    return written


def _input_problem(path: Path, error: BaseException, cfg: Mapping) -> str:
    """What is wrong with a file that could not be read or predicted, naming it: ``fssl validate-data``'s diagnosis
    of a NIfTI file where it finds one, and the innermost error."""
    if isinstance(error, DataError):
        return str(error)
    inner = innermost(error)
    cause = f"{type(inner).__name__}: {' '.join(str(inner).split())}"
    if not is_picture(path):
        spatial_dims, expect_hu = data_expectations(cfg)
        fatal = [str(p) for p in check_case({"image": str(path)}, "unlabeled", spatial_dims, expect_hu) if p.fatal]
        if fatal:
            return f"{'; '.join(fatal)} [{cause}]"
    return f"{path}: cannot be read or predicted ({cause})"


def _output_name(path: Path) -> str:
    return f"{path.stem}.png" if is_picture(path) else path.name


def read_mask(path: str | Path, spatial_dims: int) -> np.ndarray:
    """A lesion mask as a boolean array on its file's grid, read as the predictor reads images (a 2D slice's
    singleton axis dropped, a picture in gray as (W, H)); labels > 0.5 are lesion (0/1 and 0/255 masks alike)."""
    return Compose(loading(("label",), spatial_dims))({"label": str(path)})["label"][0].numpy() > 0.5


def score_cases(trainer, cases: list[dict]) -> dict:
    """Dice at 0.5 and threshold-averaged ("mean") Dice per image, averaged over images, each image scored on its
    own grid against its mask as stored (what ``predict_files`` writes; the protocol of Fan et al.), not at the
    network's input size.  Aggregates only."""
    predictor = GridPredictor(trainer)
    d05, dmean = [], []
    for case in cases:
        try:
            target = read_mask(case["label"], trainer.cfg["data"]["spatial_dims"])
        except Exception as e:  # a score over part of the scans would mislead: stop, naming the file
            raise DataError(_input_problem(Path(case["label"]), e, trainer.cfg)) from e
        try:
            prob = predictor(case["image"], target.shape)
        except DataError as e:
            raise DataError(f"{e} (the shape of its mask {case['label']})") from e
        except Exception as e:
            raise DataError(_input_problem(Path(case["image"]), e, trainer.cfg)) from e
        d05.append(dice_at(prob, target))
        dmean.append(threshold_averaged_dice(prob, target))
    return {"dice": float(np.mean(d05)), "mean_dice_256": float(np.mean(dmean)), "n": len(d05)}


def _restore_shape(prob: np.ndarray, shape: tuple, path: Path) -> np.ndarray:
    """Add back the singleton third axis of 2D slices; anything else must already match the input grid."""
    if prob.shape == tuple(shape):
        return prob
    if prob.ndim == len(shape) - 1 and prob.shape == tuple(shape[: prob.ndim]) and shape[-1] == 1:
        return prob[..., None]
    raise DataError(f"{path}: prediction shape {prob.shape} cannot be mapped back to the input shape {tuple(shape)}")


def threshold_averaged_dice(prob: np.ndarray | torch.Tensor, target: np.ndarray | torch.Tensor,
                            n_thresholds: int = 256, chunk: int = 1 << 22) -> float:
    """Dice averaged over ``n_thresholds`` evenly spaced thresholds of a probability map (the "mean Dice" of
    Inf-Net / Semi-Inf-Net, Fan et al. 2020).  An empty target with an empty prediction counts as 1.

    A voxel is predicted lesion at every threshold below its probability, so counting voxels by how many thresholds
    lie below them gives every threshold's prediction size and overlap in one pass, in ``chunk``-voxel pieces: memory
    stays that of the map (a (thresholds x voxels) mask would need 20 GB for one 512 x 512 x 300 CT volume)."""
    p = torch.nan_to_num(torch.as_tensor(prob, dtype=torch.float32).flatten(), nan=-1.0)  # NaN: never lesion
    t = torch.as_tensor(target).flatten() > 0.5
    thresholds = torch.linspace(0.0, 1.0, n_thresholds)
    by_count = torch.zeros(n_thresholds + 1, dtype=torch.int64)  # voxels by the number of thresholds below them
    lesion_by_count = torch.zeros(n_thresholds + 1, dtype=torch.int64)
    for start in range(0, p.numel(), chunk):
        below = torch.bucketize(p[start:start + chunk], thresholds)  # thresholds strictly below p: p > threshold
        by_count += torch.bincount(below, minlength=n_thresholds + 1)
        lesion_by_count += torch.bincount(below[t[start:start + chunk]], minlength=n_thresholds + 1)
    # at threshold k the prediction is every voxel with more than k thresholds below it
    predicted = by_count.flip(0).cumsum(0).flip(0)[1:].float()
    inter = lesion_by_count.flip(0).cumsum(0).flip(0)[1:].float()
    denom = predicted + t.sum().float()
    dice = torch.where(denom > 0, 2.0 * inter / denom.clamp(min=1), torch.ones_like(denom))
    return float(dice.mean())


def dice_at(prob, target, threshold: float = 0.5) -> float:
    p = np.asarray(prob) >= threshold
    t = np.asarray(target) > 0.5
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else float(2.0 * (p & t).sum() / denom)
