#!/usr/bin/env python3
"""Run the whole federated demo on this machine with real FLARE processes (POC mode).

    python poc/run_demo.py [--baseline] [--job DIR ...] [--sites china italy japan]

1. make the synthetic sites (``fssl synth``; seeded, synthetic CT, not patient data)
2. ``nvflare poc prepare -c china italy japan`` and write each site's settings into its kit's ``local/``
3. ``nvflare poc start``, submit the FSSL job (and the supervised FedAvg baseline with ``--baseline``)
4. follow each job until it finishes, ``nvflare job download`` its results
5. print the cross-site Dice table and where the models, logs and TensorBoard events are
6. ``nvflare poc stop`` and ``nvflare poc clean`` - also when interrupted or when a step fails.

Everything FLARE writes (POC workspace, ~/.nvflare config, temp files) stays in ``.work/`` inside the project.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "custom"))

from fssl_covid.progress import job_progress_lines  # noqa: E402
from fssl_covid.results import cross_site_table, find_job_outputs  # noqa: E402
from fssl_covid.site_settings import write_settings  # noqa: E402

DEFAULT_SITES = ["china", "italy", "japan"]


class DemoError(RuntimeError):
    pass


class Poc:
    """The nvflare CLI with FLARE's state kept under ``work``."""

    def __init__(self, work: Path, verbose: bool = False):
        self.work = work
        self.verbose = verbose
        self.env = dict(os.environ)
        bindir = str(Path(sys.executable).parent)
        self.env.update({
            "HOME": str(work / "home"),
            "TMPDIR": str(work / "tmp"),
            "NVFLARE_POC_WORKSPACE": str(work / "poc_workspace"),
            "PATH": bindir + os.pathsep + self.env.get("PATH", ""),
            "PYTHONUNBUFFERED": "1",
        })
        for key in ("HOME", "TMPDIR"):
            Path(self.env[key]).mkdir(parents=True, exist_ok=True)
        self.nvflare = shutil.which("nvflare", path=self.env["PATH"]) or "nvflare"
        self.started = False
        self._session = None

    @property
    def kits(self) -> Path:
        return Path(self.env["NVFLARE_POC_WORKSPACE"]) / "example_project" / "prod_00"

    def run(self, *args: str, check: bool = True, json_out: bool = False, timeout: float | None = 600,
            quiet: bool = False) -> str | dict:
        cmd = [self.nvflare] + (["--format", "json"] if json_out else []) + list(args)
        if not quiet or self.verbose:
            print(f"$ nvflare {' '.join(cmd[1:])}", flush=True)
        proc = subprocess.run(cmd, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if self.verbose or (check and proc.returncode != 0):
            sys.stdout.write(proc.stdout[-4000:])
            sys.stderr.write(proc.stderr[-4000:])
        if check and proc.returncode != 0:
            raise DemoError(f"`nvflare {' '.join(args)}` failed with exit code {proc.returncode}")
        if json_out:
            return _last_json(proc.stdout)
        return proc.stdout

    def prepare(self, sites: list[str]) -> None:
        self.run("poc", "prepare", "-c", *sites, "--force")

    def start(self, site: str | None = None, ready_timeout: int = 180) -> None:
        """``nvflare poc start`` (one participant with ``site``), waiting up to ``ready_timeout`` s for readiness
        (FLARE's default, 30 s, is short for a busy machine)."""
        if site is None:
            self.check_port_free()
        self.started = True
        self.run("poc", "start", *(["-p", site] if site else []), "--timeout", str(ready_timeout),
                 timeout=ready_timeout + 120)

    def job_meta(self, job_id: str) -> dict:
        """The job's meta data through one admin API session kept open (each ``nvflare job meta`` would be a new
        Python process taking a CPU second from the sites); the CLI when the session cannot be opened."""
        if self._session is None:
            try:
                from nvflare.fuel.flare_api.flare_api import new_secure_session

                self._session = new_secure_session("admin@nvidia.com", str(self.kits / "admin@nvidia.com"),
                                                   timeout=30)
            except Exception as e:  # noqa: BLE001 - the CLI below works without it
                if self.verbose:
                    print(f"admin API session unavailable ({type(e).__name__}: {e}); using the CLI")
                self._session = False
        if self._session:
            try:
                return self._session.get_job_meta(job_id) or {}
            except Exception:  # noqa: BLE001 - e.g. the server restarting: ask the CLI this time
                pass
        meta = self.run("job", "meta", job_id, json_out=True, check=False, timeout=60, quiet=True)
        return meta.get("data", {}) if isinstance(meta, dict) else {}

    def close_session(self) -> None:
        if self._session:
            try:
                self._session.close()
            except Exception:  # noqa: BLE001 - closing a session to a stopped server
                pass
        self._session = None

    def server_port(self) -> int:
        """The port the prepared POC server listens on (FLARE's default 8002), from its startup kit."""
        fed_server = self.kits / "server" / "startup" / "fed_server.json"
        try:
            target = json.loads(fed_server.read_text())["servers"][0]["service"]["target"]
            return int(str(target).rsplit(":", 1)[1])
        except (OSError, KeyError, IndexError, ValueError, json.JSONDecodeError):
            return 8002

    def check_port_free(self) -> None:
        """Refuse to start when the server's port is taken (an earlier POC left running, another service): FLARE's
        server would retry binding forever and ``poc start`` would only report an unreachable server."""
        port = self.server_port()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            if probe.connect_ex(("127.0.0.1", port)) != 0:
                return
        holder = ""
        try:
            for conn in psutil.net_connections(kind="tcp"):
                if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN and conn.pid:
                    proc = psutil.Process(conn.pid)
                    holder = f" by process {conn.pid} ({' '.join(proc.cmdline())[:300]})"
                    break
        except (psutil.Error, OSError):
            pass
        raise DemoError(f"port {port}, which the POC server needs, is already in use{holder}. Stop that process "
                        f"(an earlier POC: `nvflare poc stop` with its NVFLARE_POC_WORKSPACE) and run again.")

    def _own_processes(self) -> list:
        """Processes started from this POC workspace that are still alive."""
        workspace = str(Path(self.env["NVFLARE_POC_WORKSPACE"]))
        own = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if workspace in " ".join(proc.info["cmdline"] or []):
                    own.append(proc)
            except psutil.Error:
                continue
        return own

    def stop_and_clean(self) -> None:
        self.close_session()
        if not self.started:
            return
        self.run("poc", "stop", check=False, timeout=120)
        deadline = time.time() + 60
        while self._own_processes() and time.time() < deadline:
            time.sleep(2)
        leftovers = self._own_processes()
        if leftovers:  # `poc stop` could not reach them (e.g. a server that never came up): end them here
            print(f"{len(leftovers)} POC processes still running 60 s after `poc stop`: terminating them",
                  file=sys.stderr)
            for proc in leftovers:
                try:
                    proc.terminate()
                except psutil.Error:
                    pass
            _, alive = psutil.wait_procs(leftovers, timeout=15)
            for proc in alive:
                try:
                    proc.kill()
                except psutil.Error:
                    pass
        for _ in range(20):  # `poc clean` refuses while the sub_start wrappers are still shutting down
            out = self.run("poc", "clean", check=False, timeout=60)
            if not Path(self.env["NVFLARE_POC_WORKSPACE"]).exists():
                print("POC stopped and cleaned.")
                self.started = False
                return
            if self.verbose:
                print(out)
            time.sleep(3)
        print(f"warning: POC workspace {self.env['NVFLARE_POC_WORKSPACE']} could not be cleaned", file=sys.stderr)

    def wait_for_clients(self, sites: list[str], timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.run("system", "status", check=False, timeout=60, quiet=True)
            if all(s in out for s in sites):
                return
            time.sleep(3)
        raise DemoError(f"not every site connected within {timeout:.0f} s: expected {sites}")

    def submit(self, job_dir: Path) -> str:
        reply = self.run("job", "submit", "-j", str(job_dir), json_out=True)
        job_id = (reply.get("data") or {}).get("job_id") if isinstance(reply, dict) else None
        if not job_id:
            raise DemoError(f"submitting {job_dir} returned no job id: {reply}")
        return job_id

    def follow(self, job_id: str, timeout: float, poll: float = 5.0) -> str:
        """Poll the job until it is done, printing status and round progress; returns the final status."""
        started, last, waited_hint = time.time(), None, False
        deadline = started + timeout
        print(f"following job {job_id} every {poll:g} s (status: `nvflare job meta {job_id}`; progress: "
              f"`fssl watch {job_id} --kit {self.kits / 'admin@nvidia.com'}` or the console's "
              f"`show_stats {job_id} server`)")
        while time.time() < deadline:
            data = self.job_meta(job_id)
            status = str(data.get("status", "?"))
            block = [f"  job {job_id[:8]} {status}"]
            if status == "RUNNING" and self._session:  # the server's JobProgress, as `fssl watch` shows it
                block += ["    " + line for line in job_progress_lines(self._session, job_id)]
            if block != last:
                print("\n".join(block), flush=True)
                last = block
            if status.startswith("FINISHED") or status in ("FAILED", "ABORTED"):
                return status
            if status == "SUBMITTED" and not waited_hint and time.time() - started > 60:
                waited_hint = True
                print(f"  still SUBMITTED after 60 s: the server's log ({self.kits / 'server' / 'log.txt'}) says why "
                      f"(\"Try to schedule job\": e.g. fewer connected sites than the job's min_clients, or a "
                      f"resource_spec no site meets)", flush=True)
            time.sleep(poll)
        raise DemoError(f"job {job_id} did not finish within {timeout:.0f} s")

    def download(self, job_id: str, out: Path) -> Path:
        path = out / job_id
        out.mkdir(parents=True, exist_ok=True)
        self.run("job", "download", job_id, "-o", str(out), "--force")
        if not path.is_dir():
            raise DemoError(f"download of job {job_id} produced no folder {path}")
        return path


def _last_json(text: str) -> dict:
    for chunk in reversed([c for c in text.strip().splitlines() if c.strip()]):
        try:
            return json.loads(chunk)
        except json.JSONDecodeError:
            continue
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {}


def run_demo(args) -> int:
    work = Path(args.work).resolve()
    data_dir = Path(args.data).resolve() if args.data else work / "data" / "synthetic"
    results_dir = work / "results"
    poc = Poc(work, verbose=args.verbose)

    def interrupted(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    t0 = time.time()
    try:
        if not args.data:
            from fssl_covid.synthetic import make_federation

            print(f"1/5 synthetic sites -> {data_dir} (synthetic CT, not patient data)")
            make_federation(data_dir, seed=args.seed)
        print("2/5 POC workspace and site settings")
        poc.prepare(args.sites)
        for site in args.sites:
            target = write_settings(poc.kits / site, {"datalist": str(data_dir / site / "datalist.json"),
                                                      "device": args.device, "num_threads": args.threads})
            print(f"  {site}: {target}")
        print("3/5 starting server and clients")
        poc.start()
        poc.wait_for_clients(args.sites)
        jobs = [Path(j).resolve() for j in (args.job or [ROOT / "jobs" / "fssl_covid_seg"])]
        if args.baseline:
            jobs.append(ROOT / "jobs" / "fedavg_supervised")
        summaries = []
        for job_dir in jobs:
            print(f"4/5 job {job_dir.name}")
            job_id = poc.submit(job_dir)
            status = poc.follow(job_id, timeout=args.timeout)
            if not status.startswith("FINISHED"):
                raise DemoError(f"job {job_dir.name} ended as {status}; see {poc.kits / 'server' / 'log.txt'}")
            path = poc.download(job_id, results_dir / job_dir.name)
            for site in args.sites:  # demo only: every site is on this machine, so keep their logs with the results
                log = poc.kits / site / job_id / "log.txt"
                if log.is_file():
                    (path / "site_logs").mkdir(exist_ok=True)
                    shutil.copy(log, path / "site_logs" / f"{site}.log.txt")
            summaries.append((job_dir.name, job_id, status, path))
        print(f"5/5 results (after {time.time() - t0:.0f} s)")
        for name, job_id, status, path in summaries:
            outputs = find_job_outputs(path)
            print(f"\n== {name} (job {job_id}, {status})")
            print(cross_site_table(outputs["cross_site"]))
            for label, key in (("global model", "global_model"), ("best global model", "best_model"),
                               ("cross-site results", "cross_site"), ("TensorBoard events", "tb_events"),
                               ("server log", "server_log")):
                if outputs.get(key):
                    print(f"  {label:20s} {outputs[key]}")
            print(f"  {'site logs':20s} {path / 'site_logs'} (copied from the sites' workspaces for the demo)")
            try:  # demo only: all sites' data is on this machine, so the report may show their scans
                from fssl_covid.report import build_report

                report = build_report(path, datalists={s: data_dir / s / "datalist.json" for s in args.sites})
                print(f"  report: {report} (and report.md next to it)")
            except Exception as e:  # the results above stand without it
                print(f"  warning: no report for {name}: {type(e).__name__}: {e}", file=sys.stderr)
        return 0
    except (DemoError, KeyboardInterrupt, subprocess.TimeoutExpired) as e:
        print(f"demo stopped: {e}", file=sys.stderr)
        return 1
    finally:
        if poc.started and args.keep_running:
            print(f"POC left running (--keep-running); stop it with: HOME={poc.env['HOME']} "
                  f"NVFLARE_POC_WORKSPACE={poc.env['NVFLARE_POC_WORKSPACE']} nvflare poc stop")
        else:
            poc.stop_and_clean()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", action="append", help="job folder to submit (repeatable; default jobs/fssl_covid_seg)")
    p.add_argument("--baseline", action="store_true", help="also run jobs/fedavg_supervised (labels only)")
    p.add_argument("--sites", nargs="+", default=DEFAULT_SITES)
    p.add_argument("--data", default=None, help="existing data folder with <site>/datalist.json (default: "
                                                "make synthetic sites)")
    p.add_argument("--work", default=str(ROOT / ".work" / "demo"), help="where FLARE state and results go")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads per site (sites share this machine)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for each job")
    p.add_argument("--keep-running", action="store_true", help="leave POC running at the end")
    p.add_argument("--verbose", action="store_true")
    return run_demo(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
