"""`tandem serve` in a child process: start it, wait for its URL, stop it with SIGINT, and check that nothing
it started (Ray's GCS, raylet, workers, replicas) outlives it."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import httpx
import psutil

_URL = re.compile(r"Tandem serving on (http://\S+)")
COMMAND = [sys.executable, "-c", "import sys; from tandem.cli import main; sys.exit(main())", "serve"]


@dataclass
class ServeProcess:
    """A running `tandem serve`."""

    args: list[str]
    """Its arguments after `tandem serve`."""
    env: dict[str, str] | None = None
    """Its environment (None: this process's)."""
    url: str = ""
    """Where it serves, once started."""
    output: list[str] = field(default_factory=list)
    """Its stdout and stderr lines so far."""
    _proc: subprocess.Popen | None = None
    _seen: dict[int, psutil.Process] = field(default_factory=dict)

    def start(self, timeout: float = 300.0) -> "ServeProcess":
        """Start it and wait until it prints its URL; RuntimeError with its output if it exits or times out."""
        self._proc = subprocess.Popen([*COMMAND, *self.args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, env=self.env, start_new_session=True)
        found = threading.Event()

        def pump() -> None:
            assert self._proc is not None and self._proc.stdout is not None
            for line in self._proc.stdout:
                self.output.append(line.rstrip("\n"))
                m = _URL.search(line)
                if m and not found.is_set():
                    self.url = m.group(1)
                    found.set()
            found.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        if not found.wait(timeout) or not self.url or not self._ready(deadline):
            self.stop()
            raise RuntimeError("tandem serve did not start:\n" + "\n".join(self.output[-40:]))
        self.remember_children()
        return self

    def _ready(self, deadline: float) -> bool:
        """Wait until GET /health says it serves (a single server loads its models after printing its URL)."""
        while time.monotonic() < deadline and self._proc is not None and self._proc.poll() is None:
            try:
                if httpx.get(f"{self.url}/health", timeout=30).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        return False

    def remember_children(self) -> None:
        """Note every process it started so far (stop() checks they are gone)."""
        if self._proc is None:
            return
        try:
            for p in psutil.Process(self._proc.pid).children(recursive=True):
                self._seen.setdefault(p.pid, p)
        except psutil.NoSuchProcess:
            pass

    @property
    def children(self) -> list[str]:
        """Names of the processes it started that are still running."""
        alive = []
        for p in self._seen.values():
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p.name())
            except psutil.NoSuchProcess:
                continue
        return alive

    def stop(self, timeout: float = 120.0) -> tuple[int | None, list[str]]:
        """SIGINT, wait; (exit status, names of its processes still running, which are then killed)."""
        if self._proc is None:
            return None, []
        self.remember_children()
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
        try:
            rc = self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            rc = self._proc.wait()
        deadline_left = [p for p in self._seen.values() if p.is_running()]
        gone, alive = psutil.wait_procs(deadline_left, timeout=20)
        left = []
        for p in alive:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    left.append(p.name())
                p.kill()
            except psutil.NoSuchProcess:
                continue
        self._proc = None
        return rc, left


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment with the worktree importable by the server and Ray's workers."""
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env
