"""The embedded Prefect server of `flexgen eval`: which URL wins, and that it never outlives its process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from flows.embedded_server import EmbeddedServer, configured_api_url

ROOT = Path(__file__).resolve().parents[1]


def test_configured_api_url_from_environment_then_active_profile(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    monkeypatch.delenv("PREFECT_PROFILES_PATH", raising=False)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    assert configured_api_url() is None  # no profiles file: the embedded server is started
    (tmp_path / "profiles.toml").write_text('active = "remote"\n[profiles.local]\n'
                                            '[profiles.remote]\nPREFECT_API_URL = "http://10.0.0.2:4200/api"\n')
    assert configured_api_url() == "http://10.0.0.2:4200/api"
    monkeypatch.setenv("PREFECT_PROFILE", "local")
    assert configured_api_url() is None
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    assert configured_api_url() == "http://127.0.0.1:4200/api"
    with EmbeddedServer() as server:  # a configured server is used as it is: nothing started, URL kept
        server.wait()
        assert server.process is None and os.environ["PREFECT_API_URL"] == "http://127.0.0.1:4200/api"


def test_embedded_server_dies_with_a_killed_parent(tmp_path: Path) -> None:
    """SIGKILL of `flexgen eval` must not leave a server holding the database and a port (Prefect's own
    temporary server survives its parent)."""
    code = ("import sys, time\n"
            "from flows.embedded_server import EmbeddedServer\n"
            "server = EmbeddedServer().__enter__()\n"
            "server.wait()\n"
            "print(server.process.pid, server.api_url, flush=True)\n"
            "time.sleep(120)\n")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        pid_text, url = parent.stdout.readline().split()
        child = psutil.Process(int(pid_text))
        assert child.is_running() and url.startswith("http://127.0.0.1:")
    finally:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and child.is_running() and child.status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.1)
    alive = child.is_running() and child.status() != psutil.STATUS_ZOMBIE
    if alive:
        child.kill()
    assert not alive, "the embedded server outlived its killed parent"
