"""The benchmark scripts run and write complete results (no timing is asserted: benchmarks, not timed tests)."""

import json
import subprocess
import sys

from jobtools import ROOT


def test_bench_suite_quick_writes_every_ratio(tmp_path):
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "suite.py"), "--quick", "--only", "throughput",
                           "inference", "grid", "--out", str(out), "--threads", "1"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    results = json.loads((out / "results.json").read_text())
    t, i = results["throughput"], results["inference"]
    assert set(t["samples_per_s"]) == {"ours_cached", "ours_uncached", "plain_monai"}
    assert all(v > 0 for v in t["samples_per_s"].values()) and t["ratio_cached"] > 0 and t["ratio_uncached"] > 0
    assert i["ratio"] > 0 and i["grid"] == [256, 256, 60]
    g = results["grid"]  # both contenders mapped the prediction back to the scan's own grid
    assert all(r["shape"] == g["grid"] for runs in g["all"].values() for r in runs)
    assert g["ratio_rss"] > 0 and g["ratio_seconds"] > 0
    text = (out / "results.md").read_text()
    assert "ours, preprocessing cached" in text and "Sliding-window inference" in text and "own grid" in text


def test_gpu_check_smoke_runs_on_cpu(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {r["loop"] for r in results["train"]} == {"ours (cached)", "plain MONAI"}
    assert all(r["patches_per_s"] > 0 for r in results["train"]) and results["inference"]["ratio"] > 0
