"""Start and stop a ``kvtier server`` child process (tests, benchmarks, supervisors in Python).

The child is told ``--ready-file``; it writes its bound ports there (as JSON, atomically) once
it accepts connections, so ``--port 0 --http-port 0`` (free ports chosen by the kernel) work
and the caller never races the bind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from kvtier.errors import KVTierError


class DaemonStartError(KVTierError, RuntimeError):
    """The daemon exited or did not become ready in time; the message holds its log tail."""


class DaemonProcess:
    """``kvtier server ARGS...`` as a child process; ``--port``/``--http-port`` default to 0.

    ``env`` is the child's whole environment (default: this process's); note the daemon reads
    ``KVTIER_*`` variables as configuration and rejects unknown ones.
    """

    def __init__(self, *args: str, log_path: str | None = None, env: dict[str, str] | None = None) -> None:
        self.args = list(args)
        self._dir = tempfile.mkdtemp(prefix="kvtier-daemon-")
        self.ready_file = os.path.join(self._dir, "ready.json")
        self.log_path = log_path or os.path.join(self._dir, "server.log")
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    def start(self, timeout_s: float = 60.0) -> DaemonProcess:
        args = list(self.args)
        if "--port" not in args:
            args += ["--port", "0"]
        if "--http-port" not in args:
            args += ["--http-port", "0"]
        cmd = [sys.executable, "-m", "kvtier.cli", "-v", "server", "--ready-file", self.ready_file, *args]
        with open(self.log_path, "ab") as logf:
            self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if os.path.exists(self.ready_file):
                self.info = json.loads(Path(self.ready_file).read_text())
                return self
            if self.proc.poll() is not None:
                raise DaemonStartError(
                    f"kvtier server exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            time.sleep(0.05)
        self.kill()
        raise DaemonStartError(f"kvtier server not ready after {timeout_s}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")[-n:]
        except OSError:
            return ""

    @property
    def port(self) -> int:
        return int(self.info["port"])

    @property
    def http_port(self) -> int:
        return int(self.info["http_port"])

    @property
    def url(self) -> str:
        return f"kvtier://{self.info['host']}:{self.port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.info['host']}:{self.http_port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def terminate(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (graceful: drain, flush, close) and wait; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL: no cleanup at all (what a crash looks like)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if os.path.exists(self.ready_file):
            os.unlink(self.ready_file)

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            rc = self.terminate()
        finally:
            self.kill()
        if rc == 0 and et is None:
            self.cleanup()

    def cleanup(self) -> None:
        """Remove the temp dir (ready file, log); kept after a failure for the post-mortem."""
        shutil.rmtree(self._dir, ignore_errors=True)
