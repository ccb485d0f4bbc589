"""Reading a finished FLARE job: where its outputs are and the cross-site Dice table."""

from __future__ import annotations

import json
from pathlib import Path

from .averaging import LAST_ROUND_MODEL

GLOBAL_ROWS = ("SRV_FL_global_model.pt", "SRV_best_FL_global_model.pt")


def find_job_outputs(job_dir: str | Path) -> dict[str, Path | None]:
    """Locate the outputs of a downloaded (``nvflare job download``) or simulated job folder."""
    job_dir = Path(job_dir)

    def first(pattern: str) -> Path | None:
        hits = sorted(job_dir.rglob(pattern), key=lambda p: len(p.parts))
        return hits[0] if hits else None

    return {
        "global_model": first("FL_global_model.pt"),
        "best_model": first("best_FL_global_model.pt"),
        "last_round_model": first(LAST_ROUND_MODEL),  # only when the final model is a tail average
        "cross_site": first("cross_val_results.json"),
        "tb_events": (first("events.out.tfevents.*").parent.parent if first("events.out.tfevents.*") else None),
        "server_log": first("log.txt"),
    }


def load_cross_site(path: str | Path | None) -> dict[str, dict[str, float | None]]:
    """{data site: {model: val_dice or None}} from ``cross_val_results.json``."""
    if path is None or not Path(path).is_file():
        return {}
    raw = json.loads(Path(path).read_text())
    return {site: {model: (m or {}).get("val_dice") for model, m in models.items()} for site, models in raw.items()}


def _model_label(model: str) -> str:
    return {"SRV_FL_global_model.pt": "global (final)", "SRV_best_FL_global_model.pt": "global (best)"}.get(
        model, f"{model} (local)")


def cross_site_table(path: str | Path | None) -> str:
    """Markdown table: rows = models (global final/best, each site's own), columns = the site whose test data scores
    them, plus the empty-mask baseline (predicting no lesion scores Dice 0 on every scan with a lesion)."""
    results = load_cross_site(path)
    if not results:
        return "(no cross-site results)"
    sites = sorted(results)
    models = [m for m in GLOBAL_ROWS if any(m in results[s] for s in sites)]
    models += sorted({m for s in sites for m in results[s]} - set(GLOBAL_ROWS))
    header = "| model \\ data | " + " | ".join(sites) + " |"
    lines = [header, "|" + "---|" * (len(sites) + 1)]
    for model in models:
        cells = []
        for s in sites:
            v = results[s].get(model)
            cells.append("-" if v is None else f"{v:.3f}")
        lines.append(f"| {_model_label(model)} | " + " | ".join(cells) + " |")
    lines.append("| empty-mask baseline | " + " | ".join("0.000" for _ in sites) + " |")
    return "\n".join(lines)
