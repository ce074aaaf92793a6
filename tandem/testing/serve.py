"""`tandem serve` as a child process, for tests and benchmark modes that need the real command: its banner
is read until the models are loaded, then `url` is where it serves; leaving the block stops it (SIGINT)."""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import TracebackType

_URL = re.compile(r"serving on (http://\S+)")


class ServeProcess:
    """`python -m tandem serve ARGS`; a context manager that waits for 'ready:' and stops the process on exit."""

    def __init__(self, args: Sequence[str], *, env: dict[str, str] | None = None):
        self.cmd = [sys.executable, "-m", "tandem", "serve", *args]
        self.env = env
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.lines: queue.Queue[str] = queue.Queue()
        """stdout, line by line (the banner, 'ready: ...', 'stopped')."""
        self.stderr: list[str] = []

    def start(self, timeout: float = 90.0) -> ServeProcess:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=self.env)
        threading.Thread(target=_pump, args=(self.proc.stdout, self.lines.put), daemon=True).start()
        threading.Thread(target=_pump, args=(self.proc.stderr, self.stderr.append), daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise RuntimeError(f"`tandem serve` was not ready in {timeout:.0f} s: {''.join(self.stderr)}") from None
            if m := _URL.search(line):
                self.url = m.group(1)
            if line.startswith("ready:"):
                return self
            if line.startswith("NOT SERVING") or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError(f"`tandem serve` did not start: {line.strip()} {''.join(self.stderr)}")

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """The exit status, waiting up to `timeout` seconds (subprocess.TimeoutExpired past it)."""
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGINT, then SIGKILL if it has not exited after `timeout` seconds; the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> ServeProcess:
        return self if self.proc is not None else self.start()  # `with ServeProcess(...).start(...)` starts once

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _pump(stream, put) -> None:  # type: ignore[no-untyped-def]
    for line in stream:
        put(line)
