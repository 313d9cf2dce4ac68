"""A real DNS server for tests: Debian's dnsmasq on 127.0.0.1 and a free port, serving SRV and A records.

dnsmasq reads SRV records (``srv-host``) from its configuration only, so :meth:`DnsServer.serve` rewrites the
file and restarts the server on the same port (a lookup in between fails, which discovery must survive too).
Without the binary the tests are skipped locally and fail in CI (``CI=true``): .ci/run installs it from apt.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

import dns.exception
import dns.resolver

from conftest import skip_or_fail
from mosquitto import free_port
from polling import wait_for
from processes import terminate

START_TIMEOUT_S = 10.0


def free_udp_port() -> int:
    """A port free for UDP and TCP on 127.0.0.1 (dnsmasq binds both)."""
    import socket
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port for dnsmasq")


class DnsServer:
    """``serve({srv_name: [(target, port), ...]}, {target: ip})`` and the server answers exactly that, for names
    under cluster.local, test and invalid (others are refused: it has no upstream)."""

    def __init__(self, workdir: Path):
        binary = shutil.which("dnsmasq") or ("/usr/sbin/dnsmasq" if Path("/usr/sbin/dnsmasq").exists() else None)
        if binary is None:
            skip_or_fail("needs dnsmasq (apt-get install dnsmasq-base)")
        self.binary = binary
        self.host, self.port = "127.0.0.1", free_udp_port()
        self.conf = workdir / "dnsmasq.conf"
        self.log_path = workdir / "dnsmasq.log"
        self.process: subprocess.Popen | None = None

    def spec(self, name: str) -> str:
        """The ``--discover`` value that asks this server for ``name``."""
        return f"dns-srv:{name}@{self.host}:{self.port}"

    def serve(self, srv: dict[str, Iterable[tuple[str, int]]], hosts: dict[str, str]) -> None:
        lines = [f"srv-host={name},{target},{port}" for name, targets in srv.items() for target, port in targets]
        lines += [f"host-record={target},{ip}" for target, ip in hosts.items()]
        lines += ["local=/cluster.local/", "local=/test/", "local=/invalid/"]   # authoritative: NXDOMAIN, not REFUSED
        self.stop()
        self.conf.write_text("\n".join(lines) + "\n")
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [self.binary, "--keep-in-foreground", f"--conf-file={self.conf}", f"--port={self.port}",
             f"--listen-address={self.host}", "--bind-interfaces", "--no-resolv", "--no-hosts", "--no-poll",
             "--pid-file=", "--user=nobody", "--log-facility=-", "--local-ttl=0"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers, resolver.port = [self.host], self.port
        resolver.timeout = resolver.lifetime = 0.5

        def answers() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"dnsmasq exited: {self.log_path.read_text(errors='replace')[-2000:]}")
            try:
                resolver.resolve("ready.faasmoe.invalid.", "A", search=False)
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                return True                    # an answer, even "no such name", means it serves
            except dns.exception.DNSException:
                return False
            return True

        wait_for(answers, START_TIMEOUT_S, f"dnsmasq on {self.host}:{self.port}")

    def stop(self) -> None:
        if self.process is not None:
            terminate(self.process)
        self.process = None
