"""Start minilm-serve in a subprocess on a free loopback port and wait until it answers: what
the tests and bench/serve.py do, and a script that wants a server beside it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Mapping


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """python -m minilm.serve --ckpt CKPT --port <free> ARGS...; `url` once /health answers."""

    def __init__(self, ckpt: str | Path, *args: str, env: Mapping[str, str] | None = None,
                 log: IO | None = None, timeout: float = 180.0):
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "minilm.serve", "--ckpt", str(ckpt), "--port", str(port),
             *args], cwd=Path(__file__).resolve().parents[2], env=env, stdout=log,
            stderr=subprocess.STDOUT if log is not None else None)
        deadline = time.monotonic() + timeout
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"minilm-serve did not start (exit code {self.proc.returncode})")
            time.sleep(0.2)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
