"""Site-owned settings: where a hospital's data is and how its machine trains.

They live in the site's startup kit, ``<kit>/local/fssl_site.json``, never in a job (jobs are the same for every
site and travel through the server).  Example::

    {
      "datalist": "/data/covid_ct/datalist.json",   # decathlon-style datalist (absolute, or relative to this file)
      "data_root": null,                             # root of the datalist's relative paths (default: its folder)
      "device": "auto",                              # auto | cpu | cuda | cuda:N
      "num_threads": 0,                              # torch CPU threads (0: torch's default)
      "eval_key": "auto",                            # cross-site evaluation cases: auto = test, else validation
      "on_bad_case": "skip"                          # unusable case (corrupt file, NaN, wrong shape...): skip it with a
    }                                                # warning in the site log, or "stop" the site naming the file

Check a site's data beforehand with ``fssl validate-data --settings <kit>/local/fssl_site.json``.

String values may use environment variables (``${FSSL_DATA_DIR}/china/datalist.json``).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

SETTINGS_FILE = "fssl_site.json"
FALLBACK_ENV = "FSSL_SITE_CONFIGS"  # a folder laid out like site_configs/: <site>/local/fssl_site.json


class SiteSettingsError(ValueError):
    """The site's settings file is missing or wrong; the message names the file."""


@dataclass
class SiteSettings:
    datalist: str
    data_root: str | None = None
    device: str = "auto"
    num_threads: int = 0
    eval_key: str = "auto"
    on_bad_case: str = "skip"  # "skip" | "stop" (see fssl_covid.validation.usable_cases)
    source: str = ""  # the file these settings came from

    def public(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "source"}


_KEYS = {"datalist", "data_root", "device", "num_threads", "eval_key", "on_bad_case"}


def settings_candidates(site_config_dir: str | Path | None, site_name: str) -> list[Path]:
    """Where the settings are looked for, in order: the kit's ``local/``, then ``$FSSL_SITE_CONFIGS/<site>/local/``."""
    out = []
    if site_config_dir:
        out.append(Path(site_config_dir) / SETTINGS_FILE)
    if os.environ.get(FALLBACK_ENV):
        out.append(Path(os.environ[FALLBACK_ENV]) / site_name / "local" / SETTINGS_FILE)
    return out


def find_settings(site_config_dir: str | Path | None, site_name: str) -> SiteSettings:
    candidates = settings_candidates(site_config_dir, site_name)
    for path in candidates:
        if path.is_file():
            return read_settings(path)
    tried = ", ".join(str(p) for p in candidates) or "(no site config folder known)"
    raise SiteSettingsError(f"site '{site_name}' has no {SETTINGS_FILE}: looked for {tried}. Write one with "
                            f"`fssl site-config` (see site_configs/README.md)")


def read_settings(path: str | Path, check_files: bool = True) -> SiteSettings:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise SiteSettingsError(f"site settings file {path} does not exist") from e
    except json.JSONDecodeError as e:
        raise SiteSettingsError(f"site settings file {path} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise SiteSettingsError(f"site settings file {path} must hold a JSON object")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise SiteSettingsError(f"site settings file {path}: unknown keys {unknown} (known: {sorted(_KEYS)})")
    if not raw.get("datalist"):
        raise SiteSettingsError(f"site settings file {path}: 'datalist' is required")
    s = SiteSettings(**raw, source=str(path))
    s.datalist = _resolve(s.datalist, path, "datalist")
    if s.data_root:
        s.data_root = _resolve(s.data_root, path, "data_root")
    if s.eval_key not in ("auto", "test", "validation"):
        raise SiteSettingsError(f"site settings file {path}: eval_key must be auto, test or validation")
    if s.on_bad_case not in ("skip", "stop"):
        raise SiteSettingsError(f"site settings file {path}: on_bad_case must be skip or stop")
    if check_files:
        if not Path(s.datalist).is_file():
            raise SiteSettingsError(f"site settings file {path}: datalist {s.datalist} does not exist")
        if s.data_root and not Path(s.data_root).is_dir():
            raise SiteSettingsError(f"site settings file {path}: data_root {s.data_root} does not exist")
    return s


def _resolve(value: str, settings_file: Path, key: str) -> str:
    expanded = os.path.expandvars(str(value))
    if "$" in expanded:
        raise SiteSettingsError(f"site settings file {settings_file}: {key} '{value}' uses an unset environment variable")
    p = Path(expanded).expanduser()
    if not p.is_absolute():
        p = settings_file.parent / p
    return str(p.resolve())


def write_settings(kit_dir: str | Path, settings: dict) -> Path:
    """Validate ``settings`` and write them into ``<kit_dir>/local/fssl_site.json`` (paths made absolute)."""
    kit = Path(kit_dir)
    if not (kit / "startup").is_dir() and not (kit / "local").is_dir():
        raise SiteSettingsError(f"{kit} is not a startup kit (no startup/ or local/ folder)")
    local = kit / "local"
    local.mkdir(exist_ok=True)
    target = local / SETTINGS_FILE
    tmp = local / (SETTINGS_FILE + ".new")
    tmp.write_text(json.dumps(settings, indent=2))
    try:
        resolved = read_settings(tmp)
    except SiteSettingsError as e:
        tmp.unlink()
        raise SiteSettingsError(str(e).replace(str(tmp), str(target))) from None
    tmp.write_text(json.dumps(resolved.public(), indent=2) + "\n")
    tmp.replace(target)
    return target
