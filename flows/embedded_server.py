"""Prefect's embedded (ephemeral) API server, started early and in the background for `flexgen eval`.

Prefect starts its temporary server lazily, at the first client call, and waits for it: about 2.6 s with an
existing database and 7 s with a fresh one on a 2-core box, plus 2 s to import `prefect.server` in the calling
process. `EmbeddedServer` starts the same uvicorn app (ephemeral services only, UI off, 127.0.0.1) as a child
process before the CLI imports torch and the flows, points `PREFECT_API_URL` at it, and waits for its health
endpoint only when the flow is about to run, so its start-up overlaps the imports. On Linux the child gets
SIGTERM when this process dies, so a killed `flexgen eval` does not leave a server holding the database.
With an API URL already configured (`PREFECT_API_URL` in the environment or the active Prefect profile, e.g. a
running `prefect server start`), it does nothing and the flow uses that server.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType

PR_SET_PDEATHSIG = 1
# what Prefect's own SubprocessASGIServer sets for its child: no UI, ephemeral services only
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def configured_api_url() -> str | None:
    """PREFECT_API_URL from the environment or the active profile of PREFECT_HOME's profiles.toml, read without
    importing Prefect (its settings are fixed at import, and the URL must be set before that)."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    path = Path(os.environ.get("PREFECT_PROFILES_PATH", home / "profiles.toml")).expanduser()
    try:
        profiles = _read_toml(path)
    except Exception:  # missing or unreadable: Prefect itself will say what is wrong with it
        return None
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active", "")
    url = profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL")
    return str(url) if url else None


def _read_toml(path: Path) -> dict:
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:
        import toml  # a Prefect dependency

        return toml.loads(path.read_text())
    return tomllib.loads(path.read_text())


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class EmbeddedServer:
    """`with EmbeddedServer() as server: ...; server.wait(); run flows`: a private Prefect API server for this
    process, stopped on exit; the previous `PREFECT_API_URL` (unset) is restored."""

    def __init__(self, host: str = "127.0.0.1", startup_timeout_s: float | None = None) -> None:
        self.host = host
        self.startup_timeout_s = startup_timeout_s or float(
            os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"))
        self.process: subprocess.Popen[bytes] | None = None
        # the child's output, read only to explain a failed start (a pipe nobody reads could fill and block it)
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in __exit__
        self.api_url: str | None = None
        self.ready = False

    def __enter__(self) -> EmbeddedServer:
        if configured_api_url():
            self.ready = True  # the user's server
            return self
        spec = importlib.util.find_spec("prefect")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("Prefect is not installed: pip install -e . installs it")
        port = free_port(self.host)
        self.api_url = f"http://{self.host}:{port}/api"
        app_dir = Path(next(iter(spec.submodule_search_locations))).parent
        cmd = [sys.executable, "-m", "uvicorn", "--app-dir", str(app_dir), "--factory",
               "prefect.server.api.server:create_app", "--host", self.host, "--port", str(port),
               "--log-level", "error", "--lifespan", "on"]
        self.process = subprocess.Popen(cmd, env={**os.environ, **SERVER_ENV}, stdin=subprocess.DEVNULL,
                                        stdout=self.log, stderr=subprocess.STDOUT,
                                        preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        os.environ["PREFECT_API_URL"] = self.api_url
        return self

    def wait(self) -> None:
        """Block until the server answers its health check; RuntimeError with its stderr if it cannot start."""
        if self.ready or self.process is None:
            return
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Prefect's embedded server exited with code {self.process.returncode} while "
                                   f"starting: {self._stderr()}. Set PREFECT_API_URL to a running `prefect server "
                                   "start` to use that one instead.")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        self.ready = True
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        raise RuntimeError(f"Prefect's embedded server did not answer within {self.startup_timeout_s:.0f} s; raise "
                           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or start `prefect server start` and set "
                           "PREFECT_API_URL.")

    def _stderr(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-2000:].strip() or "(no output)"

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.process is None:
            self.log.close()
            return
        if os.environ.get("PREFECT_API_URL") == self.api_url:
            del os.environ["PREFECT_API_URL"]
        if "prefect" in sys.modules:  # send the logs and events still queued while the server is up
            from prefect.events.worker import EventsWorker
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=10)
            EventsWorker.drain_all(timeout=10)
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None
        self.log.close()
