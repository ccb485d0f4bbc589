"""A provisioned, secure deployment on localhost (mutual TLS, roles), with real FLARE processes.

``nvflare provision -p site_configs/project.yml`` -> server ``localhost`` on port 8202 (not POC's 8002/8003) and the
kits of china, italy, japan and three admins. The server and the three clients run from their kits
(``startup/sub_start.sh --once``, in the foreground under this test), each site's settings written into its kit.
Checked:

* every connection is mutual TLS: the kits say ``connection_security: mtls`` and the server refuses a TLS
  connection without a client certificate of its root CA (a certificate from another provisioning included);
* the lead submits the FSSL job (bring your own code): it runs to FINISHED:COMPLETED and its global model and
  cross-site results download;
* the org_admin's submission of the same job is refused;
* a client kit from a *different* provisioning (another root CA) cannot join, even under a free site name;
* every process started here is gone at the end (also when a check fails).

FLARE's state (``~/.nvflare``, temp files, job storage) stays under the test's tmp_path.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY_3D
from fssl_covid.jobs import REPO as ROOT, customize_job
from fssl_covid.networks import build_network
from fssl_covid.results import find_job_outputs, load_cross_site
from fssl_covid.site_settings import write_settings

pytestmark = pytest.mark.slow

PROJECT_YML = ROOT / "site_configs" / "project.yml"
PROJECT = "fssl_covid"
SERVER = "localhost"
PORT = 8202
SITES = ["china", "italy", "japan"]
ADMIN, LEAD, ORG_ADMIN = "admin@coordinator.org", "lead@coordinator.org", "orgadmin@hospital-it.org"
NVFLARE = str(Path(sys.executable).parent / "nvflare")


# ----------------------------------------------------------------------------------------------------------------
# helpers


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _project_file(tmp: Path) -> tuple[Path, int]:
    """site_configs/project.yml itself; a copy on another port only when 8202 is taken (e.g. a parallel run)."""
    text = PROJECT_YML.read_text()
    assert f"fed_learn_port: {PORT}" in text, f"{PROJECT_YML} no longer sets fed_learn_port {PORT}"
    if _port_free(PORT):
        return PROJECT_YML, PORT
    port = next((p for p in range(PORT + 10, PORT + 200) if p not in (8002, 8003) and _port_free(p)), None)
    assert port is not None, f"port {PORT} and the next 200 are busy"
    copy = tmp / "project.yml"
    copy.write_text(text.replace(f"fed_learn_port: {PORT}", f"fed_learn_port: {port}"))
    return copy, port


def _tail(path: Path, n: int = 40) -> str:
    try:
        lines = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return f"({path}: not written)"
    return f"--- {path} (last {n} lines)\n" + "\n".join(lines[-n:])


class Deployment:
    """The provisioned kits, the processes started from them, and the nvflare CLI with FLARE's state in ``tmp``."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.env = {k: v for k, v in os.environ.items() if k not in ("FSSL_SITE_CONFIGS", "FSSL_DATA_DIR")}
        self.env.update({
            "HOME": str(tmp / "home"),
            "TMPDIR": str(tmp / "tmpdir"),
            "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""),  # the sites' python3
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
        })
        for key in ("HOME", "TMPDIR"):
            Path(self.env[key]).mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    # -- provisioning ------------------------------------------------------------------------------------------------
    def provision(self, project: Path, workspace: Path) -> Path:
        proc = self.cli("provision", "-p", str(project), "-w", str(workspace), timeout=120, check=False)
        assert proc.returncode == 0, f"provisioning failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        kits = workspace / PROJECT / "prod_00"
        assert kits.is_dir(), f"no {kits} after provisioning:\n{proc.stdout[-2000:]}"
        return kits

    # -- the nvflare CLI --------------------------------------------------------------------------------------------
    def cli(self, *args: str, kit: Path | None = None, json_out: bool = False, timeout: float = 120,
            check: bool = True) -> subprocess.CompletedProcess:
        cmd = [NVFLARE] + (["--format", "json"] if json_out else []) + list(args)
        if kit is not None:
            cmd += ["--startup-kit", str(kit)]
        proc = subprocess.run(cmd, env=self.env, cwd=self.tmp, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
        if check:
            assert proc.returncode == 0, (f"`{' '.join(cmd[1:])}` failed ({proc.returncode}):\n"
                                          f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{self.log_tails()}")
        return proc

    def cli_json(self, *args: str, kit: Path, timeout: float = 120, check: bool = True) -> dict:
        proc = self.cli(*args, kit=kit, json_out=True, timeout=timeout, check=check)
        for line in reversed(proc.stdout.strip().splitlines()):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
        try:
            return json.loads(proc.stdout)
        except json.JSONDecodeError:
            return {"raw_stdout": proc.stdout, "raw_stderr": proc.stderr, "returncode": proc.returncode}

    def connected_clients(self, admin_kit: Path) -> set[str]:
        reply = self.cli_json("system", "status", "client", kit=admin_kit, timeout=60, check=False)
        data = reply.get("data") or {}
        return {c.get("client_name") for c in data.get("client_status", []) if isinstance(c, dict)} - {None}

    # -- processes --------------------------------------------------------------------------------------------------
    def start(self, name: str, kit: Path) -> None:
        """``startup/sub_start.sh --once``: the kit's own start command, in the foreground (no restart loop)."""
        log = self.tmp / "console" / f"{name}.log"
        log.parent.mkdir(exist_ok=True)
        self.logs[name] = log
        self.logs[name + " (kit log)"] = kit / "log.txt"
        with open(log, "wb") as out:
            self.procs[name] = subprocess.Popen(["bash", str(kit / "startup" / "sub_start.sh"), "--once"],
                                                cwd=kit, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, start_new_session=True)

    def stop(self, name: str, timeout: float = 20) -> None:
        proc = self.procs.get(name)
        if proc is None:
            return
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10)):
            if proc.poll() is not None:
                break
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                pass
        try:  # the group may outlive its leader
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def leftover_pids(self) -> list[int]:
        """Processes whose command line names this test's folder: FLARE's job processes run in their own sessions,
        so they are not in the groups started here."""
        mine, marker = [], str(self.tmp).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in cmdline and state != "Z":
                mine.append(int(entry.name))
        return mine

    def stop_all(self, admin_kit: Path | None) -> list[str]:
        """Shut the system down through the admin (graceful), then stop whatever is left; returns survivors."""
        if admin_kit is not None and any(p.poll() is None for p in self.procs.values()):
            try:
                self.cli("system", "shutdown", "all", "--force", "--timeout", "60", kit=admin_kit, timeout=90,
                         check=False)
            except subprocess.TimeoutExpired:
                pass
            deadline = time.time() + 30
            while time.time() < deadline and any(p.poll() is None for p in self.procs.values()):
                time.sleep(1)
        for name in list(self.procs):
            self.stop(name)
        for _ in range(2):
            for pid in self.leftover_pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(1)
        return [Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                for pid in self.leftover_pids() if Path(f"/proc/{pid}").exists()]

    def log_tails(self, n: int = 25) -> str:
        return "\n".join(_tail(p, n) for p in self.logs.values())


def _tls_probe(port: int, ca: Path, cert: Path | None = None, key: Path | None = None) -> str:
    """Open a TLS 1.2 connection to the server as a client would and send an HTTP request; returns what happened.
    (TLS 1.2 because there the server's check of the client certificate is part of the handshake.)"""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        ctx.load_cert_chain(str(cert), str(key))
    try:
        with socket.create_connection(("localhost", port), timeout=15) as raw:
            with ctx.wrap_socket(raw, server_hostname=SERVER) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                reply = s.recv(64)
                return f"reply {reply[:20]!r}" if reply else "closed without reply"
    except (ssl.SSLError, OSError) as e:
        return f"refused: {type(e).__name__}: {e}"


# ----------------------------------------------------------------------------------------------------------------
# the test


def test_provisioned_mtls_deployment_roles_and_foreign_ca(tmp_path, synthetic_sites):
    t0 = time.time()
    dep = Deployment(tmp_path)
    project, port = _project_file(tmp_path)
    kits = dep.provision(project, tmp_path / "prov")
    foreign = dep.provision(project, tmp_path / "prov_other")  # same project.yml, a new root CA

    # --- the kits: one per participant, every connection mutual TLS, the two provisionings have different CAs
    expected = {SERVER, *SITES, ADMIN, LEAD, ORG_ADMIN}
    assert {p.name for p in kits.iterdir() if p.is_dir()} == expected
    server_conf = json.loads((kits / SERVER / "startup" / "fed_server.json").read_text())["servers"][0]
    assert server_conf["connection_security"] == "mtls" and server_conf["service"]["target"] == f"localhost:{port}"
    assert server_conf["admin_port"] == port  # FL and admin traffic share the one port
    for site in SITES:
        conf = json.loads((kits / site / "startup" / "fed_client.json").read_text())
        assert conf["client"]["connection_security"] == "mtls", conf
        assert conf["servers"][0]["service"]["target"] == f"localhost:{port}", conf
        assert {"client.crt", "client.key", "rootCA.pem"} <= {p.name for p in (kits / site / "startup").iterdir()}
    for admin in (ADMIN, LEAD, ORG_ADMIN):
        conf = json.loads((kits / admin / "startup" / "fed_admin.json").read_text())["admin"]
        assert conf["connection_security"] == "mtls" and conf["port"] == port, conf
    assert (kits / SERVER / "startup" / "rootCA.pem").read_bytes() != \
        (foreign / SERVER / "startup" / "rootCA.pem").read_bytes()

    # --- the server keeps its job storage and snapshots in its own folder (the default is /tmp/nvflare)
    default = (kits / SERVER / "local" / "resources.json.default").read_text()
    assert "/tmp/nvflare" in default
    (kits / SERVER / "local" / "resources.json").write_text(default.replace("/tmp/nvflare",
                                                                            str(tmp_path / "server_storage")))
    # --- each site's settings in its kit (what `fssl site-config --kit ...` writes)
    for site in SITES:
        write_settings(kits / site, {"datalist": synthetic_sites[site], "num_threads": 1, "device": "cpu"})

    lead_kit, org_admin_kit, admin_kit = kits / LEAD, kits / ORG_ADMIN, kits / ADMIN
    started = False
    try:
        dep.start("server", kits / SERVER)
        started = True
        time.sleep(3)
        for site in SITES:
            dep.start(site, kits / site)

        deadline, connected = time.time() + 150, set()
        while time.time() < deadline:
            connected = dep.connected_clients(lead_kit)
            if connected >= set(SITES):
                break
            dead = [n for n, p in dep.procs.items() if p.poll() is not None]
            assert not dead, f"{dead} exited while starting\n{dep.log_tails()}"
            time.sleep(3)
        assert connected >= set(SITES), f"connected within 150 s: {sorted(connected)}\n{dep.log_tails()}"
        t_up = time.time()

        # --- mutual TLS on the wire: the server answers a client with a certificate of its CA, and refuses one
        # without a certificate and one whose certificate comes from the other provisioning
        ca, own = kits / "china" / "startup" / "rootCA.pem", kits / "china" / "startup"
        other = foreign / "china" / "startup"
        good = _tls_probe(port, ca, own / "client.crt", own / "client.key")
        assert good.startswith("reply b'HTTP/"), good
        evidence = [f"TLS with china's certificate: {good}"]
        for label, cert, key in (("no client certificate", None, None),
                                 ("certificate of another root CA", other / "client.crt", other / "client.key")):
            outcome = _tls_probe(port, ca, cert, key)
            assert not outcome.startswith("reply"), f"{label}: the server answered ({outcome})"
            evidence.append(f"TLS with {label}: {outcome}")

        # --- the lead submits the FSSL job (bring your own code) and gets its results
        job = customize_job("fssl_covid_seg", tmp_path / "jobs", rounds=2, config=json.loads(json.dumps(TINY_3D)))
        reply = dep.cli_json("job", "submit", "-j", str(job), kit=lead_kit)
        job_id = (reply.get("data") or {}).get("job_id")
        assert job_id, f"the lead's submission returned no job id: {reply}"
        waited = dep.cli_json("job", "wait", job_id, "--timeout", "480", "--interval", "3", kit=lead_kit,
                              timeout=540, check=False)
        meta = dep.cli_json("job", "meta", job_id, kit=lead_kit, check=False)
        status = str((meta.get("data") or {}).get("status"))
        job_log = kits / SERVER / job_id / "log.txt"
        assert status == "FINISHED:COMPLETED", (f"job {job_id}: {status}\nwait: {waited}\n{_tail(job_log, 60)}\n"
                                                f"{dep.log_tails()}")
        assert (meta.get("data") or {}).get("submitter_name", LEAD) == LEAD, meta
        t_job = time.time()
        dep.cli("job", "download", job_id, "-o", str(tmp_path / "results"), "--force", kit=lead_kit, timeout=180)
        outputs = find_job_outputs(tmp_path / "results" / job_id)
        assert outputs["global_model"] is not None, f"no global model in {sorted((tmp_path / 'results').rglob('*'))}"
        state = torch.load(outputs["global_model"], weights_only=True)["model"]
        build_network(**TINY_3D["network"]).load_state_dict(state)
        assert outputs["cross_site"] is not None and outputs["cross_site"].name == "cross_val_results.json"
        assert set(load_cross_site(outputs["cross_site"])) == set(SITES)

        # --- the org_admin may not submit it: BYOC (and submit_job) is refused for that role
        refused = dep.cli("job", "submit", "-j", str(job), kit=org_admin_kit, check=False, timeout=120)
        said = (refused.stdout + refused.stderr)
        assert refused.returncode != 0, f"the org_admin's submission was accepted:\n{said}"
        assert "not authorized" in said.lower() or "authorization" in said.lower(), said
        evidence.append(f"org_admin submit (exit {refused.returncode}): " + " | ".join(said.strip().splitlines()[-3:]))

        # --- a kit from another provisioning (another root CA) cannot join, even as a site name that is free:
        # take the real china off the federation, then start the other provisioning's china
        dep.cli("system", "shutdown", "client", "china", "--force", "--timeout", "60", kit=admin_kit, timeout=90)
        deadline = time.time() + 60
        while time.time() < deadline and "china" in dep.connected_clients(lead_kit):
            time.sleep(3)
        try:
            dep.procs["china"].wait(30)
        except subprocess.TimeoutExpired:  # it left the federation; make sure its process is gone too
            dep.stop("china")
        assert "china" not in dep.connected_clients(lead_kit)
        dep.start("foreign_china", foreign / "china")
        deadline, seen = time.time() + 35, []
        while time.time() < deadline:
            seen.append(sorted(dep.connected_clients(lead_kit)))
            assert "china" not in seen[-1], f"the foreign CA's china joined: {seen}\n{dep.log_tails()}"
            time.sleep(4)
        assert dep.procs["foreign_china"].poll() is None, "the foreign client exited instead of retrying"
        foreign_log = (foreign / "china" / "log.txt").read_text(errors="replace")
        assert "CERTIFICATE_VERIFY_FAILED" in foreign_log, _tail(foreign / "china" / "log.txt", 30)
        assert "Successfully registered client" not in foreign_log
        evidence.append("foreign-CA china: " + next(line for line in foreign_log.splitlines()
                                                    if "CERTIFICATE_VERIFY_FAILED" in line)[-200:])
        dep.stop("foreign_china")
        t_foreign = time.time()
        print(f"\nprovisioned system up in {t_up - t0:.0f} s; lead's job done after {t_job - t_up:.0f} s; "
              f"foreign-CA check {t_foreign - t_job:.0f} s\n" + "\n".join(evidence))
    finally:
        survivors = dep.stop_all(admin_kit if started else None)
    assert not survivors, f"processes left running: {survivors}"
    assert not any(p.poll() is None for p in dep.procs.values())
