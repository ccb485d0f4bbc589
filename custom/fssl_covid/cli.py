"""``fssl``: the command line of the learner library (no FLARE needed).

    fssl synth     make the synthetic multi-site CT federation (built-in demo and test data)
    fssl train     local training of one site, or centralized training on pooled datalists
    fssl evaluate  Dice of a checkpoint on a datalist
    fssl predict   lesion masks (or probabilities) on the input's own grid
    fssl site-config  write a site's settings (data location, device) into its FLARE startup kit
    fssl validate-data  check a site's datalist and every file in it; lists every problem at once
    fssl report    figures and tables of a finished FLARE job (markdown + self-contained HTML)
    fssl watch     follow a running job: round, which sites reported, each site's loss and Dice (admin API)
    fssl experiment  run a study (methods x sites matrix): synthetic3d (Study A) or real2d (Study B)
    fssl job       a submittable copy of a job in jobs/ with other rounds, settings or a warm-start model
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from .config import PRESETS_DIR, config_path
from .jobs import PRIVACY_FILTERS

CHECKPOINT_CONFIG_HELP = ("for checkpoints that carry no config: a config JSON, a preset name, or the FLARE job's "
                          "folder / config_fed_client.json (not needed for a downloaded job's "
                          "app_server/FL_global_model.pt: the job's config beside it is used)")


def _presets() -> str:
    return ", ".join(sorted(p.stem for p in PRESETS_DIR.glob("*.json")))


def _pooled(datalists: list[str], data_root: str | None) -> dict:
    from .data import load_datalist

    pooled: dict[str, list] = {}
    for path in datalists:
        for key, cases in load_datalist(path, data_root).items():
            pooled.setdefault(key, []).extend(cases)
    return pooled


def cmd_synth(args) -> int:
    from .synthetic import make_federation

    t0 = time.time()
    paths = make_federation(args.out, seed=args.seed, mosmed_dir=args.mosmed)
    for site, datalist in paths.items():
        print(f"{site}: {datalist}")
    print(f"synthetic federation written to {Path(args.out).resolve()} in {time.time() - t0:.1f} s "
          "(synthetic CT, not patient data)")
    return 0


def cmd_train(args) -> int:
    from .config import load_config
    from .trainer import SegmentationTrainer

    cfg = load_config(config_path(args.config))
    if args.supervised:
        cfg["ssl"]["enabled"] = False
    if args.epochs is not None:
        cfg["train"]["epochs"] = args.epochs
    if args.seed is not None:
        cfg["train"]["seed"] = args.seed
    data = _pooled(args.datalist, args.data_root)
    if args.validation_datalist:
        data["validation"] = _pooled([args.validation_datalist], None).get("validation", [])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trainer = SegmentationTrainer(cfg, data, device=args.device)
    print(f"training on {len(trainer.labeled_cases)} labeled, {len(trainer.unlabeled_cases)} unlabeled, "
          f"{len(trainer.validation_cases)} validation cases, device {trainer.device}")
    t0 = time.time()

    def report(epoch, stats, metrics):
        dice = "-" if metrics is None else f"{metrics['val_dice']:.4f}"
        print(f"epoch {epoch:3d}  loss {stats['loss']:.4f}  sup {stats['sup_loss']:.4f}  "
              f"unsup {stats['unsup_loss']:.4f}  val_dice {dice}  ({time.time() - t0:.0f} s)", flush=True)

    result = trainer.fit(on_epoch=report)
    trainer.save_checkpoint(out / "model_final.pt")
    if trainer.best_weights is not None:
        trainer.save_checkpoint(out / "model_best.pt", weights=trainer.best_weights)
    if result["averaged_epochs"]:
        trainer.save_checkpoint(out / "model_last.pt", weights=trainer.last_weights)
        print(f"final model: the average of the last {result['averaged_epochs']} epochs' models "
              f"(model_last.pt: the last epoch's own)")
    (out / "history.json").write_text(json.dumps({**result, "config": trainer.cfg}, indent=1))
    print(f"final val_dice {result['final_val_dice']}, best {result['best_val_dice']}; "
          f"checkpoints and history.json in {out}")
    return 0


def _trainer_for(model: str, config: str | None, device: str | None):
    from .config import load_config
    from .trainer import SegmentationTrainer, load_checkpoint

    state, cfg = load_checkpoint(model, load_config(config_path(config)) if config else None)
    trainer = SegmentationTrainer(cfg, {}, device=device)
    trainer.set_weights(state)
    return trainer


def cmd_evaluate(args) -> int:
    from .data import load_datalist
    from .inference import score_cases

    trainer = _trainer_for(args.model, args.config, args.device)
    cases = load_datalist(args.datalist, args.data_root)[args.key]
    if not cases:
        print(f"error: datalist {args.datalist} has no '{args.key}' cases", file=sys.stderr)
        return 2
    print(json.dumps(score_cases(trainer, cases)))
    return 0


def cmd_predict(args) -> int:
    from .inference import PICTURE_SUFFIXES, predict_files

    images: list[Path] = []
    for item in map(Path, args.input):
        if item.is_dir():
            images.extend(sorted(p for p in item.iterdir()
                                 if p.name.endswith((".nii", ".nii.gz")) or p.suffix.lower() in PICTURE_SUFFIXES))
        elif item.is_file():
            images.append(item)
        else:
            print(f"error: input {item} does not exist", file=sys.stderr)
            return 2
    if not images:
        print("error: no images (NIfTI, or PNG / JPEG / BMP / TIFF pictures for a 2D model) in the inputs",
              file=sys.stderr)
        return 2
    trainer = _trainer_for(args.model, args.config, args.device)
    failed: list[Path] = []
    done = 0

    def skip(path: Path, problem: str) -> None:  # one bad scan does not cost the others their predictions
        nonlocal done
        failed.append(path)
        done += 1
        print(f"[{done}/{len(images)}] error: {problem} (skipped)", file=sys.stderr, flush=True)

    def wrote(path: Path, target: Path) -> None:  # progress: a folder of CT volumes takes minutes
        nonlocal done
        done += 1
        print(f"[{done}/{len(images)}] {path} -> {target}", flush=True)

    written = predict_files(trainer, images, args.out, probabilities=args.probabilities, threshold=args.threshold,
                            on_error=skip, on_written=wrote)
    print(f"wrote {len(written)} {'probability maps' if args.probabilities else 'masks'} to {Path(args.out).resolve()}")
    if failed:
        print(f"error: {len(failed)} of {len(images)} inputs could not be predicted (listed above); the other "
              f"{len(written)} were written", file=sys.stderr)
        return 1
    return 0


def cmd_site_config(args) -> int:
    from .site_settings import SETTINGS_FILE, SiteSettingsError, write_settings

    explicit = {k: v for k, v in (("datalist", args.datalist), ("data_root", args.data_root),
                                  ("device", args.device), ("num_threads", args.num_threads),
                                  ("eval_key", args.eval_key)) if v is not None}
    if args.from_dir:
        source = Path(args.from_dir) / "local" / SETTINGS_FILE
        if not source.is_file():
            source = Path(args.from_dir) / SETTINGS_FILE
        if not source.is_file():
            raise SiteSettingsError(f"--from {args.from_dir}: no {SETTINGS_FILE} in it or in its local/ folder")
        try:
            settings = json.loads(source.read_text())
        except json.JSONDecodeError as e:
            raise SiteSettingsError(f"{source} is not valid JSON: {e}") from e
        clash = sorted(k for k in explicit if k in settings and settings[k] not in (None, explicit[k]))
        if clash:
            raise SiteSettingsError(f"--from {source} and the command line disagree on {clash}: give one or the other")
        settings.update(explicit)
        base = source.parent
        for key in ("datalist", "data_root"):  # relative paths in the source are relative to it
            if settings.get(key) and not Path(os.path.expandvars(settings[key])).is_absolute():
                settings[key] = str(base / os.path.expandvars(settings[key]))
    else:
        settings = explicit
    if not settings.get("datalist"):
        raise SiteSettingsError("a datalist is required: --datalist PATH or --from site_configs/<site>")
    target = write_settings(args.kit, settings)
    print(f"wrote {target}:\n{target.read_text()}")
    return 0


def cmd_validate_data(args) -> int:
    from .site_settings import SETTINGS_FILE, read_settings
    from .validation import validate_datalist

    if args.settings:
        if args.data_root:
            raise ValueError("--data-root goes with --datalist; with --settings the site's data_root is used")
        source = Path(args.settings)
        if source.is_dir():  # a kit, or its local/ folder
            source = next((p for p in (source / "local" / SETTINGS_FILE, source / SETTINGS_FILE) if p.is_file()),
                          source / "local" / SETTINGS_FILE)
        settings = read_settings(source, check_files=False)  # a missing datalist or data root is reported below
        datalist, data_root = settings.datalist, settings.data_root
    else:
        datalist, data_root = args.datalist, args.data_root
    report = validate_datalist(datalist, data_root, spatial_dims=args.spatial_dims, expect_hu=not args.no_hu)
    for problem in report.problems:
        print(problem)
    print(f"{datalist}: {report.summary()}")
    return 1 if report.fatal else 0


def cmd_experiment(args) -> int:
    from .experiment import main_experiment

    settings = _dotted_settings(args.set, "--set", "SECTION.KEY=VALUE", "train.iterations_per_epoch=40")
    main_experiment(args.study, args.out, quick=args.quick, device=args.device, methods=args.methods,
                    seeds=args.seeds, data=args.data, epochs=args.epochs, settings=settings,
                    labeled_weight=args.labeled_weight, labels_per_site=args.labels_per_site, poc=args.poc,
                    jobs=args.jobs, fold=args.fold, sites=args.sites)
    return 0


def cmd_report(args) -> int:
    from .report import build_report

    datalists = {}
    for item in args.data or []:
        site, sep, path = item.partition("=")
        if not sep or not site or not path:
            raise ValueError(f"--data {item!r}: expected SITE=/path/to/datalist.json")
        if not Path(path).is_file():
            raise FileNotFoundError(f"--data {item}: datalist {path} does not exist")
        datalists[site] = path
    html_path = build_report(args.job_dir, out_dir=args.out, datalists=datalists or None, n_overlays=args.overlays)
    print(f"report (HTML, self-contained): {html_path}")
    print(f"report (markdown + PNG figures): {html_path.with_name('report.md')}")
    return 0


def cmd_watch(args) -> int:
    from nvflare.fuel.flare_api.flare_api import new_secure_session

    from .progress import watch

    kit = Path(args.kit)
    if not (kit / "startup").is_dir():
        raise FileNotFoundError(f"--kit {kit}: not an admin startup kit (no startup/ folder in it)")
    user = args.user or kit.name
    session = new_secure_session(user, str(kit), timeout=args.connect_timeout)
    try:
        status = watch(session, args.job_id, interval=args.interval, once=args.once)
    finally:
        session.close()
    return 0 if args.once or status.startswith("FINISHED") else 1


def _dotted_settings(items: list[str] | None, flag: str, form: str, example: str, depth: int | None = None) -> dict:
    """``A.B=VALUE`` arguments as a nested dict; VALUE is JSON when it parses (else a string).  ``depth``: the
    exact number of dotted parts a key must have (None: at least two)."""
    out: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        parts = key.split(".")
        if not sep or len(parts) < 2 or not all(parts) or (depth is not None and len(parts) != depth):
            raise ValueError(f"{flag} {item!r}: expected {form}, e.g. {example}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = parsed
    return out


def cmd_job(args) -> int:
    from .jobs import customize_job

    config = _dotted_settings(args.set, "--set", "SECTION.KEY=VALUE", "train.lr=0.003")
    if config:
        from .config import resolve_config

        resolve_config(config)  # unknown keys and bad values fail here, not at the sites
    privacy_args = _dotted_settings(args.privacy_set, "--privacy-set", "FILTER.ARG=VALUE", "percentile.gamma=0.02",
                                    depth=2)
    job = customize_job(args.name, Path(args.out), rounds=args.rounds, config=config, min_clients=args.min_clients,
                        job_name=args.job_name, init_model=args.init_model, privacy=args.privacy,
                        privacy_args=privacy_args, average_last_rounds=args.average_last_rounds)
    print(f"job written: {job}")
    print(f"submit it with: nvflare job submit -j {job}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fssl", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write the synthetic multi-site CT federation (china, italy, japan)",
                       description="Write synthetic 3D chest CT volumes (HU) with COVID-like lesions and one "
                                   "datalist per site. Synthetic data, not patient data.")
    p.add_argument("--out", required=True, help="output folder (one subfolder per site)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mosmed", default=None, help="optional folder of real 3D lesion masks (MosMedData "
                                                  "study_*_mask.nii.gz) used as lesion shapes; only read")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("train", help="local training of one site, or centralized training on pooled datalists",
                       description="Train on one datalist (local) or several (pooled = centralized). "
                                   "Semi-supervised unless --supervised. Writes model_final.pt, model_best.pt "
                                   "and history.json to --out.")
    p.add_argument("--datalist", action="append", required=True, help="datalist JSON; repeat to pool sites")
    p.add_argument("--data-root", default=None, help="root of relative paths (default: the datalist's folder)")
    p.add_argument("--validation-datalist", default=None, help="take 'validation' cases from this datalist only")
    p.add_argument("--config", default=None, help=f"config JSON, or a preset name ({_presets()})")
    p.add_argument("--supervised", action="store_true", help="ignore unlabeled data (ssl.enabled = false)")
    p.add_argument("--epochs", type=int, default=None, help="override train.epochs")
    p.add_argument("--seed", type=int, default=None, help="override train.seed")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="Dice of a checkpoint on a datalist",
                       description="Print {'dice', 'mean_dice_256', 'n'} of a checkpoint on one key of a "
                                   "datalist: Dice at 0.5 and averaged over 256 thresholds, per scan on its own "
                                   "grid (as fssl predict writes it), averaged over scans.")
    p.add_argument("--model", required=True, help="checkpoint (.pt) from fssl train or a FLARE job")
    p.add_argument("--config", default=None, help=CHECKPOINT_CONFIG_HELP)
    p.add_argument("--datalist", required=True)
    p.add_argument("--data-root", default=None)
    p.add_argument("--key", default="validation", choices=["training", "validation", "test"])
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="write lesion masks (or probabilities) on the input's own grid",
                       description="For every input NIfTI, write a NIfTI with the same shape, affine and file "
                                   "name into --out: a 0/1 mask, or the lesion probability with --probabilities. "
                                   "A 2D model also takes pictures (PNG, JPEG, BMP, TIFF): it writes <name>.png of "
                                   "the same size, a 0/255 mask or the probability in 8 bits (round(255 p)).")
    p.add_argument("--model", required=True, help="checkpoint (.pt)")
    p.add_argument("--config", default=None, help=CHECKPOINT_CONFIG_HELP)
    p.add_argument("--input", nargs="+", required=True, help="NIfTI files (or pictures for a 2D model) or folders")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--probabilities", action="store_true", help="write float lesion probabilities")
    p.add_argument("--threshold", type=float, default=None, help="mask threshold (default inference.threshold)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("site-config", help="write a site's settings into its FLARE startup kit",
                       description="Validate and write <kit>/local/fssl_site.json (data location, device, threads). "
                                   "Values come from --from site_configs/<site> and/or the options; contradictory, "
                                   "missing or non-existent values are refused. ${VAR} is expanded.")
    p.add_argument("--kit", required=True, help="the site's startup kit folder (holds startup/ and local/)")
    p.add_argument("--from", dest="from_dir", default=None, help="a site_configs/<site> folder to take settings from")
    p.add_argument("--datalist", default=None, help="the site's datalist JSON")
    p.add_argument("--data-root", default=None, help="root of the datalist's relative paths")
    p.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")
    p.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (0: default)")
    p.add_argument("--eval-key", default=None, choices=["auto", "test", "validation"],
                   help="cases scored in cross-site evaluation")
    p.set_defaults(func=cmd_site_config)

    p = sub.add_parser("experiment", help="run a study: a matrix of methods, one results folder",
                       description="Study A (synthetic3d): synthetic 3D CT, cross-site matrix. Study B (real2d): real "
                                   "COVID-SemiSeg slices from ../shared/data/covid_semiseg. Writes results.json, "
                                   "results.md, PNG plots and per-method checkpoints. Federated methods run in "
                                   "FLARE's simulator (or, with --poc, in POC mode).")
    p.add_argument("study", choices=["synthetic3d", "real2d"])
    p.add_argument("--out", required=True, help="results folder")
    p.add_argument("--quick", action="store_true", help="tiny network and budget: a smoke run of a few minutes")
    p.add_argument("--methods", nargs="+", default=None, help="subset of methods (default: the study's matrix); also fssl_weight_diff, fssl_percentile, fssl_svt, fssl_exclude_vars (privacy filters, docs/privacy.md)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="seeds (default: 0)")
    p.add_argument("--epochs", type=int, default=None, help="override the budget (total local epochs)")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="training setting of every method, JSON value, applied after the study's preset and "
                        "--quick; repeatable. A GPU run, e.g.: --device cuda --set train.iterations_per_epoch=40 "
                        "--set 'network.channels=[32,64,128,256,512]'")
    p.add_argument("--labeled-weight", type=float, default=None,
                   help="federated methods' labeled_weight (study default: synthetic3d the job's 2, real2d 20)")
    p.add_argument("--poc", action="store_true",
                   help="run the federated methods in FLARE's POC mode (a real server and one client process per "
                        "site on this machine, port 8002) instead of the simulator")
    p.add_argument("--labels-per-site", default=None, metavar="N|all",
                   help="masks kept per labeled site, the other training scans train unlabeled (default all; "
                        "synthetic3d: china 6, italy 4; real2d: italy 40 of 50, the rest its validation fold)")
    p.add_argument("--sites", nargs="+", default=None, metavar="SITE",
                   help="run the study on these of its sites only (default all; synthetic3d: china italy japan, "
                        "real2d: italy coronacases radiopaedia); one site with masks must be among them")
    p.add_argument("--data", default=None, help="real2d: the covid_semiseg folder; synthetic3d: MosMed masks folder")
    p.add_argument("--fold", type=int, default=None, metavar="K",
                   help="real2d: which fold of italy's labeled slices is the validation split (default 0, the "
                        "study's split; 0-4: five disjoint folds of 10 slices, for cross-validation)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="train N cells (method x seed) side by side, each in its own process with one torch thread "
                        "(train.num_threads): 2 fits 2 CPU cores; not with --poc")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("validate-data", help="check a site's datalist and every file in it",
                       description="Check a datalist and every image and label it lists (readable NIfTI, shapes "
                                   "and affines, label values, NaN, plausible HU, 2D/3D) and print every problem "
                                   "(file: problem) and a summary. Exit status 1 if any problem is fatal (a case "
                                   "or the datalist cannot be used), 0 otherwise (warnings only).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--settings", default=None, help="a site's <kit>/local/fssl_site.json (or the kit folder)")
    src.add_argument("--datalist", default=None, help="a datalist JSON")
    p.add_argument("--data-root", default=None, help="root of the datalist's relative paths (with --datalist)")
    p.add_argument("--spatial-dims", type=int, default=3, choices=[2, 3],
                   help="3 for CT volumes (default), 2 for single slices")
    p.add_argument("--no-hu", action="store_true",
                   help="images are display intensities (e.g. 0..255), not Hounsfield units")
    p.set_defaults(func=cmd_validate_data)

    p = sub.add_parser("job", help="a submittable copy of a job with other rounds, settings or a warm start",
                       description="Copy jobs/NAME (code included, no links) to OUT/NAME, optionally with another "
                                   "number of rounds, minimum number of sites, training settings, or a warm start "
                                   "from an earlier job's global model (the checkpoint travels inside the job; its "
                                   "shapes are checked against the job's network first).")
    p.add_argument("name", help="a job folder in jobs/ (fssl_covid_seg, fedavg_supervised)")
    p.add_argument("--out", required=True, help="folder to write the job into")
    p.add_argument("--job-name", default=None, help="name of the written job (default NAME)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--min-clients", type=int, default=None)
    p.add_argument("--average-last-rounds", type=int, default=None, metavar="N",
                   help="the final global model is the average of the last N rounds' global models (0: the last "
                        "round's; the job's setting when not given)")
    p.add_argument("--init-model", default=None, metavar="CHECKPOINT",
                   help="warm start: e.g. <downloaded job>/workspace/app_server/FL_global_model.pt")
    p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="training setting for the sites, JSON value (e.g. ssl.warmup_epochs=0); repeatable")
    p.add_argument("--privacy", action="append", choices=sorted(PRIVACY_FILTERS), metavar="FILTER",
                   help="add FLARE's privacy filter on every site's train results: "
                        + ", ".join(f"{k} ({v[0].rsplit('.', 1)[1]})" for k, v in sorted(PRIVACY_FILTERS.items()))
                        + "; repeatable (chained in order). Sites then send updates (WEIGHT_DIFF). "
                          "See docs/privacy.md for what each costs")
    p.add_argument("--privacy-set", action="append", metavar="FILTER.ARG=VALUE",
                   help="a privacy filter argument, JSON value (e.g. percentile.percentile=50); repeatable")
    p.set_defaults(func=cmd_job)

    p = sub.add_parser("report", help="figures and tables of a finished FLARE job (markdown + self-contained HTML)",
                       description="Read a downloaded (nvflare job download) or simulated job folder and write "
                                   "report.md, report.html (figures embedded) and PNG figures: validation Dice per "
                                   "round, per-site training curves (from the job's TensorBoard events), the "
                                   "cross-site Dice matrix and, with --data, the final global model's predictions "
                                   "on a few labeled scans of those sites (keep such a report at the site).")
    p.add_argument("job_dir", metavar="JOB_DIR", help="downloaded job folder, or a simulator's server/simulate_job")
    p.add_argument("--out", default=None, help="output folder (default JOB_DIR/report)")
    p.add_argument("--data", action="append", metavar="SITE=DATALIST",
                   help="a site's datalist JSON for prediction overlays; repeat per site")
    p.add_argument("--overlays", type=int, default=3, metavar="N", help="labeled scans shown per site (default 3)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("watch", help="follow a running job: round, sites' updates, each site's loss and Dice",
                       description="Follow a job through FLARE's admin API (what `show_stats JOB_ID server` shows in "
                                   "the console, read by the jobs' JobProgress component): the round, which sites' "
                                   "updates arrived this round and whether the aggregator accepted them, and each "
                                   "site's latest streamed training loss and validation Dice. Prints when something "
                                   "changes, until the job ends (exit 0 when it FINISHED).")
    p.add_argument("job_id")
    p.add_argument("--kit", required=True, help="your admin startup kit folder (e.g. .../admin@nvidia.com)")
    p.add_argument("--user", default=None, help="your admin user name (default: the kit folder's name)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between polls (default 10)")
    p.add_argument("--once", action="store_true", help="print the current state once and exit")
    p.add_argument("--connect-timeout", type=float, default=30.0)
    p.set_defaults(func=cmd_watch)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as e:  # DataError and ConfigError are ValueErrors
        from .data import root_cause

        print(f"error: {root_cause(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
