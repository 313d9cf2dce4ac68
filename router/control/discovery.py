"""Browse mDNS for faasmoe nodes from a background thread (the router's main code is synchronous).

Records are hints: a crashed node stays listed for minutes, so liveness comes from the directory's
gRPC health checks (router/directory.py), not from here.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import ifaddr
from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from faasmoe.proto.discovery import SERVICE_TYPE, resolve_interfaces
from faasmoe.proto.errors import ConfigError

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT_MS = 3000
START_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class NodeRecord:
    node_id: str
    host: str
    port: int
    memory_budget_bytes: int
    free_bytes: int
    threads: int
    profile: str
    version: str
    source: str = "mdns"  # "mdns" or "static"
    cert: str = ""  # sha256 of the node's certificate (mutual TLS); "" for a plaintext node
    max_message_bytes: int = 0  # the largest frame the node accepts (0: not advertised)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def pick_host(addresses: Sequence[str], interfaces: Sequence[str]) -> str | None:
    """The advertised IPv4 address to dial: one on a subnet of our interfaces if any, else the first."""
    if not addresses:
        return None
    networks = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and ip.ip in interfaces:
                networks.append(ipaddress.IPv4Network(f"{ip.ip}/{ip.network_prefix}", strict=False))
    for address in addresses:
        if any(ipaddress.IPv4Address(address) in net for net in networks):
            return address
    return addresses[0]


def record_from_txt(txt: Mapping[str, str], host: str, port: int) -> NodeRecord:
    """Raises KeyError / ValueError when the TXT is not a faasmoe node's."""
    return NodeRecord(
        node_id=txt["node_id"],
        host=host,
        port=port,
        memory_budget_bytes=int(txt["memory_budget_bytes"]),
        free_bytes=int(txt["free_bytes"]),
        threads=int(txt["threads"]),
        profile=txt["profile"],
        version=txt["version"],
        cert=txt.get("cert", ""),
        max_message_bytes=int(txt.get("max_message_bytes", "0")),
    )


class MdnsBrowser:
    """Calls ``on_change(node_id, record)`` when a node appears or changes, ``on_change(node_id, None)``
    on its goodbye. Callbacks run on the browser's thread."""

    def __init__(self, interfaces: Sequence[str], on_change: Callable[[str, NodeRecord | None], None]):
        self.interfaces = resolve_interfaces(interfaces)
        self._on_change = on_change
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._records: dict[str, NodeRecord] = {}  # by service name
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task] = set()

    def start(self) -> None:
        if self._thread is not None:
            return
        started = threading.Event()
        failure: list[BaseException] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._run, args=(started, failure), name="faasmoe-mdns-browser", daemon=True
        )
        self._thread.start()
        if not started.wait(START_TIMEOUT_S):
            raise ConfigError(f"mDNS browser did not start within {START_TIMEOUT_S:.0f} s")
        if failure:
            self._thread.join()
            self._thread = None
            raise failure[0]

    def _run(self, started: threading.Event, failure: list[BaseException]) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._open())
        except BaseException as err:  # reported to start()'s caller
            failure.append(err if isinstance(err, ConfigError) else ConfigError(
                f"cannot browse mDNS on {', '.join(self.interfaces)}: {err}"))
            started.set()
            loop.close()
            return
        started.set()
        loop.run_forever()
        loop.close()

    async def _open(self) -> None:
        self._aiozc = AsyncZeroconf(interfaces=list(self.interfaces))
        self._browser = AsyncServiceBrowser(
            self._aiozc.zeroconf, SERVICE_TYPE, handlers=[self._on_service_state_change]
        )
        log.info("mDNS: browsing %s on %s", SERVICE_TYPE, ", ".join(self.interfaces))

    def _on_service_state_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        task = asyncio.get_running_loop().create_task(self._handle(name, state_change))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, name: str, state_change: ServiceStateChange) -> None:
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:  # events for one name are handled in order
            if state_change is ServiceStateChange.Removed:
                old = self._records.pop(name, None)
                if old is not None:
                    log.info("mDNS: %s said goodbye", old.node_id)
                    self._emit(old.node_id, None)
                return
            record = await self._resolve(name)
            if record is None:
                return
            old = self._records.get(name)
            if old == record:
                return
            if old is not None and old.node_id != record.node_id:
                self._emit(old.node_id, None)
            self._records[name] = record
            log.info("mDNS: %s at %s (%s)", record.node_id, record.address, state_change.name.lower())
            self._emit(record.node_id, record)

    async def _resolve(self, name: str) -> NodeRecord | None:
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._aiozc.zeroconf, RESOLVE_TIMEOUT_MS):
            log.warning("mDNS: could not resolve %s within %d ms", name, RESOLVE_TIMEOUT_MS)
            return None
        txt = {
            key.decode(): (value or b"").decode()
            for key, value in info.properties.items()
            if isinstance(key, bytes)
        }
        host = pick_host(info.parsed_addresses(IPVersion.V4Only), self.interfaces)
        try:
            if host is None or info.port is None:
                raise ValueError("no IPv4 address or port")
            return record_from_txt(txt, host, info.port)
        except (KeyError, ValueError) as err:
            log.warning("mDNS: ignoring %s, not a usable faasmoe record (%s): %s", name, err, txt)
            return None

    def _emit(self, node_id: str, record: NodeRecord | None) -> None:
        try:
            self._on_change(node_id, record)
        except Exception:
            log.exception("mDNS: on_change callback failed for %s", node_id)

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        self._thread = None
        if thread is None or loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout=START_TIMEOUT_S)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=START_TIMEOUT_S)

    async def _close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._aiozc is not None:
            await self._aiozc.async_close()

    def __enter__(self) -> MdnsBrowser:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
