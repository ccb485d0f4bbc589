"""Data validation: every bad input reported at once with its file, the CLI's exit codes, and a trainer that
skips (or stops at) unusable cases instead of crashing.  Real files written to tmp_path, no mocks."""

import json
import logging
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fssl_covid.cli import main as fssl
from fssl_covid.data import DataError, load_datalist
from fssl_covid.site_settings import SiteSettingsError, read_settings
from fssl_covid.trainer import SegmentationTrainer
from fssl_covid.validation import check_case, usable_cases, validate_cases, validate_datalist

SHAPE = (24, 24, 12)


def _nii(path: Path, array, affine=None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), np.diag([1.5, 1.5, 3.0, 1.0]) if affine is None else affine), path)
    return str(path)


def _ct(seed=0, shape=SHAPE) -> np.ndarray:
    """HU volume: air around a soft-tissue body with darker lungs."""
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1000.0)
    hu[3:-3, 3:-3] = 40.0
    hu[6:11, 6:-6] = -850.0
    hu[13:18, 6:-6] = -850.0
    return (hu + rng.normal(0, 10, shape)).astype(np.int16)


def _lesion(shape=SHAPE) -> np.ndarray:
    lab = np.zeros(shape, np.uint8)
    lab[7:10, 8:12, 4:8] = 1
    return lab


def _truncate(src: str, dst: Path, keep: float = 0.5) -> str:
    data = Path(src).read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return str(dst)


@pytest.fixture
def bad_site(tmp_path):
    """A 3D datalist where every case but the good ones is broken in one way; {file name: expected message}."""
    d = tmp_path / "site"
    img, lab = d / "imagesTr", d / "labelsTr"
    good = _nii(img / "good.nii.gz", _ct(0))
    good_lab = _nii(lab / "good_label.nii.gz", _lesion())
    no_lesion = _nii(img / "no_lesion.nii.gz", _ct(1))
    empty_lab = _nii(lab / "no_lesion_label.nii.gz", np.zeros(SHAPE, np.uint8))
    multi = _nii(lab / "multiclass_label.nii.gz", _lesion() * 2 + (np.arange(SHAPE[0]) == 5)[:, None, None])
    big = _ct(2).astype(np.float32)
    big[0, 0, 0] = -32768.0  # padding value: only a warning
    padded = _nii(img / "padded.nii.gz", big)

    nan_img = _ct(3).astype(np.float32)
    nan_img[5, 5, 5] = np.nan
    nan_img[6, 6, 6] = np.inf
    bad_label = _lesion()
    bad_label[0, 0, 0] = 3
    shifted = np.diag([1.5, 1.5, 3.0, 1.0])
    shifted[0, 3] = 5.0
    broken = {
        "truncated.nii.gz": ("image", _truncate(good, img / "truncated.nii.gz"), "truncated or corrupt"),
        "truncated_header.nii.gz": ("image", _truncate(good, img / "truncated_header.nii.gz", 0.02),
                                    "corrupt or truncated gzip"),
        "random.nii.gz": ("image", str(img / "random.nii.gz"), "not gzip-compressed"),
        "text.nii": ("image", str(img / "text.nii"), "not a NIfTI file"),
        "nan.nii.gz": ("image", _nii(img / "nan.nii.gz", nan_img), "1 NaN and 1 infinite"),
        "shape_label.nii.gz": ("label", _nii(lab / "shape_label.nii.gz", _lesion((24, 24, 10))),
                               "label shape (24, 24, 10) differs from image shape (24, 24, 12)"),
        "affine_label.nii.gz": ("label", _nii(lab / "affine_label.nii.gz", _lesion(), shifted),
                                "label affine differs from image affine"),
        "value3_label.nii.gz": ("label", _nii(lab / "value3_label.nii.gz", bad_label),
                                "label values outside {0, 1, 2} in 1 voxels (e.g. 3)"),
        "mask255_label.nii.gz": ("label", _nii(lab / "mask255_label.nii.gz", _lesion() * 255), "divide by 255"),
        "display.nii.gz": ("image", _nii(img / "display.nii.gz", np.random.default_rng(0).integers(0, 256, SHAPE)
                                         .astype(np.uint8)), "not CT in Hounsfield units: minimum 0 > -500"),
        "slice.nii.gz": ("image", _nii(img / "slice.nii.gz", _ct(4)[:, :, :1]),
                         "a 2D slice (24, 24, 1) given to a 3D job"),
        "flat.nii.gz": ("image", _nii(img / "flat.nii.gz", _ct(4)[:, :, 0]), "a 2D slice (24, 24) given to a 3D job"),
        "missing.nii.gz": ("image", str(img / "missing.nii.gz"), "file does not exist"),
    }
    (img / "random.nii.gz").write_bytes(os.urandom(3000))
    (img / "text.nii").write_text("patient scans are on the other disk\n" * 20)
    training = [{"image": "imagesTr/good.nii.gz", "label": "labelsTr/good_label.nii.gz"},
                {"image": "imagesTr/no_lesion.nii.gz", "label": "labelsTr/no_lesion_label.nii.gz"},
                {"image": "imagesTr/good.nii.gz", "label": "labelsTr/multiclass_label.nii.gz"}]
    for name, (role, path, _) in broken.items():
        rel = str(Path(path).relative_to(d))
        training.append({"image": rel, "label": "labelsTr/good_label.nii.gz"} if role == "image"
                        else {"image": "imagesTr/good.nii.gz", "label": rel})
    datalist = {"training": training,
                "unlabeled": [{"image": "imagesTr/padded.nii.gz"}, {"image": "imagesTr/nan.nii.gz"}],
                "test": [{"image": "imagesTr/no_lesion.nii.gz", "label": "labelsTr/no_lesion_label.nii.gz"}]}
    (d / "datalist.json").write_text(json.dumps(datalist))
    return d / "datalist.json", broken, {"good": good, "empty_label": empty_lab, "multi": multi, "padded": padded}


def test_every_problem_is_reported_in_one_run_with_its_file(bad_site):
    path, broken, files = bad_site
    report = validate_datalist(path)
    fatal = [p for p in report.problems if p.fatal]
    for name, (_, _, message) in broken.items():
        hits = [p for p in fatal if Path(p.file).name == name and p.key == "training"]
        assert len(hits) == 1, (name, [str(p) for p in report.problems])
        assert message in hits[0].problem, (name, hits[0].problem)
    # the NaN image is listed twice (training and unlabeled); nothing else is fatal
    assert len(fatal) == len(broken) + 1
    assert [p.key for p in fatal if Path(p.file).name == "nan.nii.gz"] == ["training", "unlabeled"]
    # good cases: the lesion case, the empty-label case (valid!) and the multi-class label (a warning only)
    assert report.total == {"training": 3 + len(broken), "validation": 0, "unlabeled": 2, "test": 1}
    assert report.good == {"training": 3, "validation": 0, "unlabeled": 1, "test": 1}
    warnings = {Path(p.file).name: p.problem for p in report.problems if not p.fatal}
    assert set(warnings) == {"multiclass_label.nii.gz", "padded.nii.gz", "no_lesion.nii.gz"}
    assert "classes 1 and 2 are both trained as lesion" in warnings["multiclass_label.nii.gz"]
    assert "-32768" in warnings["padded.nii.gz"]
    assert "listed in both 'test' and 'training'" in warnings["no_lesion.nii.gz"]
    assert report.fatal and "training 3/16" in report.summary()


def test_empty_label_and_good_cases_are_valid(bad_site):
    _, _, files = bad_site
    report = validate_cases([{"image": files["good"], "label": files["empty_label"]}, {"image": files["good"]}],
                            key="validation")
    assert [str(p) for p in report.problems] == [f"{files['good']}: a 'validation' case needs a 'label'"]
    assert report.good == {"validation": 1} and report.total == {"validation": 2} and report.fatal
    assert check_case({"image": files["good"], "label": files["empty_label"]}, "training") == []
    assert [p.fatal for p in check_case({"image": files["good"], "label": files["multi"]}, "training")] == [False]


def test_cli_prints_every_problem_and_exits_1_on_fatal_problems(bad_site, tmp_path, capsys):
    path, broken, files = bad_site
    assert fssl(["validate-data", "--datalist", str(path)]) == 1
    out = capsys.readouterr().out
    lines = out.splitlines()
    for name, (_, file, message) in broken.items():
        assert any(line.startswith(f"{file}: ") and message in line for line in lines), name
    assert out.strip().splitlines()[-1].endswith("data NOT usable as it is")

    good = tmp_path / "good.json"  # warnings only: exit 0
    good.write_text(json.dumps({"training": [{"image": files["good"], "label": files["multi"]},
                                             {"image": files["good"], "label": files["empty_label"]}]}))
    assert fssl(["validate-data", "--datalist", str(good)]) == 0
    out = capsys.readouterr().out
    assert "warning: multi-class label" in out and "training 2/2" in out

    kit = tmp_path / "kit"  # --settings: the site's own settings file (or its kit folder)
    (kit / "local").mkdir(parents=True)
    (kit / "local" / "fssl_site.json").write_text(json.dumps({"datalist": str(good), "on_bad_case": "stop"}))
    assert fssl(["validate-data", "--settings", str(kit / "local" / "fssl_site.json")]) == 0
    assert fssl(["validate-data", "--settings", str(kit)]) == 0
    (kit / "local" / "fssl_site.json").write_text(json.dumps({"datalist": str(path)}))
    assert fssl(["validate-data", "--settings", str(kit / "local" / "fssl_site.json")]) == 1
    (kit / "local" / "fssl_site.json").write_text(json.dumps({"datalist": str(tmp_path / "gone.json")}))
    assert fssl(["validate-data", "--settings", str(kit / "local" / "fssl_site.json")]) == 1
    assert "gone.json does not exist" in capsys.readouterr().out
    (kit / "local" / "fssl_site.json").write_text("{not json")
    assert fssl(["validate-data", "--settings", str(kit / "local" / "fssl_site.json")]) == 2  # settings file: error


def test_2d_and_3d_jobs_and_display_intensities(tmp_path):
    slice_u8 = _nii(tmp_path / "slice.nii.gz", np.random.default_rng(0).integers(0, 256, (40, 30, 1)).astype(np.uint8))
    slice_lab = _nii(tmp_path / "slice_label.nii.gz", np.zeros((40, 30, 1), np.uint8))
    flat_lab = _nii(tmp_path / "flat_label.nii.gz", np.zeros((40, 30), np.uint8))
    volume = _nii(tmp_path / "volume.nii.gz", _ct())
    hu_slice = _nii(tmp_path / "hu_slice.nii.gz", _ct()[:, :, 5:6])
    assert check_case({"image": slice_u8, "label": slice_lab}, "training", spatial_dims=2, expect_hu=False) == []
    assert check_case({"image": slice_u8, "label": flat_lab}, "training", spatial_dims=2, expect_hu=False) == []
    [p] = check_case({"image": volume}, "unlabeled", spatial_dims=2, expect_hu=True)
    assert p.fatal and p.file == volume and "a 3D volume (24, 24, 12) given to a 2D job" in p.problem
    [p] = check_case({"image": hu_slice}, "unlabeled", spatial_dims=2, expect_hu=False)
    assert p.fatal and "looks like Hounsfield units" in p.problem
    [p] = check_case({"image": slice_u8}, "unlabeled", spatial_dims=2, expect_hu=True)
    assert p.fatal and "8-bit display values" in p.problem
    four_d = _nii(tmp_path / "four_d.nii.gz", np.stack([_ct(), _ct(1)], axis=-1))
    [p] = check_case({"image": four_d}, "unlabeled")
    assert p.fatal and "more than one channel" in p.problem
    assert check_case({"image": _nii(tmp_path / "one_channel.nii.gz", _ct()[..., None])}, "unlabeled") == []
    assert fssl(["validate-data", "--datalist", _datalist(tmp_path, {"unlabeled": [slice_u8]}),
                 "--spatial-dims", "2", "--no-hu"]) == 0
    assert fssl(["validate-data", "--datalist", _datalist(tmp_path, {"unlabeled": [slice_u8]})]) == 1


def _datalist(folder: Path, content, name="datalist.json") -> str:
    path = folder / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


@pytest.mark.parametrize("content, data_root, message", [
    ({"training": [], "unlabeled": []}, None, "lists no cases"),
    ({}, None, "has none of the keys"),
    ("{'training': [", None, "is not valid JSON"),
    ({"images": ["a.nii.gz"]}, None, "has none of the keys"),
    ({"training": [{"image": "a.nii.gz"}]}, None, "has no 'label'"),
    ({"training": [{"image": "a.nii.gz", "label": "b.nii.gz"}]}, "no_such_root", "data root"),
])
def test_datalist_level_problems_are_fatal_and_name_the_file(tmp_path, capsys, content, data_root, message):
    path = _datalist(tmp_path, content)
    root = str(tmp_path / data_root) if data_root else None
    report = validate_datalist(path, root)
    [p] = report.problems
    assert p.fatal and message in p.problem and p.file == (root or path)
    argv = ["validate-data", "--datalist", path] + (["--data-root", root] if root else [])
    assert fssl(argv) == 1
    assert f"{root or path}: " in capsys.readouterr().out


def test_missing_datalist(tmp_path):
    [p] = validate_datalist(tmp_path / "nowhere.json").problems
    assert p.fatal and "does not exist" in p.problem and p.file.endswith("nowhere.json")


def test_on_bad_case_setting(tmp_path):
    dl = _datalist(tmp_path, {"unlabeled": ["a.nii.gz"]})
    settings = tmp_path / "fssl_site.json"
    settings.write_text(json.dumps({"datalist": dl}))
    assert read_settings(settings).on_bad_case == "skip"
    settings.write_text(json.dumps({"datalist": dl, "on_bad_case": "stop"}))
    assert read_settings(settings).on_bad_case == "stop"
    settings.write_text(json.dumps({"datalist": dl, "on_bad_case": "ignore"}))
    with pytest.raises(SiteSettingsError, match="on_bad_case must be skip or stop"):
        read_settings(settings)
    with pytest.raises(ValueError, match="on_bad_case"):
        usable_cases([], "training", on_bad="ignore")


@pytest.fixture
def site_with_bad_cases(tmp_path, synthetic_sites):
    """The synthetic china site, copied, plus a corrupt training case and a NaN unlabeled scan."""
    site = tmp_path / "china"
    shutil.copytree(Path(synthetic_sites["china"]).parent, site)
    raw = json.loads((site / "datalist.json").read_text())
    first = raw["training"][0]
    _truncate(str(site / first["image"]), site / "imagesTr" / "corrupt.nii.gz")
    nan = np.asanyarray(nib.load(site / first["image"]).dataobj).astype(np.float32)
    nan[tuple(s // 2 for s in nan.shape)] = np.nan
    _nii(site / "imagesTr" / "nan.nii.gz", nan, nib.load(site / first["image"]).affine)
    raw["training"].append({"image": "imagesTr/corrupt.nii.gz", "label": first["label"]})
    raw["unlabeled"].append({"image": "imagesTr/nan.nii.gz"})
    (site / "datalist.json").write_text(json.dumps(raw))
    return site / "datalist.json", len(raw["training"]) - 1, len(raw["unlabeled"]) - 1


def test_trainer_skips_unusable_cases_and_trains(site_with_bad_cases, tiny_3d, caplog):
    path, n_train, n_unlabeled = site_with_bad_cases
    logger = logging.getLogger("fssl_test_site")
    with caplog.at_level(logging.WARNING, logger="fssl_test_site"):
        tr = SegmentationTrainer(tiny_3d, load_datalist(path), logger=logger)
    assert tr.skipped_cases == {"training": 1, "unlabeled": 1, "validation": 0}
    assert len(tr.labeled_cases) == n_train and len(tr.unlabeled_cases) == n_unlabeled
    warnings = [r.getMessage() for r in caplog.records if r.name == "fssl_test_site"]
    assert len(warnings) == 2
    assert "corrupt.nii.gz" in warnings[0] and "truncated or corrupt" in warnings[0]
    assert "nan.nii.gz" in warnings[1] and "NaN" in warnings[1]
    res = tr.run_round(None, round_index=1, total_rounds=2)  # past warm-up: labeled and unlabeled batches
    assert res.iterations == 3 and res.n_labeled == n_train and res.n_unlabeled == n_unlabeled
    assert np.isfinite(res.losses["loss"])
    assert all(np.isfinite(v.float().numpy()).all() for v in res.weights.values())


def test_trainer_stops_at_the_first_unusable_case_when_asked(site_with_bad_cases, tiny_3d):
    path, _, _ = site_with_bad_cases
    with pytest.raises(DataError, match=r"unusable training case: .*corrupt\.nii\.gz: voxel data cannot be read"):
        SegmentationTrainer(tiny_3d, load_datalist(path), on_bad_case="stop")


def test_executor_passes_on_bad_case_and_logs_only_a_count(site_with_bad_cases, tmp_path, tiny_3d, caplog):
    from nvflare.apis.event_type import EventType
    from nvflare.apis.fl_constant import FLContextKey, ReservedKey
    from nvflare.apis.fl_context import FLContext
    from nvflare.apis.workspace import Workspace

    from fssl_covid.executor import FSSLExecutor

    path, n_train, _ = site_with_bad_cases

    def start(on_bad_case):
        kit = tmp_path / f"kit_{on_bad_case}"
        (kit / "local").mkdir(parents=True)
        (kit / "startup").mkdir()
        (kit / "local" / "fssl_site.json").write_text(json.dumps({"datalist": str(path), "on_bad_case": on_bad_case,
                                                                  "num_threads": 1}))
        ctx = FLContext()
        ctx.set_prop(ReservedKey.IDENTITY_NAME, "china", private=False, sticky=False)
        ctx.set_prop(FLContextKey.WORKSPACE_OBJECT, Workspace(str(kit), "china"), private=True, sticky=False)
        ex = FSSLExecutor(config=tiny_3d)
        ex.handle_event(EventType.START_RUN, ctx)
        return ex

    ex = start("stop")
    assert ex.trainer is None and "DataError: unusable training case" in ex.setup_error
    assert "corrupt.nii.gz" in ex.setup_error
    with caplog.at_level(logging.INFO):
        ex = start("skip")
    assert ex.trainer is not None and len(ex.trainer.labeled_cases) == n_train
    ready = [r.getMessage() for r in caplog.records if "ready on" in r.getMessage()]
    assert len(ready) == 1 and "2 unusable cases skipped" in ready[0], ready
    assert "corrupt" not in ready[0] and "nan.nii" not in ready[0]
