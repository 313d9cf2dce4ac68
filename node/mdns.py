"""Advertise a node over mDNS as ``<node_id>._faasmoe._tcp.local.``.

mDNS is only a hint for the router: it learns that a node exists and what it offers (TXT), while liveness
comes from gRPC health checks (a crashed node's records linger for minutes). Node side only: stdlib,
zeroconf and faasmoe.proto.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence

from zeroconf import NonUniqueNameException, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

from faasmoe.proto.discovery import SERVICE_TYPE, TXT_KEYS, resolve_interfaces
from faasmoe.proto.errors import ConfigError

log = logging.getLogger(__name__)

FREE_CHANGE_FRACTION = 0.05  # of memory_budget_bytes: a smaller change of free_bytes is not re-announced
FREE_CHANGE_BYTES = 64 * 1024 * 1024  # ... nor a change below this, unless it reaches the fraction above


def needs_update(old_txt: Mapping[str, str] | None, new_txt: Mapping[str, str]) -> bool:
    """Whether ``new_txt`` differs enough from the last announced ``old_txt`` to re-announce.

    Any key other than free_bytes that changed counts; free_bytes counts once it moved by at least
    5 % of the memory budget or by at least 64 MiB.
    """
    if old_txt is None:
        return True
    if set(old_txt) != set(new_txt):
        return True
    if any(old_txt[key] != new_txt[key] for key in new_txt if key != "free_bytes"):
        return True
    old_free, new_free = old_txt.get("free_bytes"), new_txt.get("free_bytes")
    if old_free == new_free:
        return False
    try:
        delta_bytes = abs(int(new_free) - int(old_free))
        budget_bytes = int(new_txt.get("memory_budget_bytes", "0"))
    except (TypeError, ValueError):
        return True
    return delta_bytes >= FREE_CHANGE_FRACTION * budget_bytes or delta_bytes >= FREE_CHANGE_BYTES


class NodeAdvertiser:
    """Registers this node on mDNS, re-announces material TXT changes, and says goodbye on stop.

    ``txt()`` returns memory_budget_bytes, free_bytes, threads, profile and version (strings);
    node_id and port are filled in here.
    """

    def __init__(
        self,
        node_id: str,
        port: int,
        interfaces: Sequence[str],
        txt: Callable[[], dict[str, str]],
    ):
        self.node_id = node_id
        self.port = port
        self.interfaces = resolve_interfaces(interfaces)
        self.name = f"{node_id}.{SERVICE_TYPE}"
        self._txt = txt
        self._zc: AsyncZeroconf | None = None
        self._info: ServiceInfo | None = None
        self._announced: dict[str, str] | None = None
        self._announcing: asyncio.Future | None = None  # the repeated announcements still being sent

    def current_txt(self) -> dict[str, str]:
        txt = {key: str(value) for key, value in self._txt().items()}
        txt.update(node_id=self.node_id, port=str(self.port))
        missing = [key for key in TXT_KEYS if key not in txt]
        if missing:
            raise ValueError(f"mDNS TXT for node {self.node_id} lacks {', '.join(missing)}")
        return txt

    def _service_info(self, txt: dict[str, str]) -> ServiceInfo:
        return ServiceInfo(
            SERVICE_TYPE,
            self.name,
            port=self.port,
            properties=txt,
            server=self.name,
            parsed_addresses=self.interfaces,
        )

    async def start(self) -> None:
        txt = self.current_txt()
        try:
            self._zc = AsyncZeroconf(interfaces=list(self.interfaces))
        except OSError as err:
            raise ConfigError(f"cannot open mDNS sockets on {', '.join(self.interfaces)}: {err}") from err
        info = self._service_info(txt)
        try:
            self._announcing = await self._zc.async_register_service(info)
        except NonUniqueNameException:
            await self._zc.async_close()
            self._zc = None
            raise ConfigError(
                f"node id {self.node_id!r} is already advertised on mDNS by another node; "
                "give this node a unique --node-id"
            ) from None
        self._info, self._announced = info, txt
        log.info("mDNS: advertising %s on %s port %d", self.name, ", ".join(self.interfaces), self.port)

    async def update(self) -> bool:
        """Re-read txt(); re-announce when it changed materially. Returns whether it did."""
        if self._zc is None or self._info is None:
            return False
        txt = self.current_txt()
        if not needs_update(self._announced, txt):
            return False
        info = self._service_info(txt)
        await self._cancel_announcements()
        self._announcing = await self._zc.async_update_service(info)
        self._info, self._announced = info, txt
        log.debug("mDNS: re-announced %s with %s", self.name, txt)
        return True

    async def stop(self) -> None:
        """Unregister (sends the goodbye) and close the sockets."""
        zc, info = self._zc, self._info
        self._zc = self._info = None
        if zc is None:
            return
        try:
            # an announcement still in flight after the goodbye would resurrect the node on browsers
            await self._cancel_announcements()
            if info is not None:
                goodbye = await zc.async_unregister_service(info)
                await goodbye
        finally:
            await zc.async_close()
        log.info("mDNS: withdrew %s", self.name)

    async def _cancel_announcements(self) -> None:
        announcing, self._announcing = self._announcing, None
        if announcing is not None and not announcing.done():
            announcing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await announcing

    async def __aenter__(self) -> NodeAdvertiser:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


UPDATE_INTERVAL_S = 1.0


def advertise_interfaces(host: str, interfaces: Sequence[str]) -> list[str]:
    """Where to advertise: the explicit ``--mdns-interface`` list; else the listen address when the node
    listens on one address; else (``0.0.0.0``) the host's non-loopback IPv4 addresses."""
    if interfaces:
        return list(interfaces)
    if host not in ("0.0.0.0", "", "::"):
        return [host]
    return []


@contextlib.asynccontextmanager
async def advertised(node):
    """The node extension: advertise ``node`` (a started NodeServer) for its lifetime, re-announcing its
    TXT record when free memory changes materially (checked every UPDATE_INTERVAL_S)."""
    advertiser = NodeAdvertiser(node.config.node_id, node.port,
                                advertise_interfaces(node.config.host, node.config.mdns_interfaces), node.advert)
    await advertiser.start()

    async def refresh():
        while True:
            await asyncio.sleep(UPDATE_INTERVAL_S)
            try:
                await advertiser.update()
            except Exception as exc:  # keep serving whatever mDNS does
                log.warning("mDNS update failed: %s", exc)

    task = asyncio.create_task(refresh())
    try:
        yield advertiser
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await advertiser.stop()
