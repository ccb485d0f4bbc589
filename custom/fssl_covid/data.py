"""Site data: decathlon-style datalists and MONAI preprocessing for 2D slices and 3D CT volumes.

A site's data is a JSON datalist (MONAI decathlon style) whose paths are relative to a data root::

    {"training":   [{"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz"}, ...],
     "validation": [{"image": ..., "label": ...}, ...],     # optional
     "unlabeled":  [{"image": ...}, ...],                    # optional
     "test":       [{"image": ..., "label": ...}, ...]}      # optional, held out

2D and 3D differ only in configuration (``data.spatial_dims``); the same transform chain serves both.
Deterministic preprocessing is cached once (``CacheDataset``); random patch sampling runs per iteration.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
from monai.data import CacheDataset, DataLoader, list_data_collate
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    HistogramNormalized,
    LoadImaged,
    MapTransform,
    Orientationd,
    RandCropByPosNegLabeld,
    RandSpatialCropSamplesd,
    Resized,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
)

DATALIST_KEYS = ("training", "validation", "unlabeled", "test")


class DataError(ValueError):
    """Site data that cannot be used; the message names the file and the problem."""


def load_datalist(path: str | Path, data_root: str | Path | None = None) -> dict[str, list[dict]]:
    """Read a datalist and return every known key as a list of cases with absolute paths.

    ``data_root`` defaults to the datalist's folder.  Missing keys become empty lists; unknown keys are ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"datalist {path} does not exist")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"datalist {path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict) or not any(k in raw for k in DATALIST_KEYS):
        raise DataError(f"datalist {path} has none of the keys {', '.join(DATALIST_KEYS)}")
    # absolute, so the cases stay valid in processes that run elsewhere (FLARE's simulator and clients)
    root = (Path(data_root) if data_root is not None else path.parent).resolve()
    if not root.is_dir():
        raise DataError(f"data root {root} (for datalist {path}) does not exist")
    out: dict[str, list[dict]] = {}
    for key in DATALIST_KEYS:
        cases = raw.get(key, []) or []
        if not isinstance(cases, list):
            raise DataError(f"datalist {path}: '{key}' must be a list")
        resolved = []
        for i, case in enumerate(cases):
            if isinstance(case, str):
                case = {"image": case}
            if not isinstance(case, dict) or "image" not in case:
                raise DataError(f"datalist {path}: {key}[{i}] has no 'image'")
            if key != "unlabeled" and "label" not in case:
                raise DataError(f"datalist {path}: {key}[{i}] ({case['image']}) has no 'label'")
            item = {"image": str(root / case["image"])}
            if key != "unlabeled":
                item["label"] = str(root / case["label"])
            resolved.append(item)
        out[key] = resolved
    return out


class EnsureSpatialDimsd(MapTransform):
    """Bring channel-first arrays to the configured number of spatial dims.

    2D slices are stored as (W, H, 1): the singleton third axis is dropped.  A picture (PNG, JPEG, ...) read in
    colour becomes gray (the mean of its red, green and blue: CT pictures are gray in three equal channels).  A real
    volume given to a 2D configuration, or a single slice given to a 3D one, is refused with the file's name.
    """

    def __init__(self, keys, spatial_dims: int, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.spatial_dims = spatial_dims

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            spatial = tuple(x.shape[1:])
            name = _source_name(x)
            if self.spatial_dims == 2:
                if x.shape[0] in (3, 4) and _read_channel_last(x):  # RGB(A) picture
                    x = x[:3].mean(dim=0, keepdim=True)
                if len(spatial) == 3 and spatial[2] == 1:
                    x = x[..., 0]
                elif len(spatial) != 2:
                    raise DataError(f"{name}: a 2D configuration needs (W, H) or (W, H, 1) images, got {spatial}")
            elif len(spatial) != 3 or min(spatial) == 1:
                raise DataError(f"{name}: a 3D configuration needs a volume, got spatial shape {spatial}")
            d[key] = x
        return d


class BinarizeLabeld(MapTransform):
    """Lesion masks become 0/1 (multi-class lesion labels such as GGO/consolidation are merged)."""

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = (d[key] > 0.5).to(torch.float32) if isinstance(d[key], torch.Tensor) else (d[key] > 0.5)
        return d


def innermost(error: BaseException) -> BaseException:
    """The exception a chain started from (MONAI wraps transform errors in "applying transform ..."), or the first
    ``DataError`` on the way down: that one already names the file and the problem."""
    while error.__cause__ is not None and not isinstance(error, DataError):
        error = error.__cause__
    return error


def root_cause(error: BaseException) -> str:
    """The message of ``innermost(error)``."""
    return str(innermost(error))


def _read_channel_last(x) -> bool:
    """Whether the reader found the channels last (PIL's colour pictures), not a channel added by MONAI."""
    dim = (getattr(x, "meta", None) or {}).get("original_channel_dim")
    return isinstance(dim, int) and dim == -1


def _source_name(x) -> str:
    meta = getattr(x, "meta", None) or {}
    return str(meta.get("filename_or_obj", "image"))


def loading(keys: Sequence[str], spatial_dims: int) -> list:
    """Read files (NIfTI, or pictures for 2D) as channel-first arrays of ``spatial_dims`` dims on their own grid."""
    keys = list(keys)
    return [LoadImaged(keys=keys, image_only=True), EnsureChannelFirstd(keys=keys),
            EnsureSpatialDimsd(keys=keys, spatial_dims=spatial_dims)]


# How an image is resampled between grids: to the training grid (3D: Spacingd) and a prediction back to the scan's
# grid (inference.resample_to_grid): linear, edges extended, voxels as squares (MONAI's and PyTorch's conventions).
RESAMPLING = {"padding_mode": "border", "align_corners": False}


def preprocessing(cfg: Mapping, keys: Sequence[str] = ("image", "label"), pad: bool = True) -> list:
    """Deterministic preprocessing (cached): load, channel first, 2D/3D check (``loading``), then ``preparation``."""
    return loading(keys, cfg["data"]["spatial_dims"]) + preparation(cfg, keys, pad)


def preparation(cfg: Mapping, keys: Sequence[str] = ("image", "label"), pad: bool = True) -> list:
    """What follows ``loading``: orientation and spacing (3D), intensity window (or the image's own percentiles) to
    0..1, label binarization, resize (2D) or pad to the patch size (3D training)."""
    data = cfg["data"]
    dims = data["spatial_dims"]
    keys = list(keys)
    has_label = "label" in keys
    modes = ["bilinear", "nearest"] if has_label else ["bilinear"]
    lo, hi = data["intensity_range"]
    xforms = []
    if dims == 3:
        if data["orientation"]:
            # labels=None is MONAI 1.6's default (axis labels from the image's space), passed so that it stops
            # printing its deprecation notice in every run's output
            xforms.append(Orientationd(keys=keys, axcodes=data["orientation"], labels=None))
        if data["spacing"]:
            # float32, not MONAI's default float64: the precision every 3D model here was trained with, and half
            # the memory of the sampling grid (over the training grid's voxels)
            xforms.append(Spacingd(keys=keys, pixdim=data["spacing"], mode=modes, dtype=torch.float32, **RESAMPLING))
    if data["intensity_normalization"] == "percentile":
        xforms.append(ScaleIntensityRangePercentilesd(keys="image", lower=0.5, upper=99.5, b_min=0.0, b_max=1.0,
                                                      clip=True))
    elif data["intensity_normalization"] == "histogram":
        xforms.append(HistogramNormalized(keys="image", num_bins=256, min=0.0, max=1.0))
    else:
        xforms.append(ScaleIntensityRanged(keys="image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True))
    if has_label:
        xforms.append(BinarizeLabeld(keys="label"))
    if dims == 2:
        xforms.append(Resized(keys=keys, spatial_size=data["patch_size"], mode=["area", "nearest"][: len(keys)]))
    elif pad:
        xforms.append(SpatialPadd(keys=keys, spatial_size=data["patch_size"]))
    xforms.append(EnsureTyped(keys=keys, dtype=torch.float32))
    return xforms


def patch_sampling(cfg: Mapping, labeled: bool) -> list:
    """Random patch sampling for 3D training: balanced lesion/background centres for labeled cases,
    uniform for unlabeled ones.  2D slices are used whole (already resized)."""
    data = cfg["data"]
    if data["spatial_dims"] == 2:
        return []
    n = int(data["samples_per_image"])
    if labeled:
        return [RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=data["patch_size"],
                                       pos=data["pos"], neg=data["neg"], num_samples=n, allow_smaller=False)]
    return [RandSpatialCropSamplesd(keys=["image"], roi_size=data["patch_size"], num_samples=n, random_size=False)]


def training_dataset(cfg: Mapping, cases: Sequence[dict], labeled: bool, seed: int = 0) -> CacheDataset:
    keys = ("image", "label") if labeled else ("image",)
    transform = Compose(preprocessing(cfg, keys) + patch_sampling(cfg, labeled))
    transform.set_random_state(seed=seed)
    return CacheDataset(list(cases), transform=transform, cache_rate=cfg["data"]["cache_rate"], num_workers=0,
                        progress=False)


def evaluation_dataset(cfg: Mapping, cases: Sequence[dict], with_label: bool = True) -> CacheDataset:
    keys = ("image", "label") if with_label else ("image",)
    return CacheDataset(list(cases), transform=Compose(preprocessing(cfg, keys, pad=False)),
                        cache_rate=cfg["data"]["cache_rate"], num_workers=0, progress=False)


def infinite_batches(dataset, batch_size: int, seed: int, num_workers: int = 0,
                     pin_memory: bool = False) -> Iterator[dict]:
    """Shuffled batches forever, reshuffled each pass (seeded); loader (and its workers) built once and reused."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) >= batch_size,
                        num_workers=num_workers, persistent_workers=num_workers > 0, pin_memory=pin_memory,
                        collate_fn=list_data_collate, generator=generator)
    while True:
        yield from loader


def loader_workers(requested: int, device: torch.device) -> int:
    """``data.num_workers``: -1 picks 0 on CPU and min(4, cores // 2) with CUDA."""
    if requested >= 0:
        return requested
    if device.type != "cuda":
        return 0
    return max(0, min(4, (os.cpu_count() or 1) // 2))


def evaluation_loader(dataset, batch_size: int = 1) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=list_data_collate)
