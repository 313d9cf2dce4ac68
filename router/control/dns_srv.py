"""Find nodes through DNS SRV records, the way Kubernetes publishes a headless service's endpoints.

A headless Service with a named port gets one SRV record per ready endpoint under
``_<port-name>._<proto>.<service>.<namespace>.svc.<zone>`` (e.g. ``_grpc._tcp.faasmoe-nodes.faasmoe.svc.cluster.local``),
each naming a host with its own A record. There is no DNS-SD browsing, so the name is queried again every
``interval_s`` and the answer compared with the last one: new targets, gone targets and targets at another
address or port are reported to ``on_change`` exactly like mDNS adverts and goodbyes
(:class:`~faasmoe.router.control.discovery.MdnsBrowser`), so the node directory treats both alike.

SRV records are hints, like mDNS: they carry no certificate fingerprint, so with cluster credentials the
directory probes each address over mutual TLS and counts it only once a node certificate of the cluster
answers there. A lookup that fails (timeout, no nameserver) changes nothing; only an answer that lacks a target
(or NXDOMAIN: no ready endpoint at all) takes it away.

Spec syntax (``--discover dns-srv:SPEC``): ``NAME`` (the system's resolver, /etc/resolv.conf) or
``NAME@HOST[:PORT]`` (ask that nameserver; tests use a dnsmasq on loopback).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import dns.exception
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver

from faasmoe.proto.errors import ConfigError
from faasmoe.router.control.discovery import NodeRecord

log = logging.getLogger(__name__)

PREFIX = "dns-srv:"
DEFAULT_INTERVAL_S = 5.0          # Kubernetes' cluster DNS answers with a 5 s TTL by default
LOOKUP_TIMEOUT_S = 2.0
STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class SrvSpec:
    name: str                      # the SRV owner name, absolute (trailing dot)
    nameserver: str | None = None  # an IP address; None: the system's resolver configuration
    nameserver_port: int = 53

    def __str__(self) -> str:
        host = f"[{self.nameserver}]" if self.nameserver and ":" in self.nameserver else self.nameserver
        where = f"@{host}:{self.nameserver_port}" if self.nameserver else ""
        return f"{PREFIX}{self.name}{where}"


def parse_spec(text: str) -> SrvSpec:
    """``NAME[@HOST[:PORT]]`` (with or without the ``dns-srv:`` prefix); ConfigError when malformed."""
    body = text[len(PREFIX):] if text.startswith(PREFIX) else text
    name, _, server = body.partition("@")
    hint = "e.g. dns-srv:_grpc._tcp.faasmoe-nodes.faasmoe.svc.cluster.local"
    labels = name.rstrip(".").split(".")
    if len(labels) < 3 or not labels[0].startswith("_") or labels[1] not in ("_tcp", "_udp") \
            or not all(labels):
        raise ConfigError(f"--discover {text!r}: the SRV name must look like _PORTNAME._tcp.SERVICE.NAMESPACE.svc."
                          f"ZONE ({hint})")
    try:
        dns.name.from_text(name)
    except dns.exception.DNSException as exc:
        raise ConfigError(f"--discover {text!r}: {name!r} is not a DNS name ({exc})") from None
    if not server:
        return SrvSpec(name.rstrip(".") + ".")
    host, port = server, "53"
    if server.startswith("["):                          # [v6]:port
        host, _, rest = server[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else "53"
    elif server.count(":") == 1:
        host, port = server.split(":")
    try:
        address = str(ipaddress.ip_address(host))
    except ValueError:
        raise ConfigError(f"--discover {text!r}: the nameserver after @ must be an IP address, got {host!r}") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--discover {text!r}: nameserver port {port!r} is not a port number")
    return SrvSpec(name.rstrip(".") + ".", address, int(port))


def make_resolver(spec: SrvSpec, timeout_s: float = LOOKUP_TIMEOUT_S) -> dns.resolver.Resolver:
    if spec.nameserver is None:
        try:
            resolver = dns.resolver.Resolver()
        except dns.exception.DNSException as exc:
            raise ConfigError(f"cannot read the system's resolver configuration for {spec}: {exc}; give a "
                              "nameserver as NAME@HOST[:PORT]") from None
    else:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [spec.nameserver]
        resolver.port = spec.nameserver_port
    resolver.timeout = resolver.lifetime = timeout_s
    resolver.cache = None                               # every round asks the server: its answer is the state
    return resolver


def _key(target: str) -> str:
    return target.rstrip(".").lower()


def lookup(resolver: dns.resolver.Resolver, spec: SrvSpec, previous: dict[str, NodeRecord]) -> dict[str, NodeRecord]:
    """The nodes the SRV name lists now, by target host name. Raises dns.exception.DNSException when the
    lookup itself failed (the caller keeps what it had)."""
    try:
        answer = resolver.resolve(spec.name, "SRV", search=False)
    except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
        return {}
    addresses: dict[str, list[str]] = {}
    for rrset in answer.response.additional:           # most servers (CoreDNS, dnsmasq) send the A records along
        if rrset.rdtype == dns.rdatatype.A:
            addresses[_key(rrset.name.to_text())] = sorted(r.address for r in rrset)
    srvs = sorted(answer, key=lambda r: (r.priority, _key(r.target.to_text()), r.port))
    per_target: dict[str, int] = {}
    for srv in srvs:
        per_target[_key(srv.target.to_text())] = per_target.get(_key(srv.target.to_text()), 0) + 1
    found: dict[str, NodeRecord] = {}
    for srv in srvs:
        target = _key(srv.target.to_text())
        key = target if per_target[target] == 1 else f"{target}:{srv.port}"   # several ports on one host
        if target not in addresses:
            try:
                addresses[target] = sorted(r.address for r in resolver.resolve(target + ".", "A", search=False))
            except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
                log.warning("dns-srv: %s lists %s, which has no A record: skipped", spec.name, target)
                continue
            except dns.exception.DNSException as exc:
                if key in previous:                     # keep what we knew rather than flap on a timeout
                    found[key] = previous[key]
                log.warning("dns-srv: cannot resolve %s: %s", target, exc)
                continue
        found[key] = NodeRecord(node_id=key, host=addresses[target][0], port=srv.port, memory_budget_bytes=0,
                                free_bytes=0, threads=0, profile="", version="", source="dns-srv")
    return found


class SrvBrowser:
    """Resolves ``spec`` at start and every ``interval_s`` on a thread of its own; calls
    ``on_change(key, record)`` for a node that appeared or moved and ``on_change(key, None)`` for one that
    left the answer (``key``: the SRV target's host name). Callbacks run on the browser's thread."""

    def __init__(self, spec: SrvSpec | str, on_change: Callable[[str, NodeRecord | None], None],
                 interval_s: float = DEFAULT_INTERVAL_S, timeout_s: float = LOOKUP_TIMEOUT_S):
        if interval_s <= 0 or timeout_s <= 0:
            raise ConfigError("the DNS SRV interval and timeout must be > 0 s")
        self.spec = parse_spec(spec) if isinstance(spec, str) else spec
        self.interval_s = interval_s
        self._resolver = make_resolver(self.spec, timeout_s)
        self._on_change = on_change
        self._records: dict[str, NodeRecord] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="faasmoe-dns-srv", daemon=True)
        self._thread.start()
        log.info("dns-srv: resolving %s every %.1f s", self.spec, self.interval_s)

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        self._wake.set()
        thread.join(STOP_TIMEOUT_S)

    def refresh(self) -> None:
        """Resolve again now instead of at the next interval."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            self._round()
            self._wake.wait(self.interval_s)

    def _round(self) -> None:
        try:
            found = lookup(self._resolver, self.spec, self._records)
        except dns.exception.DNSException as exc:
            if not self._failing:
                log.warning("dns-srv: lookup of %s failed, keeping the %d nodes known: %s", self.spec,
                            len(self._records), exc)
            self._failing = True
            return
        if self._failing:
            log.info("dns-srv: %s answers again", self.spec)
        self._failing = False
        old, self._records = self._records, found
        for key in sorted(old.keys() - found.keys()):
            log.info("dns-srv: %s left %s", key, self.spec.name)
            self._emit(key, None)
        for key in sorted(found):
            if old.get(key) != found[key]:
                log.info("dns-srv: %s at %s", key, found[key].address)
                self._emit(key, found[key])

    def _emit(self, key: str, record: NodeRecord | None) -> None:
        try:
            self._on_change(key, record)
        except Exception:
            log.exception("dns-srv: on_change callback failed for %s", key)

    def __enter__(self) -> SrvBrowser:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
