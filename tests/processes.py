"""Stopping a helper process the tests started (a broker, a DNS server): SIGTERM, then SIGKILL."""

from __future__ import annotations

import subprocess


def terminate(process: subprocess.Popen, timeout_s: float = 5.0) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout_s)
