"""Checking a site's data before (and when) it trains: every problem at once, with the file that has it.

Site admins run ``fssl validate-data`` on their datalist before joining a federation; the trainer runs the same
per-case checks when it starts and drops (``on_bad_case: "skip"``, one warning per dropped case) or refuses
(``"stop"``) unusable cases, so that one corrupt scan does not crash the site or poison the global model.

A :class:`Problem` is ``(file, problem, fatal)`` (plus the datalist key of its case).  *Fatal* means the case (or,
for datalist-level problems, the whole datalist) cannot be used; non-fatal problems are warnings.

Checks, per file (header first, then the voxel data, read once):

- the file exists, is a file, is not empty;
- ``.gz`` files are gzip (``not gzip-compressed``) and decompress (``corrupt or truncated gzip``);
- it is a NIfTI-1/2 image (Analyze, MGH, text, random bytes... are refused), with numeric voxels (no RGB);
- its shape fits the job: a 3D job needs a volume (W, H, D) with every side > 1 (a (W, H) or (W, H, 1) slice is
  refused); a 2D job needs (W, H) or (W, H, 1) (a volume is refused); a 4th axis of length 1 is accepted,
  more channels/time points are not;
- label and image have the same spatial shape and the same affine (within 1e-3: float32 header round-off).
  In a 2D job the affine is not used by the preprocessing, so an affine mismatch is only a warning there;
- voxel data can be read completely (truncated files fail here);
- images: no NaN or infinite values; not constant;
- images, where Hounsfield units are expected (``expect_hu``; the trainer derives it from the configuration:
  ``data.intensity_range[0] < 0``): a chest CT always holds air (about -1000 HU) and soft tissue or denser
  (> -500 HU), so the image must have **minimum <= -500 and maximum >= -500** (fatal otherwise: 8-bit display
  images 0..255, data normalized to 0..1, raw scanner values without the rescale intercept are caught here).
  Values beyond [-3100, 5000] (below the usual padding value -3024, above metal) are a warning only: the
  intensity window clips them, but a wrong rescale slope is likely;
- images, where HU are *not* expected (display-intensity configurations such as ``covid2d``, window 0..255):
  a minimum below -500 means HU data given to a display-intensity job (fatal: the window would clip the lungs);
  0..255 data is fine;
- labels: values in {0, 1, 2}.  0 is background; 1 and 2 are both lesion (``BinarizeLabeld`` merges multi-class
  masks such as ground-glass = 1 / consolidation = 2).  A value 2 is reported as a warning because masks that
  label *lungs* 1/2 would silently be trained as lesion.  Anything else (3, 255, 0.5, negative, NaN) is fatal.
  An empty label (a scan without lesions) is valid.

Datalist level (:func:`validate_datalist`; all fatal): not valid JSON, none of the expected keys, a case without
``image`` (or ``label`` where one is needed), data root missing (these come from
:func:`fssl_covid.data.load_datalist`, which stops at the first one); no cases at all.  Warnings: nothing to train
on (no ``training`` and no ``unlabeled`` cases); a ``test`` image that is also used for training or validation.
"""

from __future__ import annotations

import gzip
import logging
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple, Sequence

import nibabel as nib
import numpy as np

from .data import DATALIST_KEYS, DataError, load_datalist

__all__ = ["Problem", "Report", "check_case", "validate_cases", "validate_datalist", "usable_cases",
           "data_expectations", "ON_BAD_CASE"]

ON_BAD_CASE = ("skip", "stop")
AFFINE_TOLERANCE = 1e-3  # mm (and direction cosines x spacing): float32 header round-off
HU_AIR_TISSUE = -500.0  # a chest CT in HU has values below (air, lung) and above (tissue, bone) this
HU_USUAL = (-3100.0, 5000.0)  # beyond: warning (padding -3024 is inside; metal or a wrong rescale slope outside)
LABEL_VALUES = (0, 1, 2)
LABELED_KEYS = ("training", "validation", "test")


class Problem(NamedTuple):
    """One problem: the file (or datalist) that has it, what is wrong, whether it makes the case unusable."""

    file: str
    problem: str
    fatal: bool = True
    key: str = ""  # datalist key of the case ("" for datalist-level problems)

    def __str__(self) -> str:
        return f"{self.file}: {self.problem}" if self.fatal else f"{self.file}: warning: {self.problem}"


@dataclass
class Report:
    """Every problem found, and per datalist key how many cases were checked and how many are usable."""

    problems: list[Problem] = field(default_factory=list)
    good: dict[str, int] = field(default_factory=dict)  # cases without fatal problems, per key
    total: dict[str, int] = field(default_factory=dict)  # cases checked, per key

    @property
    def fatal(self) -> bool:
        return any(p.fatal for p in self.problems)

    @property
    def ok(self) -> bool:
        return not self.fatal

    @property
    def n_fatal(self) -> int:
        return sum(p.fatal for p in self.problems)

    @property
    def n_warnings(self) -> int:
        return sum(not p.fatal for p in self.problems)

    def extend(self, other: "Report") -> "Report":
        self.problems.extend(other.problems)
        for key in other.total:
            self.total[key] = self.total.get(key, 0) + other.total[key]
            self.good[key] = self.good.get(key, 0) + other.good.get(key, 0)
        return self

    def summary(self) -> str:
        counts = ", ".join(f"{k} {self.good.get(k, 0)}/{n}" for k, n in self.total.items() if n) or "no cases"
        verdict = "NOT usable as it is" if self.fatal else "usable"
        return (f"usable cases: {counts}; {self.n_fatal} fatal problem(s), {self.n_warnings} warning(s): "
                f"data {verdict}")


def data_expectations(cfg: Mapping) -> tuple[int, bool]:
    """(spatial_dims, expect_hu) of a resolved configuration: an intensity window starting below 0 means HU."""
    data = cfg["data"]
    return int(data["spatial_dims"]), float(data["intensity_range"][0]) < 0


# ---------------------------------------------------------------------------------------------- one file
def _open(path: Path) -> tuple[object | None, str | None]:
    """(nibabel image, None) or (None, why it cannot be opened).  Reads the header only."""
    if not path.exists():
        return None, "file does not exist"
    if not path.is_file():
        return None, "is not a file"
    try:
        if path.stat().st_size == 0:
            return None, "empty file (0 bytes)"
        with open(path, "rb") as f:
            magic = f.read(2)
    except OSError as e:
        return None, f"cannot be read: {e.strerror or e}"
    is_gz = magic == b"\x1f\x8b"
    if path.name.endswith(".gz") and not is_gz:
        return None, "not gzip-compressed although named .gz (not a NIfTI file, or an uncompressed .nii renamed)"
    try:
        with (gzip.open(path, "rb") if is_gz else open(path, "rb")) as f:
            head = f.read(540)
    except (OSError, EOFError, zlib.error) as e:
        return None, f"corrupt or truncated gzip file ({_msg(e)})"
    if not _looks_like_nifti(head):
        return None, "not a NIfTI file (no NIfTI-1/2 header)"
    if not path.name.endswith(".nii.gz" if is_gz else ".nii"):
        return None, f"a {'gzip-compressed ' if is_gz else ''}NIfTI file must be named " \
                     f"{'.nii.gz' if is_gz else '.nii'}"
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises many types for bad headers
        return None, f"unreadable NIfTI header ({type(e).__name__}: {_msg(e)})"
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        return None, f"not a NIfTI image ({type(img).__name__}): save it as .nii.gz"
    return img, None


def _looks_like_nifti(head: bytes) -> bool:
    if len(head) >= 348:
        for endian in "<>":
            size = struct.unpack(f"{endian}i", head[:4])[0]
            if size == 348 and head[344:347] in (b"n+1", b"ni1"):
                return True
            if size == 540 and head[4:7] in (b"n+2", b"ni2"):
                return True
    return False


def _spatial_problem(shape: tuple[int, ...], spatial_dims: int) -> tuple[tuple[int, ...] | None, str | None]:
    """(spatial shape as the preprocessing will see it, None) or (None, why it does not fit the job)."""
    shape = tuple(int(s) for s in shape)
    if len(shape) >= 4:
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        else:
            return None, (f"shape {shape}: more than one channel or time point (4D/5D data); one 2D slice or "
                          f"3D volume per file is expected")
    if spatial_dims == 3:
        if len(shape) == 2 or (len(shape) == 3 and shape[2] == 1):
            return None, (f"a 2D slice {shape} given to a 3D job: needs a volume (W, H, D); use a 2D configuration "
                          f"(data.spatial_dims 2) for slices")
        if len(shape) != 3 or min(shape) <= 1:
            return None, f"shape {shape} is not a 3D volume (W, H, D) with every side > 1"
        return shape, None
    if len(shape) == 3 and shape[2] == 1:
        return shape[:2], None
    if len(shape) == 3:
        return None, (f"a 3D volume {shape} given to a 2D job: needs a slice (W, H) or (W, H, 1); use a 3D "
                      f"configuration for volumes")
    if len(shape) != 2 or min(shape) <= 1:
        return None, f"shape {shape} is not a 2D slice (W, H) or (W, H, 1)"
    return shape, None


def _read(img) -> tuple[np.ndarray | None, str | None]:
    dtype = img.get_data_dtype()
    if dtype.fields is not None or not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)
                                        or np.issubdtype(dtype, np.bool_)):
        return None, f"unsupported voxel type {dtype} (RGB or complex): one grey value per voxel is needed"
    try:
        return np.asanyarray(img.dataobj), None
    except Exception as e:  # EOFError, zlib.error, OSError ("Expected n bytes"), ValueError, ...
        return None, f"voxel data cannot be read: truncated or corrupt file ({type(e).__name__}: {_msg(e)})"


def _msg(error: BaseException) -> str:
    return " ".join(str(error).split())  # one line


def _fmt(v: float) -> str:
    return f"{float(v):g}"


def _image_value_problems(a: np.ndarray, expect_hu: bool) -> list[tuple[str, bool]]:
    out: list[tuple[str, bool]] = []
    values = a
    if np.issubdtype(a.dtype, np.floating):
        finite = np.isfinite(a)
        n_bad = int(a.size - np.count_nonzero(finite))
        if n_bad:
            n_nan = int(np.count_nonzero(np.isnan(a)))
            out.append((f"{n_nan} NaN and {n_bad - n_nan} infinite voxel values (of {a.size})", True))
            values = a[finite]
    if values.size == 0:
        return out
    lo, hi = values.min(), values.max()
    if lo == hi:
        out.append((f"constant image (every voxel is {_fmt(lo)}): no content", True))
    elif expect_hu:
        if hi < HU_AIR_TISSUE:
            out.append((f"not CT in Hounsfield units: maximum {_fmt(hi)} < {_fmt(HU_AIR_TISSUE)} "
                        f"(no tissue denser than lung)", True))
        elif lo > HU_AIR_TISSUE:
            if lo >= 0 and hi <= 1:
                hint = "looks normalized to 0..1"
            elif lo >= 0 and hi <= 255:
                hint = "looks like 8-bit display values; use a configuration for display intensities " \
                       "(data.intensity_range [0, 255], fssl validate-data --no-hu)"
            elif lo >= 0:
                hint = "looks like raw scanner values without the rescale intercept (usually -1024)"
            else:
                hint = "not Hounsfield units"
            out.append((f"not CT in Hounsfield units: minimum {_fmt(lo)} > {_fmt(HU_AIR_TISSUE)} (no air); {hint}",
                        True))
        elif lo < HU_USUAL[0] or hi > HU_USUAL[1]:
            out.append((f"intensities {_fmt(lo)}..{_fmt(hi)} go beyond the usual CT range "
                        f"{_fmt(HU_USUAL[0])}..{_fmt(HU_USUAL[1])} HU: padding or metal, or a wrong rescale slope "
                        f"(the intensity window clips them)", False))
    elif lo < HU_AIR_TISSUE:
        out.append((f"looks like Hounsfield units (minimum {_fmt(lo)}), but the job expects display intensities "
                    f"(intensity window starting at 0 or above): use an HU configuration", True))
    return out


def _label_value_problems(a: np.ndarray) -> list[tuple[str, bool]]:
    ok = (a == 0) | (a == 1) | (a == 2)
    n_ok = int(np.count_nonzero(ok))
    if n_ok < a.size:
        bad = a[~ok]
        examples = np.unique(bad[:: max(1, bad.size // 10000)])[:5]
        shown = ", ".join(_fmt(v) for v in examples)
        hint = " (a 0/255 mask: divide by 255)" if np.all(np.isin(examples, (255,))) else ""
        return [(f"label values outside {{0, 1, 2}} in {a.size - n_ok} voxels (e.g. {shown}){hint}", True)]
    if np.any(a == 2):
        return [("multi-class label {0, 1, 2}: classes 1 and 2 are both trained as lesion (e.g. ground-glass and "
                 "consolidation); check that they are not lung labels", False)]
    return []


# ---------------------------------------------------------------------------------------------- cases
def check_case(case: Mapping, key: str, spatial_dims: int = 3, expect_hu: bool = True) -> list[Problem]:
    """Every problem of one case (``{"image": path[, "label": path]}``, absolute paths) of datalist key ``key``."""
    problems: list[Problem] = []

    def add(file, problem, fatal=True):
        problems.append(Problem(str(file), problem, fatal, key))

    if not isinstance(case, Mapping) or not case.get("image"):
        add(f"{key} case {case!r}", "has no 'image'")
        return problems
    files = {"image": Path(case["image"])}
    if case.get("label"):
        files["label"] = Path(case["label"])
    elif key in LABELED_KEYS:
        add(files["image"], f"a '{key}' case needs a 'label'")
    opened, spatial = {}, {}
    for role, path in files.items():  # header level: existence, format, shape
        img, why = _open(path)
        if why:
            add(path, why)
            continue
        opened[role] = img
        shape, why = _spatial_problem(img.shape, spatial_dims)
        if why:
            add(path, why)
        spatial[role] = shape
    if "image" in opened and "label" in opened:  # header level: image and label agree
        si, sl = spatial["image"], spatial["label"]
        if si is not None and sl is not None and si != sl:
            add(files["label"], f"label shape {sl} differs from image shape {si} ({files['image'].name})")
        ai, al = opened["image"].affine, opened["label"].affine
        if not np.allclose(ai, al, rtol=0.0, atol=AFFINE_TOLERANCE):
            diff = float(np.max(np.abs(ai - al)))
            add(files["label"], f"label affine differs from image affine ({files['image'].name}) by up to "
                                f"{diff:.3g} mm" + (" (not used by 2D preprocessing)" if spatial_dims == 2 else ""),
                fatal=spatial_dims != 2)
    for role, img in opened.items():  # data level: one read per file
        a, why = _read(img)
        if why:
            add(files[role], why)
            continue
        checks = _image_value_problems(a, expect_hu) if role == "image" else _label_value_problems(a)
        for problem, fatal in checks:
            add(files[role], problem, fatal)
        del a
    return problems


def validate_cases(cases: Iterable[Mapping], spatial_dims: int = 3, expect_hu: bool = True,
                   key: str = "cases") -> Report:
    """Check every case of one datalist key; the report lists every problem and counts the usable cases."""
    report = Report(good={key: 0}, total={key: 0})
    for case in cases:
        problems = check_case(case, key, spatial_dims, expect_hu)
        report.problems.extend(problems)
        report.total[key] += 1
        report.good[key] += not any(p.fatal for p in problems)
    return report


def validate_datalist(path: str | Path, data_root: str | Path | None = None, spatial_dims: int = 3,
                      expect_hu: bool = True) -> Report:
    """Check a datalist and every file it lists (all keys); datalist-level problems are fatal."""
    path = Path(path)
    try:
        datalist = load_datalist(path, data_root)
    except DataError as e:
        root_missing = data_root is not None and path.is_file() and not Path(data_root).is_dir()
        return Report(problems=[Problem(str(data_root if root_missing else path), str(e), True)])
    report = Report()
    if not any(datalist[k] for k in DATALIST_KEYS):
        report.problems.append(Problem(str(path), f"the datalist lists no cases (keys {', '.join(DATALIST_KEYS)} "
                                                  f"are all empty or missing)", True))
        return report
    if not datalist["training"] and not datalist["unlabeled"]:
        report.problems.append(Problem(str(path), "no 'training' or 'unlabeled' cases: this site can only "
                                                  "evaluate", False))
    for key in DATALIST_KEYS:
        report.extend(validate_cases(datalist[key], spatial_dims, expect_hu, key=key))
    test_images = {c["image"] for c in datalist["test"]}
    for key in ("training", "validation", "unlabeled"):
        for image in sorted(test_images & {c["image"] for c in datalist[key]}):
            report.problems.append(Problem(image, f"listed in both 'test' and '{key}': test scores will be "
                                                  f"optimistic", False, "test"))
    return report


def usable_cases(cases: Sequence[Mapping], key: str, spatial_dims: int = 3, expect_hu: bool = True,
                 on_bad: str = "skip", logger: logging.Logger | None = None) -> list:
    """The cases without fatal problems.

    ``on_bad="skip"``: each unusable case is dropped with one warning (naming its file and the reason) on
    ``logger``.  ``on_bad="stop"``: the first unusable case raises :class:`~fssl_covid.data.DataError`.
    """
    if on_bad not in ON_BAD_CASE:
        raise ValueError(f"on_bad_case must be one of {', '.join(ON_BAD_CASE)}, got {on_bad!r}")
    logger = logger or logging.getLogger(__name__)
    kept = []
    for case in cases:
        problems = check_case(case, key, spatial_dims, expect_hu)
        fatal = [p for p in problems if p.fatal]
        for p in problems:
            if not p.fatal:
                logger.debug("%s case: %s", key, p)
        if not fatal:
            kept.append(case)
            continue
        if on_bad == "stop":
            raise DataError(f"unusable {key} case: {fatal[0]} (on_bad_case is 'stop'; fix the file, remove it "
                            f"from the datalist, or set on_bad_case to 'skip')")
        logger.warning("skipping unusable %s case: %s", key, "; ".join(str(p) for p in fatal))
    return kept
