"""A real mosquitto broker for tests: 127.0.0.1, a free port, a generated config, stopped afterwards.

``from mosquitto import broker`` makes the ``broker`` fixture available in a test module. Without the
binary the tests are skipped locally, but in CI (``CI`` set to true) a missing broker fails loudly: .ci/run
installs it from apt.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import skip_or_fail
from processes import terminate

START_TIMEOUT_S = 10.0


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Broker:
    host: str
    port: int
    process: subprocess.Popen
    log_path: Path
    tls: bool = False

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        terminate(self.process)


def _accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def start_broker(workdir: Path, port: int | None = None, *, cert_file: Path | None = None,
                 key_file: Path | None = None, users: dict[str, str] | None = None) -> Broker:
    """Start mosquitto on 127.0.0.1:``port`` (a free one by default); returns once it accepts connections.
    With ``cert_file``/``key_file`` the listener is TLS only; with ``users`` it needs one of those user names
    and passwords (hashed by mosquitto_passwd) and refuses anonymous clients."""
    binary = mosquitto_binary()
    if binary is None:
        message = "mosquitto is not installed (apt-get install mosquitto)"
        skip_or_fail(f"{message}; CI must have it (.ci/run installs it)")
    workdir.mkdir(parents=True, exist_ok=True)
    for attempt in range(3):                     # a free port may be taken between probing and binding
        chosen = port or free_port()
        conf, log_path = workdir / f"mosquitto-{chosen}.conf", workdir / f"mosquitto-{chosen}.log"
        text = f"listener {chosen} 127.0.0.1\npersistence false\n" \
               "log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\n"
        if os.geteuid() == 0:                    # else it drops to user mosquitto, who cannot read tmp_path
            text += "user root\n"
        if cert_file is not None:
            text += f"certfile {cert_file}\nkeyfile {key_file}\n"
        if users:
            passwords = workdir / "passwords"
            passwords.write_text("")
            for user, password in users.items():
                subprocess.run([shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd", "-b",
                                str(passwords), user, password], check=True, capture_output=True)
            passwords.chmod(0o600)
            text += f"allow_anonymous false\npassword_file {passwords}\n"
        else:
            text += "allow_anonymous true\n"
        conf.write_text(text)
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log_file, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            if _accepting(chosen):
                return Broker("127.0.0.1", chosen, proc, log_path, cert_file is not None)
            time.sleep(0.01)                     # polling a condition, with a deadline
        broker = Broker("127.0.0.1", chosen, proc, log_path)
        broker.stop()
        if port is not None or attempt == 2:
            raise RuntimeError(f"mosquitto did not start on 127.0.0.1:{chosen}: {broker.log()[-2000:]}")
    raise AssertionError("unreachable")


@pytest.fixture
def broker(tmp_path):
    b = start_broker(tmp_path / "broker")
    try:
        yield b
    finally:
        b.stop()
