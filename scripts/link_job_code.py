#!/usr/bin/env python3
"""Link the one copy of the shipped code (custom/fssl_covid) into every job's app/custom/ as per-file symlinks.

FLARE ships ``<job>/app/custom/`` to the server and the sites.  Keeping symlinks (not copies) in git means the code
exists once; per-file links (not a linked folder) are followed by every way of submitting a job: ``nvflare job
submit`` (copies the folder), the admin console and Session API (zip the folder in place) and the simulator.
Run after adding or removing a module; ``tests/test_jobs.py`` fails while a job is out of sync.
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "custom" / "fssl_covid"


def shipped_files() -> list[Path]:
    return sorted(p.relative_to(PACKAGE) for p in PACKAGE.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix in (".py", ".json"))


def link(job_dir: Path) -> list[str]:
    target_pkg = job_dir / "app" / "custom" / "fssl_covid"
    wanted = set(shipped_files())
    changes = []
    if target_pkg.exists():
        for p in sorted(target_pkg.rglob("*"), reverse=True):
            rel = p.relative_to(target_pkg)
            if p.is_symlink() and rel not in wanted:
                p.unlink()
                changes.append(f"removed {p}")
            elif p.is_dir() and not p.is_symlink() and not any(p.iterdir()):
                p.rmdir()
    for rel in sorted(wanted):
        dst = target_pkg / rel
        src = PACKAGE / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        want = os.path.relpath(src, dst.parent)
        if dst.is_symlink() and os.readlink(dst) == want:
            continue
        if dst.exists() or dst.is_symlink():
            dst.unlink()
        dst.symlink_to(want)
        changes.append(f"linked {dst} -> {want}")
    return changes


def main() -> int:
    for meta in sorted((ROOT / "jobs").glob("*/meta.json")):
        for change in link(meta.parent):
            print(change)
    return 0


if __name__ == "__main__":
    sys.exit(main())
