"""`fssl report` on a real job folder: the FLARE simulator ran the FSSL job (3 sites, 2 rounds, tiny data: the run
shared with the simulator and privacy tests), then the report is built from what the job left (TensorBoard events,
cross-site results, final model)."""

import json
import re
import shutil
from pathlib import Path

import matplotlib.image
import pytest

from jobtools import SITES
from fssl_covid import cli
from fssl_covid.report import build_report

WITH_VALIDATION = ["china", "italy"]  # japan has no labeled validation scans (conftest.SMALL_SITES)
ROUNDS = 2
TRAIN_TAGS = ["train/loss", "train/sup_loss", "train/unsup_loss", "train/confident_fraction"]
VAL_TAGS = ["val/dice_global_model", "val/dice_local_model"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def job_dir(simulated_fssl_job):
    """A finished simulated FSSL job (conftest.simulated_fssl_job): ``<ws>/server/simulate_job``."""
    assert simulated_fssl_job["rounds"] == ROUNDS
    return simulated_fssl_job["run"]


def _images(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def _check_png(path):
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 5_000, f"{path} is only {len(data)} bytes"
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200, pixels.shape
    assert pixels.std() > 0.01, f"{path} is blank"


def test_tensorboard_events_per_site_and_round(job_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = job_dir / "tb_events"
    for site in SITES:
        assert list((tb / site).glob("events.out.tfevents.*")), f"no TensorBoard events for {site}"
        acc = EventAccumulator(str(tb / site))
        acc.Reload()
        tags = set(acc.Tags()["scalars"])
        expected = TRAIN_TAGS + (VAL_TAGS if site in WITH_VALIDATION else [])
        assert set(expected) <= tags, (site, tags)
        if site not in WITH_VALIDATION:
            assert not tags & set(VAL_TAGS), (site, tags)  # no labeled validation scans: no Dice is invented
        for tag in expected:
            events = acc.Scalars(tag)
            assert [e.step for e in events] == list(range(ROUNDS)), (site, tag, [e.step for e in events])
            for e in events:
                assert e.value == e.value  # not NaN
                if tag.startswith("val/") or tag.endswith("fraction"):
                    assert 0.0 <= e.value <= 1.0, (site, tag, e.value)


def test_report_with_data(job_dir, synthetic_sites, capsys):
    rc = cli.main(["report", str(job_dir), "--overlays", "2",
                   *[arg for site in SITES for arg in ("--data", f"{site}={synthetic_sites[site]}")]])
    assert rc == 0
    out_dir = job_dir / "report"  # the default
    html_path, md_path = out_dir / "report.html", out_dir / "report.md"
    printed = capsys.readouterr().out
    assert str(html_path) in printed and str(md_path) in printed
    md = md_path.read_text()

    images = _images(md)
    expected = {"dice_per_round.png", "training_curves.png", "cross_site.png"} | {f"overlay_{s}.png" for s in SITES}
    assert set(images) == expected, images
    for name in images:
        _check_png(out_dir / name)

    # the HTML is one file: every figure embedded, nothing loaded from elsewhere
    html = html_path.read_text()
    sources = re.findall(r'<img[^>]*src="([^"]*)"', html)
    assert len(sources) == len(images) and all(s.startswith("data:image/png;base64,") for s in sources)

    # the numbers of the cross-site matrix are the job's
    results = json.loads((job_dir / "cross_site_val" / "cross_val_results.json").read_text())
    lines = md.splitlines()
    for model, row_label in [("SRV_FL_global_model.pt", "global (final)"), ("SRV_best_FL_global_model.pt",
                                                                             "global (best)")] + \
            [(s, f"{s} (local)") for s in SITES]:
        row = next(line for line in lines if line.startswith(f"| {row_label} |"))
        cells = [c.strip() for c in row.strip("|").split("|")][1:]
        assert cells == [f"{results[site][model]['val_dice']:.3f}" for site in sorted(results)], (row_label, row)

    # the summary knows the job
    assert f"| rounds seen (TensorBoard) | {ROUNDS} |" in md
    assert "FL_global_model.pt" in md and "tensorboard --logdir" in md
    assert "No overlays" not in md
    for site in WITH_VALIDATION:
        assert re.search(rf"\| {site} \| \d\.\d{{3}} \(round {ROUNDS - 1}\) \|", md), site


def test_report_without_data_has_no_overlays(job_dir, tmp_path):
    html_path = build_report(job_dir, out_dir=tmp_path / "no_data")
    md = html_path.with_name("report.md").read_text()
    assert not list((tmp_path / "no_data").glob("overlay_*.png"))
    assert not [i for i in _images(md) if i.startswith("overlay_")]
    assert "No overlays" in md and "--data SITE=" in md
    assert {"dice_per_round.png", "training_curves.png", "cross_site.png"} <= set(_images(md))


def test_missing_pieces_give_notes_not_errors(job_dir, tmp_path):
    empty = tmp_path / "empty_job"
    empty.mkdir()
    md = build_report(empty).with_name("report.md").read_text()
    assert "No TensorBoard events" in md and "No cross-site results" in md and not _images(md)

    partial = tmp_path / "partial_job" / "workspace"  # cross-site results only
    shutil.copytree(job_dir / "cross_site_val", partial / "cross_site_val",
                    ignore=shutil.ignore_patterns("*_shareables"))
    md = build_report(partial.parent, datalists={"china": "/nonexistent/datalist.json"}).with_name("report.md")
    text = md.read_text()
    assert _images(text) == ["cross_site.png"] and "No TensorBoard events" in text
    assert "No overlays: FL_global_model.pt is not in this job folder" in text


def test_a_site_segments_new_scans_with_the_jobs_global_model(job_dir, synthetic_sites, tmp_path, capsys):
    """`fssl predict` on a job's FL_global_model.pt (which carries no config): the job's own training config beside it
    is used, or named with --config (the job folder); masks on each input's own grid, next to nothing else."""
    import nibabel as nib
    import numpy as np
    from fssl_covid.data import load_datalist

    scans = [Path(c["image"]) for c in load_datalist(synthetic_sites["japan"])["unlabeled"][:2]]
    model = job_dir / "app_server" / "FL_global_model.pt"
    assert cli.main(["predict", "--model", str(model), "--input", *map(str, scans), "--out", str(tmp_path / "a"),
                     "--device", "cpu"]) == 0
    for scan in scans:
        mask = nib.load(tmp_path / "a" / scan.name)
        assert mask.shape == nib.load(scan).shape and np.allclose(mask.affine, nib.load(scan).affine)
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}

    lone = tmp_path / "FL_global_model.pt"  # the model file alone: no config beside it
    shutil.copy(model, lone)
    assert cli.main(["predict", "--model", str(lone), "--input", str(scans[0]), "--out", str(tmp_path / "b")]) == 2
    assert "carries no configuration" in capsys.readouterr().err
    assert cli.main(["predict", "--model", str(lone), "--config", str(job_dir), "--input", str(scans[0]),
                     "--out", str(tmp_path / "b")]) == 0
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "b" / scans[0].name).dataobj),
                                  np.asarray(nib.load(tmp_path / "a" / scans[0].name).dataobj))
