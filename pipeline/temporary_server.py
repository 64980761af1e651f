"""The temporary Prefect server of `alol run` when no PREFECT_API_URL is set, started so that Ctrl-C works.

Prefect would start one itself (`SubprocessASGIServer`), in alol's process group and writing to
alol's terminal. Ctrl-C in a terminal sends SIGINT to the whole foreground process group, so that
server died at once, while alol's KeyboardInterrupt was still unwinding through the task and flow
engines: their last API calls (marking the task run and the flow run Crashed) then retried against
a closed port with back-off for one to three minutes, and a `ConnectError` replaced the interrupt
(`alol: error: ConnectError: [Errno 111] Connection refused`, exit 1). And whatever the server printed
while it stopped (a sqlalchemy/asyncio traceback on a loaded machine) reached the user.

This is the same server (Prefect's own command line) started in a session of its own, so a
terminal's SIGINT reaches only alol, which reports the crash to a live server and exits; the server
is stopped at alol's exit as before (Prefect's atexit hook), and by the kernel (SIGTERM) when alol dies
without one. Its output goes to a nameless temporary file, shown only when it fails to start (with
`--debug` / ALOL_DEBUG=1 it goes to the terminal). It takes the place of Prefect's own instance, so
every client in the process (task and flow runs, logs, events) uses it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
from typing import IO, Any

import prefect
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import get_current_settings

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _stop_with_parent() -> None:
    """Runs in the server process before it starts: SIGTERM when alol dies (Linux; strictly, when the
    thread that started the server ends, so start it from the main thread)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _debug() -> bool:
    return bool(os.environ.get("ALOL_DEBUG"))


class SessionServer(SubprocessASGIServer):
    """Prefect's temporary server in its own session, its output in a log file (see the module docstring)."""

    output: IO[bytes] | None = None

    def _run_uvicorn_command(self) -> subprocess.Popen[Any]:
        # The command and environment of SubprocessASGIServer._run_uvicorn_command (prefect 3.9.1).
        args = [
            sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent),
            "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
            "--log-level", "error", "--lifespan", "on",
        ]
        env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            **get_current_settings().to_environment_variables(exclude_unset=True),
        }
        if not _debug() and self.output is None:
            self.output = tempfile.TemporaryFile()  # nameless: nothing is left behind, however alol ends
        return subprocess.Popen(
            args, env=env, stdin=subprocess.DEVNULL, stdout=self.output, stderr=subprocess.STDOUT if self.output else None,
            start_new_session=True, preexec_fn=_stop_with_parent,
        )

    def start(self, timeout: int | None = None) -> None:
        try:
            super().start(timeout)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc} Server output: {self._output_tail()}") from None

    def stop(self) -> None:
        super().stop()
        if self.output is not None:
            self.output.close()
            self.output = None

    def _output_tail(self, chars: int = 2000) -> str:
        if self.output is None:
            return "(on the terminal)"
        self.output.seek(0)
        return " ".join(self.output.read().decode("utf-8", errors="replace")[-chars:].split()) or "(none)"


def ensure_temporary_server() -> None:
    """Start the temporary server now, in its own session, when Prefect would start one (no API URL
    set and temporary servers allowed); Prefect's clients then find it running. Idempotent."""
    settings = get_current_settings()
    if settings.api.url or not settings.server.ephemeral.enabled:
        return
    existing = SubprocessASGIServer._instances.get(None)
    if existing is not None:
        if existing.running:
            return
        del SubprocessASGIServer._instances[None]  # a stopped one of Prefect's: replace it
    SessionServer().start()
