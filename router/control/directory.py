"""The router's node directory: static ``host:port`` nodes plus mDNS or DNS SRV records, kept honest by gRPC
health checks.

A node is ``up`` only while the standard gRPC health service answers SERVING. mDNS only tells us a node exists
(a crashed node stays listed for minutes); every known node gets one channel and one checker thread that calls
``grpc.health.v1.Health/Check`` every ``health_interval_s``, and at once when the channel's connection drops.
A killed node (its kernel resets the connection) is reported down within milliseconds; a hung or partitioned
one after at most about ``health_interval_s + health_timeout_s``.

Discovery is a hint, never an authority:

- With cluster credentials (``tls``) a node counts as up only after :func:`faasmoe.router.control.probe.probe`
  saw the chain validate and the certificate's fingerprint equal the one in its mDNS record (static nodes and
  DNS SRV records, which carry no fingerprint: any node certificate of the cluster). A spoofed record, with the
  wrong certificate or none, gets no call.
- A goodbye, or a record for the same node at another address, only makes the directory check the old entry
  at once: it is removed when its health check fails, kept while the node still answers.
- Records that never come up are dropped after ``DROP_NEVER_UP_AFTER`` failed checks, and at most
  ``MAX_CANDIDATES`` of them are tracked at a time, so a flood of adverts cannot grow the directory.

Subscribers get a :class:`DirectoryEvent` for every change, in order, from one dispatcher thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from faasmoe.proto.credentials import TlsMaterial
from faasmoe.proto.errors import ConfigError, MeshError
from faasmoe.router.mesh.channel import make_channel
from faasmoe.router.control.probe import Verified, probe
from faasmoe.router.control.discovery import MdnsBrowser, NodeRecord
from faasmoe.router.control.dns_srv import DEFAULT_INTERVAL_S as SRV_INTERVAL_S, SrvBrowser

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 5.0
DROP_NEVER_UP_AFTER = 10
DROP_AFTER_GOODBYE = 3            # failed checks in a row after a goodbye before a node is removed
MAX_CANDIDATES = 256


@dataclass(frozen=True)
class NodeState:
    node_id: str
    address: str  # host:port
    record: NodeRecord | None  # the mDNS record, None for a static node nobody advertises
    up: bool
    last_ok_s_ago: float | None  # None: never answered a health check
    consecutive_failures: int
    static: bool
    fingerprint: str | None = None  # of the certificate it presented (mutual TLS), None in plaintext
    doubted: str = ""  # a goodbye or another address was heard for it, and its checks still pass


@dataclass(frozen=True)
class DirectoryEvent:
    kind: str  # "added" | "removed" | "up" | "down" | "updated"
    node: NodeState


def parse_address(address: str) -> str:
    """Normalise ``host:port`` (``[v6]:port`` too); ConfigError when malformed."""
    host, sep, port = address.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"node address {address!r} is not host:port (e.g. 192.168.1.5:50051)")
    return f"{host}:{int(port)}"


@dataclass(eq=False)
class _Entry:
    address: str
    static: bool
    record: NodeRecord | None = None
    up: bool = False
    last_ok_monotonic_s: float | None = None
    consecutive_failures: int = 0
    stopped: bool = False
    wake: threading.Event = field(default_factory=threading.Event)
    channel: grpc.Channel | None = None
    thread: threading.Thread | None = None
    verified: Verified | None = None   # mutual TLS: who the probe found at this address
    ever_up: bool = False
    doubted: str = ""                  # a goodbye or a newer address was heard (see _check)
    doubted_to: str = ""               # the newer address, if that is what was heard
    doubt_logged: bool = False
    last_why: str = ""

    @property
    def node_id(self) -> str:
        if self.verified is not None:
            return self.verified.node_id
        return self.record.node_id if self.record is not None else self.address

    def state(self, now_s: float) -> NodeState:
        last = self.last_ok_monotonic_s
        return NodeState(self.node_id, self.address, self.record, self.up,
                         None if last is None else now_s - last, self.consecutive_failures, self.static,
                         self.verified.fingerprint if self.verified is not None else None, self.doubted)


class NodeDirectory:
    def __init__(
        self,
        static: Sequence[str] = (),
        mdns_interfaces: Sequence[str] | None = None,  # None: no mDNS; []: all non-loopback IPv4
        health_interval_s: float = 1.0,
        health_timeout_s: float = 1.0,
        failures_to_down: int = 1,
        tls: TlsMaterial | None = None,  # cluster credentials: probe every node, mutual TLS health checks
        dns_srv: str | None = None,  # an SRV name (dns_srv.parse_spec) to resolve every dns_srv_interval_s
        dns_srv_interval_s: float = SRV_INTERVAL_S,
    ):
        if health_interval_s <= 0 or health_timeout_s <= 0 or failures_to_down < 1:
            raise ConfigError("health interval and timeout must be > 0 s and failures_to_down >= 1")
        self._static = list(dict.fromkeys(parse_address(a) for a in static))
        self._interval_s, self._timeout_s = health_interval_s, health_timeout_s
        self._failures_to_down = failures_to_down
        self.tls = tls
        self._cond = threading.Condition()
        self._entries: dict[str, _Entry] = {}  # by address
        self._subscribers: list[Callable[[DirectoryEvent], None]] = []
        self._events: queue.SimpleQueue[DirectoryEvent | None] = queue.SimpleQueue()
        self._dispatcher: threading.Thread | None = None
        self._browsers: list[MdnsBrowser | SrvBrowser] = []
        if mdns_interfaces is not None:
            self._browsers.append(MdnsBrowser(mdns_interfaces, self._on_mdns))
        if dns_srv is not None:
            self._browsers.append(SrvBrowser(dns_srv, self._on_mdns, interval_s=dns_srv_interval_s))
        self._running = False

    # -- lifecycle ---------------------------------------------------------------------------------------
    def start(self) -> None:
        with self._cond:
            if self._running:
                return
            self._running = True
            self._dispatcher = threading.Thread(target=self._dispatch, name="faasmoe-directory-events",
                                                daemon=True)
            self._dispatcher.start()
            for address in self._static:
                self._add(address, static=True, record=None)
        try:
            for browser in self._browsers:
                browser.start()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for browser in self._browsers:
            browser.stop()
        with self._cond:
            if not self._running:
                return
            self._running = False
            entries = list(self._entries.values())
            for entry in entries:
                self._retire(entry)
            self._entries.clear()
            self._cond.notify_all()
        for entry in entries:
            if entry.thread is not None:
                entry.thread.join(self._timeout_s + STOP_TIMEOUT_S)
        self._events.put(None)
        if self._dispatcher is not None:
            self._dispatcher.join(STOP_TIMEOUT_S)

    def __enter__(self) -> NodeDirectory:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- queries -----------------------------------------------------------------------------------------
    def snapshot(self) -> list[NodeState]:
        with self._cond:
            return self._snapshot_locked()

    def _snapshot_locked(self) -> list[NodeState]:
        now_s = time.monotonic()
        return sorted((e.state(now_s) for e in self._entries.values()), key=lambda s: (s.node_id, s.address))

    def up_nodes(self) -> list[NodeState]:
        return [state for state in self.snapshot() if state.up]

    def channel(self, address: str) -> grpc.Channel | None:
        """The directory's channel to ``address`` (closed when the node is removed)."""
        with self._cond:
            entry = self._entries.get(address)
            return entry.channel if entry is not None else None

    def wait_for(self, predicate: Callable[[list[NodeState]], bool], timeout_s: float) -> bool:
        """Block until ``predicate(snapshot)`` holds (re-evaluated on every change and health check)."""
        deadline_s = time.monotonic() + timeout_s
        with self._cond:
            while not predicate(self._snapshot_locked()):
                remaining_s = deadline_s - time.monotonic()
                if remaining_s <= 0:
                    return False
                self._cond.wait(remaining_s)
            return True

    def subscribe(self, callback: Callable[[DirectoryEvent], None]) -> Callable[[], None]:
        """Call ``callback(event)`` on every change; returns a function that unsubscribes."""
        with self._cond:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._cond:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def mark_down(self, address: str) -> None:
        """Stop reporting ``address`` up at once (an RPC to it failed with UNAVAILABLE); the next successful
        health check brings it back."""
        with self._cond:
            entry = self._entries.get(address)
            if entry is None:
                return
            entry.consecutive_failures += 1
            if entry.up:
                entry.up = False
                log.warning("node %s (%s) marked down by the router", entry.node_id, address)
                self._emit("down", entry)
            entry.wake.set()

    # -- mDNS and DNS SRV (hints) ----------------------------------------------------------------------------
    def _on_mdns(self, node_id: str, record: NodeRecord | None) -> None:
        with self._cond:
            if not self._running:
                return
            for entry in list(self._entries.values()):
                if entry.record is None or entry.record.node_id != node_id:
                    continue
                if record is not None and entry.address == record.address:
                    continue
                entry.doubted = "said goodbye" if record is None else f"advertised again at {record.address}"
                entry.doubted_to = "" if record is None else record.address
                entry.doubt_logged = False
                entry.wake.set()      # checked now: removed if it fails, kept while it answers
            if record is None:
                return
            entry = self._entries.get(record.address)
            if entry is None:
                candidates = sum(1 for e in self._entries.values() if not e.static and not e.ever_up)
                if candidates >= MAX_CANDIDATES:
                    log.warning("mDNS: ignoring %s at %s: %d records are waiting to be verified already",
                                node_id, record.address, candidates)
                    return
                self._add(record.address, static=False, record=record)
            else:
                entry.doubted = ""                        # advertised (again) here: no longer in doubt
                if entry.record != record:
                    if entry.record is None or entry.record.cert != record.cert:
                        entry.verified = None             # another certificate: probe again before the next check
                        entry.wake.set()
                    entry.record = record
                    self._emit("updated", entry)

    def _drop(self, entry: _Entry, why: str) -> None:
        log.warning("node %s (%s) removed from the directory: %s", entry.node_id, entry.address, why)
        if entry.static:
            entry.record, entry.doubted = None, ""
            self._emit("updated", entry)
        else:
            self._retire(entry)
            del self._entries[entry.address]
            self._emit("removed", entry)

    # -- entries and health checks (call with the lock held) ---------------------------------------------
    def _add(self, address: str, static: bool, record: NodeRecord | None) -> None:
        entry = _Entry(address, static, record)
        entry.channel = make_channel(address, tls=self.tls)
        entry.thread = threading.Thread(target=self._check_loop, args=(entry,),
                                        name=f"faasmoe-health-{address}", daemon=True)
        self._entries[address] = entry
        self._emit("added", entry)
        entry.thread.start()

    def _retire(self, entry: _Entry) -> None:
        entry.stopped = True  # the checker thread closes the channel on its way out
        if entry.up:
            entry.up = False
        entry.wake.set()

    def _check_loop(self, entry: _Entry) -> None:
        stub = health_pb2_grpc.HealthStub(entry.channel)
        request = health_pb2.HealthCheckRequest(service="")
        was_ready = False

        def on_connectivity(state: grpc.ChannelConnectivity) -> None:
            nonlocal was_ready  # a dropped connection (node killed, GOAWAY) triggers a check at once
            if was_ready and state is not grpc.ChannelConnectivity.READY:
                entry.wake.set()
            was_ready = state is grpc.ChannelConnectivity.READY

        entry.channel.subscribe(on_connectivity)
        try:
            while not entry.stopped:
                entry.wake.clear()
                try:
                    self._verify(entry)
                    reply = stub.Check(request, timeout=self._timeout_s)
                    ok = reply.status == health_pb2.HealthCheckResponse.SERVING
                    why = "" if ok else health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
                except MeshError as err:
                    ok, why = False, str(err)
                except grpc.RpcError as err:
                    ok, why = False, f"{err.code().name}: {err.details()}"
                except Exception as err:  # e.g. the channel was closed under us
                    ok, why = False, repr(err)
                self._record_check(entry, ok, why)
                entry.wake.wait(self._interval_s)
        finally:
            entry.channel.unsubscribe(on_connectivity)
            entry.channel.close()

    def _verify(self, entry: _Entry) -> None:
        """Mutual TLS: who answers at the address must be the node advertised (MeshError otherwise)."""
        if self.tls is None or entry.verified is not None:
            return
        record = entry.record
        mdns = record is not None and record.source == "mdns"     # SRV records name no node and no certificate
        if mdns and not record.cert and not entry.static:
            raise ConfigError("its mDNS record carries no certificate fingerprint")
        found = probe(entry.address, self.tls, record.cert if record is not None and record.cert else None,
                      self._timeout_s)
        if mdns and record.node_id != found.node_id:
            raise ConfigError(f"advertised as {record.node_id!r} but its certificate is node:{found.node_id}")
        with self._cond:
            entry.verified = found

    def _record_check(self, entry: _Entry, ok: bool, why: str) -> None:
        with self._cond:
            if entry.stopped or self._entries.get(entry.address) is not entry:
                return
            if ok:
                entry.last_ok_monotonic_s = time.monotonic()
                entry.consecutive_failures, entry.last_why = 0, ""
                if entry.doubted and not entry.doubt_logged:     # kept; removed when a check fails
                    log.warning("node %s (%s) %s, but its health checks pass: kept while they do", entry.node_id,
                                entry.address, entry.doubted)
                    entry.doubt_logged = True
                if not entry.up:
                    entry.up = entry.ever_up = True
                    log.info("node %s (%s) is up", entry.node_id, entry.address)
                    self._emit("up", entry)
            else:
                entry.consecutive_failures += 1
                if why != entry.last_why:
                    log.log(logging.WARNING if self.tls is not None and "certificate" in why else logging.INFO,
                            "node %s (%s) check failed: %s", entry.node_id, entry.address, why)
                    entry.last_why = why
                if self.tls is not None:
                    entry.verified = None         # whoever answers next is probed again
                if entry.up and entry.consecutive_failures >= self._failures_to_down:
                    entry.up = False
                    log.warning("node %s (%s) is down: %s", entry.node_id, entry.address, why)
                    self._emit("down", entry)
                moved = self._entries.get(entry.doubted_to) if entry.doubted_to else None
                if entry.doubted and not entry.up and (
                        (moved is not None and moved.up and moved.node_id == entry.node_id)
                        or (not entry.doubted_to and entry.consecutive_failures >= DROP_AFTER_GOODBYE)
                        or entry.consecutive_failures >= DROP_NEVER_UP_AFTER):
                    # it answers at its new address (verified there), or said goodbye and failed several checks in
                    # a row, or has been silent for long: a spoofed record plus one failed check removes nothing
                    self._drop(entry, f"{entry.doubted} and its health check failed ({why})")
                elif not entry.static and not entry.ever_up and entry.consecutive_failures >= DROP_NEVER_UP_AFTER:
                    self._drop(entry, f"never answered ({why})")
            self._cond.notify_all()

    def _emit(self, kind: str, entry: _Entry) -> None:
        self._events.put(DirectoryEvent(kind, entry.state(time.monotonic())))
        self._cond.notify_all()

    def _dispatch(self) -> None:
        while (event := self._events.get()) is not None:
            with self._cond:
                subscribers = list(self._subscribers)
            for callback in subscribers:
                try:
                    callback(event)
                except Exception:
                    log.exception("directory subscriber %r failed on %s", callback, event.kind)
