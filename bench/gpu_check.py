"""GPU check, made to run in one go on a lent NVIDIA H100/H200 in about five minutes (it installs nothing itself).

    python bench/gpu_check.py [--out DIR] [--iterations 40]      # on the GPU machine, its own CUDA torch
                                                                   # plus nvflare, monai, nibabel installed
    python bench/gpu_check.py --smoke                              # a tiny CPU run that proves the script works

Trains the full-size 3D network (UNet 32-64-128-256-512, two residual units, about 19 M parameters) on
synthetic CT volumes (192 x 192 x 64 voxels, resampled to 1.5 x 1.5 x 2 mm, patches 96 x 96 x 32) and prints,
for AMP on and off: patches per second and peak GPU memory of our trainer and of the plain MONAI loop of
``bench/suite.py``; then the sliding-window inference of one 512 x 512 x 120 grid, ours against plain MONAI.
Writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out`` (default ``$OUT`` when set, else ``.work/gpu_check``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import suite  # noqa: E402
from fssl_covid.config import resolve_config  # noqa: E402
from fssl_covid.data import load_datalist  # noqa: E402
from fssl_covid.synthetic import SiteSpec, make_federation  # noqa: E402
from fssl_covid.trainer import SegmentationTrainer  # noqa: E402


def check_config(smoke: bool) -> dict:
    net = {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1} if smoke else suite.FULL_NET
    return suite.deep_merge(suite.job_config(), {
        "network": net,
        "data": {"spacing": [3.0, 3.0, 4.0] if smoke else [1.5, 1.5, 2.0],
                 "patch_size": [32, 32, 16] if smoke else [96, 96, 32]},
        "train": {"batch_size": 2, "seed": 0},
    })


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or str(suite.ROOT / ".work" / "gpu_check"))
    p.add_argument("--iterations", type=int, default=40)
    p.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device is there (CPU test)")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    iterations = 3 if args.smoke else args.iterations
    warmup = 1 if args.smoke else 5
    spacing = (3.0, 3.0, 4.0) if args.smoke else (1.0, 1.0, 2.0)
    site = SiteSpec("gpu", 4 if args.smoke else 8, 0, 0, 0, spacing, noise_hu=20.0, hu_scale=1.0, hu_offset=0.0,
                    lesion_burden=4.0, ggo_fraction=0.6)
    start = time.perf_counter()
    datalist = load_datalist(make_federation(out / "data", sites=[site], seed=0)["gpu"])
    print(f"synthetic volumes written in {time.perf_counter() - start:.0f} s", flush=True)
    cfg = check_config(args.smoke)
    results = {"machine": suite.machine(), "network_mb": suite.network_megabytes(cfg),
               "patch": cfg["data"]["patch_size"], "iterations": iterations, "train": [], "inference": None}
    for amp in ([True, False] if cuda else [False]):
        for name in ("ours (cached)", "plain MONAI"):
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            run_cfg = suite.deep_merge(cfg, {"train": {"amp": amp}})
            if name == "plain MONAI":
                secs, n = suite.plain_monai_loop(resolve_config(run_cfg), datalist["training"], iterations, device,
                                                 amp=amp, warmup=warmup)
            else:
                secs, n, _ = suite.our_loop(run_cfg, datalist, iterations, str(device), warmup=warmup)
            row = {"loop": name, "amp": amp, "patches_per_s": n / secs,
                   "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}
            results["train"].append(row)
            print(json.dumps(row), flush=True)
    grid = (64, 64, 32) if args.smoke else (512, 512, 120)
    trainer = SegmentationTrainer(cfg, {}, device=str(device))
    x = torch.rand((1, 1) + grid, device=device)
    times = {}
    for name in ("plain MONAI", "ours"):
        for rep in range(2):  # the first call pays for cudnn autotuning
            suite._sync(device)
            t0 = time.perf_counter()
            if name == "ours":
                trainer.predict_logits(x)
            else:
                with torch.no_grad(), torch.autocast(device.type, enabled=cuda):
                    suite.sliding_window_inference(x, roi_size=cfg["data"]["patch_size"], sw_batch_size=1,
                                                   predictor=trainer.model.eval(),
                                                   overlap=resolve_config(cfg)["inference"]["overlap"])
            suite._sync(device)
            times[name] = time.perf_counter() - t0
    results["inference"] = {"grid": list(grid), "seconds": times, "ratio": times["ours"] / times["plain MONAI"]}
    print(json.dumps(results["inference"]), flush=True)

    lines = [f"# GPU check: {results['machine']['gpu'] or 'no GPU (CPU)'}, torch {results['machine']['torch']}", "",
             f"network {results['network_mb']:.0f} MB, patch {results['patch']}, batch of "
             f"{cfg['train']['batch_size'] * resolve_config(cfg)['data']['samples_per_image']} patches, "
             f"{iterations} timed iterations", "", "| loop | AMP | patches/s | peak GPU MB |", "|---|---|---|---|"]
    for r in results["train"]:
        mem = f"{r['peak_gpu_mb']:.0f}" if r["peak_gpu_mb"] is not None else "-"
        lines.append(f"| {r['loop']} | {'on' if r['amp'] else 'off'} | {r['patches_per_s']:.2f} | {mem} |")
    inf = results["inference"]
    lines += ["", f"inference {'x'.join(map(str, inf['grid']))}: plain MONAI {inf['seconds']['plain MONAI']:.2f} s, "
              f"ours {inf['seconds']['ours']:.2f} s, ratio {inf['ratio']:.2f}"]
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    (out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
