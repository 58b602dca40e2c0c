"""`corematching serve` in a child process on a free loopback port: for tests, benchmarks and scripts.

    with ServerProcess(["--method", "dense"]) as server:
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="none")
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


class ServerProcess:
    def __init__(self, arguments: list[str], start_timeout_s: float = 180.0, env: dict | None = None):
        self.arguments = list(arguments)
        self.start_timeout_s = start_timeout_s
        self.env = env
        self.port = None
        self.process: subprocess.Popen | None = None
        self.log_path = None

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def start(self) -> "ServerProcess":
        import tempfile

        self.port = free_port()
        log = tempfile.NamedTemporaryFile("w+", prefix="corematching-serve-", suffix=".log", delete=False)
        self.log_path = log.name
        command = [sys.executable, "-m", "corematching", "serve", "--host", HOST, "--port", str(self.port),
                   *self.arguments]
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(self.env or {})})
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log()}")
            try:
                self.get("/health")
                return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not answer /health within {self.start_timeout_s} s:\n{self.log()}")

    def get(self, path: str, timeout_s: float = 5.0) -> dict:
        with urllib.request.urlopen(self.base_url + path, timeout=timeout_s) as response:
            return json.loads(response.read())

    def log(self) -> str:
        if self.log_path is None:
            return ""
        with open(self.log_path) as handle:
            return handle.read()[-4000:]

    def terminate(self) -> None:
        """SIGTERM: the server stops accepting, lets accepted requests finish, and exits."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.process is None:
            return None
        self.terminate()
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()
        finally:
            if self.log_path is not None and os.path.exists(self.log_path):
                os.unlink(self.log_path)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
