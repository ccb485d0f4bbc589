"""A readable report of a finished (downloaded or simulated) FLARE job: ``fssl report JOB_DIR``.

Writes into ``<job_dir>/report/`` (or ``out_dir``):

- ``report.md``: summary table, figures referenced as PNG files next to it, notes on anything missing;
- ``report.html``: the same, one self-contained file (figures embedded as base64);
- the figures: validation Dice of the global model per round and site (``dice_per_round.png``), per-site training
  curves (``training_curves.png``), the cross-site Dice matrix (``cross_site.png``) and, only when the sites'
  datalists are given (the report then runs where the data is), the final global model's predictions on a few
  labeled scans (``overlay_<site>.png``).

The curves come from the TensorBoard events the sites streamed during the job (``tb_events/<site>/``: tags
``train/loss``, ``train/sup_loss``, ``train/unsup_loss``, ``train/confident_fraction``, ``val/dice_global_model``,
``val/dice_local_model``; step = round, the first round is 0 as in FLARE's server log).  Missing pieces give a note
in the report, never an error.  The report is for the people who run the job: overlays show images of a site's
scans and the Dice of single cases, so a report built with ``datalists`` stays at that site.
"""

from __future__ import annotations

import base64
import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from .config import job_training_config
from .results import GLOBAL_ROWS, _model_label, find_job_outputs, load_cross_site

TRAIN_TAGS = ("train/loss", "train/sup_loss", "train/unsup_loss", "train/confident_fraction")
TRAIN_TITLES = {
    "train/loss": "Total loss (supervised + λ·unsupervised)",
    "train/sup_loss": "Supervised loss (Dice + CE, labeled batches)",
    "train/unsup_loss": "Unsupervised loss (consistency, unlabeled)",
    "train/confident_fraction": "Confident fraction (voxels ≥ τ, unlabeled)",
}
FIGURES = ("dice_per_round.png", "training_curves.png", "cross_site.png")  # + overlay_<site>.png
ROUND_LABEL = "round (0 = first, as in TensorBoard and the server log)"
DICE_LABEL = "Dice, lesion class (0–1)"

Scalars = dict[str, dict[str, list[tuple[int, float]]]]  # {site: {tag: [(step, value), ...]}}


# ---------------------------------------------------------------------------------------------- reading the job
def read_tb_scalars(tb_dir: str | Path | None) -> Scalars:
    """{site: {tag: [(step, value)]}} from ``tb_events/<site>/events.out.tfevents.*`` (all files of a site; a
    step written twice keeps its last value)."""
    if tb_dir is None or not Path(tb_dir).is_dir():
        return {}
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    tb_dir = Path(tb_dir)
    runs = sorted(p for p in tb_dir.iterdir() if p.is_dir() and any(p.glob("events.out.tfevents.*")))
    if not runs and any(tb_dir.glob("events.out.tfevents.*")):
        runs = [tb_dir]
    out: Scalars = {}
    for run in runs:
        acc = EventAccumulator(str(run), size_guidance={SCALARS: 0})
        acc.Reload()
        tags = {}
        for tag in acc.Tags().get("scalars", []):
            by_step = {}
            for event in sorted(acc.Scalars(tag), key=lambda e: e.wall_time):
                by_step[int(event.step)] = float(event.value)
            tags[tag] = sorted(by_step.items())
        out[run.name] = tags
    return out


def job_meta(job_dir: Path) -> dict:
    """Name, id and status of the job from the shallowest ``meta.json`` that names a job id (else the name of the
    shallowest one: the simulator's has no id).  The copy inside ``workspace/`` was written at submission (status
    SUBMITTED), so its status is not reported."""
    first_named = {}
    for path in sorted(job_dir.rglob("meta.json"), key=lambda p: len(p.parts)):
        try:
            meta = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(meta, dict):
            continue
        if meta.get("job_id"):
            in_workspace = "workspace" in path.relative_to(job_dir).parts
            return {"name": meta.get("name"), "job_id": meta.get("job_id"),
                    "status": None if in_workspace else meta.get("status"),
                    "duration": None if in_workspace else meta.get("duration")}
        if meta.get("name") and not first_named:
            first_named = {"name": meta["name"]}
    return first_named


def best_model_selection(server_log: Path | None) -> tuple[int, float] | None:
    """(round, metric) of the last "new best validation metric" line of FLARE's IntimeModelSelector."""
    if server_log is None or not Path(server_log).is_file():
        return None
    found = None
    for m in re.finditer(r"new best validation metric at round (\d+): ([-+0-9.eE]+|nan)",
                         Path(server_log).read_text(errors="replace")):
        try:
            found = (int(m.group(1)), float(m.group(2)))
        except ValueError:
            continue
    return found


# ---------------------------------------------------------------------------------------------- the document
@dataclass
class _Doc:
    """Blocks rendered both as markdown and as HTML."""

    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def note(self, text: str):
        self.blocks.append(("note", text))

    def code(self, text: str):
        self.blocks.append(("code", text))

    def table(self, header: list[str], rows: list[list[str]]):
        self.blocks.append(("table", header, rows))

    def img(self, filename: str, alt: str):
        self.blocks.append(("img", filename, alt))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            kind = b[0]
            if kind == "h":
                out.append("#" * b[1] + " " + b[2])
            elif kind == "p":
                out.append(b[1])
            elif kind == "note":
                out.append("> **Note:** " + b[1])
            elif kind == "code":
                out.append("```\n" + b[1] + "\n```")
            elif kind == "table":
                header, rows = b[1], b[2]
                lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                lines += ["| " + " | ".join(r) + " |" for r in rows]
                out.append("\n".join(lines))
            elif kind == "img":
                out.append(f"![{b[2]}]({b[1]})")
        return "\n\n".join(out) + "\n"

    def html(self, folder: Path, title: str) -> str:
        body = []
        for b in self.blocks:
            kind = b[0]
            if kind == "h":
                body.append(f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>")
            elif kind == "p":
                body.append(f"<p>{_inline(b[1])}</p>")
            elif kind == "note":
                body.append(f'<p class="note"><b>Note:</b> {_inline(b[1])}</p>')
            elif kind == "code":
                body.append(f"<pre>{html.escape(b[1])}</pre>")
            elif kind == "table":
                head = "".join(f"<th>{_inline(c)}</th>" for c in b[1])
                rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in b[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif kind == "img":
                data = base64.b64encode((folder / b[1]).read_bytes()).decode("ascii")
                body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(b[2])}">'
                            f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
                f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


_CSS = ("body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;max-width:1100px;margin:2em auto;"
        "padding:0 1em;color:#222;line-height:1.45}table{border-collapse:collapse;margin:1em 0}"
        "th,td{border:1px solid #bbb;padding:.3em .7em;text-align:left}th{background:#f0f0f0}"
        "code,pre{background:#f5f5f5;border-radius:3px;padding:.1em .3em;font-size:90%}pre{padding:.7em}"
        "img{max-width:100%;border:1px solid #ddd}figure{margin:1.2em 0}figcaption{color:#555;font-size:90%}"
        ".note{background:#fff6d5;border-left:4px solid #e0b000;padding:.5em .8em}")


def _inline(text: str) -> str:
    """Escape for HTML; `code` and **bold** spans as in the markdown."""
    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", t)


# ---------------------------------------------------------------------------------------------- figures
def _figure(**kw):
    from matplotlib.figure import Figure  # Agg canvas, no pyplot state: safe inside other programs

    return Figure(layout="constrained", **kw)


def _site_colors(sites: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {s: cmap(i % 10) for i, s in enumerate(sorted(sites))}


def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=110, facecolor="white")
    return path.name


def plot_dice_per_round(scalars: Scalars, path: Path, best: tuple[int, float] | None = None) -> str | None:
    """Validation Dice of the global model each site received, per round, one line per site plus the mean."""
    from matplotlib.lines import Line2D

    sites = sorted(s for s in scalars if scalars[s].get("val/dice_global_model"))
    if not sites:
        return None
    colors = _site_colors(list(scalars))
    fig = _figure(figsize=(8.5, 4.6))
    ax = fig.add_subplot()
    by_round: dict[int, list[float]] = {}
    for site in sites:
        steps, values = zip(*scalars[site]["val/dice_global_model"])
        ax.plot(steps, values, marker="o", ms=4, lw=1.6, color=colors[site], label=site)
        for s, v in zip(steps, values):
            by_round.setdefault(s, []).append(v)
    rounds = sorted(by_round)
    mean = [float(np.mean(by_round[r])) for r in rounds]
    ax.plot(rounds, mean, color="black", lw=2.2, ls="--", label=f"mean over {len(sites)} site(s)")
    if best is not None:
        ax.axvline(best[0], color="grey", ls=":", lw=1.5,
                   label=f"best global model chosen\n(round {best[0]}, weighted Dice {best[1]:.3f})")
    ax.set_xlabel(ROUND_LABEL)
    ax.set_ylabel(DICE_LABEL)
    ax.set_ylim(0, 1)
    ax.set_xticks(rounds if len(rounds) <= 20 else rounds[:: max(1, len(rounds) // 10)])
    ax.grid(alpha=0.3)
    ax.set_title("Validation Dice of the global model received in each round\n"
                 "(scored by each site on its own labeled validation scans)", fontsize=11)
    handles, labels = ax.get_legend_handles_labels()
    for site in sorted(set(scalars) - set(sites)):
        handles.append(Line2D([], [], color=colors[site], ls="none"))
        labels.append(f"{site}: no labeled\nvalidation scans")
    ax.legend(handles, labels, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    return _save(fig, path)


def plot_training_curves(scalars: Scalars, path: Path) -> str | None:
    """loss, sup_loss, unsup_loss, confident_fraction per round: one subplot each, one line per site."""
    if not any(tag in tags for tags in scalars.values() for tag in TRAIN_TAGS):
        return None
    colors = _site_colors(list(scalars))
    fig = _figure(figsize=(11, 7.2))
    axes = fig.subplots(2, 2, sharex=True)
    for ax, tag in zip(axes.flat, TRAIN_TAGS):
        for site in sorted(scalars):
            points = scalars[site].get(tag)
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o", ms=3.5, lw=1.5, color=colors[site], label=site)
        ax.set_title(TRAIN_TITLES[tag], fontsize=11)
        ax.set_ylabel("fraction of voxels (0–1)" if tag.endswith("fraction") else "loss (mean per iteration)")
        if tag.endswith("fraction"):
            ax.set_ylim(0, 1.02)
        else:
            ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel(ROUND_LABEL)
        ax.xaxis.set_tick_params(labelbottom=True)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    for ax in axes.flat:  # a site may miss a tag: collect every site once
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="outside right center", frameon=False, title="site")
    fig.suptitle("Local training per site and round (0 = term not used that round: warm-up or no data of that kind)",
                 fontsize=11)
    return _save(fig, path)


def _cross_site_rows(results: Mapping[str, Mapping[str, float | None]]) -> tuple[list[str], list[str], list[str]]:
    sites = sorted(results)
    models = [m for m in GLOBAL_ROWS if any(m in results[s] for s in sites)]
    models += sorted({m for s in sites for m in results[s]} - set(GLOBAL_ROWS))
    return sites, models, [_model_label(m) for m in models]


def plot_cross_site(results: Mapping[str, Mapping[str, float | None]], path: Path) -> str | None:
    """Heat map: rows = models (global final, global best, each site's local model), columns = data sites."""
    if not results:
        return None
    sites, models, labels = _cross_site_rows(results)
    values = np.array([[np.nan if results[s].get(m) is None else float(results[s][m]) for s in sites]
                       for m in models], dtype=float)
    fig = _figure(figsize=(2.0 + 1.5 * len(sites), 1.6 + 0.55 * len(models)))
    ax = fig.add_subplot()
    im = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(sites)), sites)
    ax.set_yticks(range(len(models)), labels)
    ax.set_xlabel("data site (its held-out labeled test scans)")
    ax.set_ylabel("model")
    ax.xaxis.set_label_position("top")
    ax.xaxis.tick_top()
    for i in range(len(models)):
        for j in range(len(sites)):
            v = values[i, j]
            text = "–" if np.isnan(v) else f"{v:.3f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=10,
                    color="black" if np.isnan(v) or v > 0.55 else "white")
    ax.set_xticks(np.arange(-0.5, len(sites)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(models)), minor=True)
    ax.grid(which="minor", color="white", lw=1.5)
    ax.tick_params(which="minor", length=0)
    fig.colorbar(im, ax=ax, label="Dice, lesion class at 0.5 (0–1)", shrink=0.9)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------- overlays
def _labeled_cases(datalist_path, n: int) -> tuple[str, list[dict]]:
    from .data import load_datalist

    datalist = load_datalist(datalist_path)
    for key in ("validation", "test"):
        cases = [c for c in datalist.get(key, []) if c.get("label")]
        if cases:
            return key, cases[:n]
    return "", []


def _lesion_slice(label: np.ndarray) -> int:
    """Axial slice (last axis) with the most lesion voxels; the middle slice when there is no lesion."""
    counts = label.reshape(-1, label.shape[-1]).sum(axis=0)
    return int(np.argmax(counts)) if counts.max() > 0 else label.shape[-1] // 2


def _display(a: np.ndarray) -> np.ndarray:
    """(x, y) array of a RAS-oriented slice shown radiologically: anterior up, patient's right on the left."""
    return np.flipud(a.T)[:, ::-1]


def draw_overlay(ax, trainer, case: dict, item: dict, title_prefix: str = "") -> None:
    """One panel: the case's image (2D) or its axial slice with the most lesion (3D), the trainer's prediction
    filled in red and the ground truth outlined in green; the title gives the case's Dice (3D: over the volume)."""
    import torch
    from matplotlib.colors import ListedColormap

    from .inference import dice_at

    three_d = trainer.cfg["data"]["spatial_dims"] == 3
    show = _display if three_d else (lambda a: a)  # 2D slices (COVID-SemiSeg) are stored as rows x columns
    x = item["image"].unsqueeze(0).to(trainer.device)
    with torch.no_grad():
        pred = trainer.predict_logits(x).argmax(dim=1)[0].cpu().numpy().astype(np.uint8)
    image = np.asarray(item["image"][0].cpu().numpy(), dtype=np.float32)
    label = (np.asarray(item["label"][0].cpu().numpy()) > 0.5).astype(np.uint8)
    dice = dice_at(pred, label)
    if three_d:
        z = _lesion_slice(label)
        image, label, pred = image[..., z], label[..., z], pred[..., z]
        where = f"axial slice {z + 1}/{item['image'].shape[-1]} (most lesion)"
    else:
        where = "2D slice"
    ax.imshow(show(image), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    if pred.any():  # filled, not outlined: scattered false positives stay readable
        ax.imshow(np.ma.masked_equal(show(pred), 0), cmap=ListedColormap(["#ff2a2a"]), alpha=0.45,
                  interpolation="nearest")
    if label.any():  # on top of the prediction
        ax.contour(show(label), levels=[0.5], colors=["#00e000"], linewidths=1.8)
    name = Path(case["image"]).name.replace(".nii.gz", "").replace(".nii", "")
    ax.set_title(f"{title_prefix}{name}\n{where}, Dice {'(3D) ' if three_d else ''}{dice:.3f}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_overlay_grid(rows: Mapping[str, object], cases: list[dict], path: Path, title: str,
                      prediction_label: str) -> str:
    """One row per model (``rows``: row name -> trainer holding the model), one column per case."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from .data import evaluation_dataset

    trainers = list(rows.values())
    items = list(evaluation_dataset(trainers[0].cfg, cases))
    n, m = len(cases), len(rows)
    fig = _figure(figsize=(3.3 * n + 0.4, 4.0 * m + 0.3))
    axes = np.asarray(fig.subplots(m, n)).reshape(m, n)
    for r, (row_name, trainer) in enumerate(rows.items()):
        for ax, case, item in zip(axes[r], cases, items):
            draw_overlay(ax, trainer, case, item, title_prefix=f"{row_name}: " if m > 1 else "")
    handles = [Line2D([], [], color="#00e000", lw=1.8, label="ground truth (expert mask)"),
               Patch(facecolor=(1.0, 0.16, 0.16, 0.45), edgecolor="none", label=prediction_label)]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, frameon=False)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def plot_overlays(trainer, site: str, key: str, cases: list[dict], path: Path) -> str:
    """The final global model on a site's cases: one row of :func:`draw_overlay` panels."""
    three_d = trainer.cfg["data"]["spatial_dims"] == 3
    return plot_overlay_grid({"final global model": trainer}, cases, path,
                             prediction_label="final global model (lesion)",
                             title=f"{site}: final global model on {key} scans (preprocessed as in training; "
                                   f"{'radiological view' if three_d else 'as stored'})")


def _overlay_section(doc: _Doc, out_dir: Path, outputs: dict, job_dir: Path,
                     datalists: Mapping[str, str | Path] | None, n_overlays: int) -> list[str]:
    doc.h(2, "Predictions of the final global model")
    if not datalists:
        doc.note("No overlays: they need the sites' scans. Run the report where a site's data is, e.g. "
                 f"`fssl report {job_dir} --data SITE=/path/to/datalist.json`.")
        return []
    if n_overlays <= 0:
        doc.note("No overlays (--overlays 0).")
        return []
    model_path = outputs.get("global_model")
    cfg = job_training_config(job_dir)
    if model_path is None or cfg is None:
        missing = "FL_global_model.pt" if model_path is None else "the training configuration (config_fed_client.json)"
        doc.note(f"No overlays: {missing} is not in this job folder.")
        return []
    try:
        import torch

        from .trainer import SegmentationTrainer

        trainer = SegmentationTrainer(cfg, {})
        trainer.set_weights(torch.load(model_path, map_location="cpu", weights_only=True)["model"])
    except Exception as e:  # a report is still useful without overlays
        doc.note(f"No overlays: the final global model could not be loaded ({type(e).__name__}: {e}).")
        return []
    doc.p("Green outline: expert mask; red fill: prediction of the final global model (lesion class at 0.5). 3D scans "
          "show the axial slice with the most lesion. These images and per-case Dice values come from the site's "
          "own data: keep this report at the site.")
    written = []
    for site in sorted(datalists):
        try:
            key, cases = _labeled_cases(datalists[site], n_overlays)
            if not cases:
                doc.note(f"{site}: no labeled validation or test scans in {datalists[site]}: no overlay.")
                continue
            name = plot_overlays(trainer, site, key, cases, out_dir / f"overlay_{site}.png")
            doc.img(name, f"{site}: final global model on {len(cases)} {key} scan(s)")
            written.append(name)
        except Exception as e:
            from .data import root_cause

            doc.note(f"{site}: overlay failed ({type(e).__name__}: {root_cause(e)}).")
    return written


# ---------------------------------------------------------------------------------------------- the report
def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def build_report(job_dir: str | Path, out_dir: str | Path | None = None,
                 datalists: Mapping[str, str | Path] | None = None, n_overlays: int = 3) -> Path:
    """Write ``report.md``, ``report.html`` (self-contained) and the PNG figures; returns the HTML's path
    (``report.md`` is next to it).

    Args:
        job_dir: a downloaded job folder (``nvflare job download``) or a simulator's ``server/simulate_job``.
        out_dir: where to write (default ``<job_dir>/report``).
        datalists: ``{site: datalist.json}`` of sites whose scans may be shown here: overlays of the final global
            model's predictions on up to ``n_overlays`` labeled validation (else test) scans per site.
    """
    job_dir = Path(job_dir).resolve()
    if not job_dir.is_dir():
        raise FileNotFoundError(f"job folder {job_dir} does not exist")
    out_dir = Path(out_dir) if out_dir is not None else job_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in [*FIGURES, *out_dir.glob("overlay_*.png")]:  # an earlier report's figures this one may not write
        (out_dir / old).unlink(missing_ok=True)

    outputs = find_job_outputs(job_dir)
    if outputs["server_log"] is None and job_dir.name == "simulate_job" and (job_dir.parent / "log.txt").is_file():
        outputs["server_log"] = job_dir.parent / "log.txt"  # the simulator keeps the server log one level up
    meta = job_meta(job_dir)
    scalars = read_tb_scalars(outputs["tb_events"])
    cross = load_cross_site(outputs["cross_site"])
    best = best_model_selection(outputs["server_log"])
    steps = [s for tags in scalars.values() for pts in tags.values() for s, _ in pts]
    n_rounds = max(steps) + 1 if steps else None
    title = f"FLARE job report: {meta.get('name') or job_dir.name}"

    doc = _Doc()
    doc.h(1, title)
    summary = [["job id", f"`{meta.get('job_id') or job_dir.name}`"],
               ["job name", meta.get("name") or "unknown"],
               ["status", meta.get("status") or "unknown (no job meta.json with a status in this folder)"]]
    if meta.get("duration"):
        summary.append(["duration", str(meta["duration"])])
    summary.append(["rounds seen (TensorBoard)", str(n_rounds) if n_rounds else "unknown (no TensorBoard events)"])
    summary.append(["sites", ", ".join(sorted(set(scalars) | set(cross))) or "unknown"])
    if best is not None:
        summary.append(["best global model", f"chosen at round {best[0]} (sites' weighted validation Dice "
                                             f"{best[1]:.3f})"])
    for label, key in (("final global model", "global_model"), ("best global model file", "best_model"),
                       ("cross-site results", "cross_site"), ("TensorBoard events", "tb_events"),
                       ("server log", "server_log")):
        summary.append([label, f"`{outputs[key]}`" if outputs.get(key) else "not in this folder"])
    doc.table(["job", ""], summary)
    if outputs.get("tb_events"):
        doc.p("Open the training curves interactively with:")
        doc.code(f"tensorboard --logdir {outputs['tb_events']}")

    # per-site Dice
    doc.h(2, "Final Dice per site")
    sites = sorted(set(scalars) | set(cross))
    if sites:
        rows = []
        for site in sites:
            val = scalars.get(site, {}).get("val/dice_global_model") or []
            last = f"{val[-1][1]:.3f} (round {val[-1][0]})" if val else "– (no labeled validation scans)"
            rows.append([site, last, _fmt(cross.get(site, {}).get("SRV_FL_global_model.pt")),
                         _fmt(cross.get(site, {}).get("SRV_best_FL_global_model.pt"))])
        doc.table(["site", "validation Dice of the global model received, last round",
                   "final global model, site's test scans", "best global model, site's test scans"], rows)
    else:
        doc.note("No per-site metrics: this folder has neither TensorBoard events nor cross-site results.")

    # validation Dice per round
    doc.h(2, "Validation Dice of the global model per round")
    if not scalars:
        doc.note("No TensorBoard events in this job folder (`tb_events/`): the job streamed no curves (executor "
                 "argument `analytics_writer_id` empty, or no `TBAnalyticsReceiver` on the server), or the folder "
                 "is not a complete download. Dice-per-round and training-curve figures are skipped.")
    else:
        name = plot_dice_per_round(scalars, out_dir / "dice_per_round.png", best)
        if name:
            doc.p("Each site scores the global model it receives at the start of a round on its own labeled "
                  "validation scans (`val/dice_global_model`); the dashed line is the plain mean over sites.")
            doc.img(name, "Validation Dice of the received global model per round and site")
        else:
            doc.note("No site sent `val/dice_global_model` (no site has labeled validation scans).")
        without = sorted(s for s in scalars if not scalars[s].get("val/dice_global_model"))
        if name and without:
            doc.note(f"No validation Dice from {', '.join(without)}: no labeled validation scans there.")

        doc.h(2, "Training curves per site")
        name = plot_training_curves(scalars, out_dir / "training_curves.png")
        if name:
            doc.img(name, "Local training losses and confident fraction per round and site")
        else:
            doc.note("The TensorBoard events hold no training curves (`train/*` tags).")

    # cross-site
    doc.h(2, "Cross-site evaluation")
    if not cross:
        doc.note("No cross-site results (`cross_site_val/cross_val_results.json`) in this job folder: the job has no "
                 "CrossSiteModelEval workflow, or it did not finish.")
    else:
        doc.p("Rows: models; columns: the site whose held-out labeled test scans score them (Dice of the lesion "
              "class at 0.5; '–': not scored). The empty-mask baseline (predicting no lesion) scores 0.")
        sites_x, models_x, labels_x = _cross_site_rows(cross)
        rows = [[label] + [_fmt(cross[s].get(m)) for s in sites_x] for m, label in zip(models_x, labels_x)]
        rows.append(["empty-mask baseline"] + ["0.000"] * len(sites_x))
        doc.table(["model \\ data"] + sites_x, rows)
        name = plot_cross_site(cross, out_dir / "cross_site.png")
        if name:
            doc.img(name, "Cross-site Dice: models (rows) scored on each site's test scans (columns)")

    _overlay_section(doc, out_dir, outputs, job_dir, datalists, n_overlays)

    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text(doc.markdown())
    html_path.write_text(doc.html(out_dir, title))
    return html_path
