"""The demo script's guards around POC (fast: no FLARE processes are started)."""

import json
import os
import socket
import sys

import pytest

from jobtools import ROOT

sys.path.insert(0, str(ROOT / "poc"))
from run_demo import DemoError, Poc  # noqa: E402


def test_a_busy_server_port_is_refused_naming_the_process(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        poc = Poc(tmp_path / "work")
        startup = poc.kits / "server" / "startup"  # as `nvflare poc prepare` writes it
        startup.mkdir(parents=True)
        (startup / "fed_server.json").write_text(json.dumps({"servers": [{"service": {"target": f"server:{port}"}}]}))
        assert poc.server_port() == port
        with pytest.raises(DemoError, match=rf"port {port}, which the POC server needs, is already in use") as e:
            poc.check_port_free()
        assert f"process {os.getpid()}" in str(e.value)
    poc.check_port_free()  # free again: no error
