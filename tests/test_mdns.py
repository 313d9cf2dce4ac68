"""mDNS advertiser and browser on the loopback interface (real python-zeroconf, no mocks)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

import pytest

from faasmoe.node.mdns import NodeAdvertiser, needs_update
from faasmoe.proto.discovery import resolve_interfaces
from faasmoe.proto.errors import ConfigError
from faasmoe.router.control.discovery import MdnsBrowser, NodeRecord

LOOPBACK = ["127.0.0.1"]
GIB = 1024**3
MIB = 1024**2


def txt(free_bytes: int, budget_bytes: int = 4 * GIB, **other: str) -> dict[str, str]:
    base = dict(node_id="n1", port="50051", memory_budget_bytes=str(budget_bytes), free_bytes=str(free_bytes),
                threads="2", profile="pi5", version="0.1.0")
    return base | other


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        (None, txt(GIB), True),  # first announcement
        (txt(GIB), txt(GIB), False),
        (txt(GIB), txt(GIB - 10 * MIB), False),  # 10 MiB < min(5 % of 4 GiB, 64 MiB)
        (txt(GIB), txt(GIB - 64 * MIB), True),  # 64 MiB
        (txt(GIB), txt(GIB + 64 * MIB), True),  # freed memory counts too
        (txt(GIB), txt(GIB - 63 * MIB), False),  # 63 MiB < 64 MiB, and < 5 % of 4 GiB (204.8 MiB)
        (txt(100 * MIB, 200 * MIB), txt(90 * MIB, 200 * MIB), True),  # 10 MiB = 5 % of a 200 MiB budget
        (txt(100 * MIB, 200 * MIB), txt(95 * MIB, 200 * MIB), False),  # 5 MiB = 2.5 %
        (txt(GIB), txt(GIB, threads="4"), True),  # any other key
        (txt(GIB), txt(GIB, version="0.2.0"), True),
        (txt(GIB), txt(GIB - MIB, profile="x86"), True),
        (txt(GIB), txt(GIB) | {"extra": "1"}, True),  # a key appeared
        (txt(GIB), txt(GIB) | {"free_bytes": "lots"}, True),  # unparsable: treat as changed
    ],
)
def test_needs_update(old, new, expected):
    assert needs_update(old, new) is expected


def test_bad_interfaces_are_config_errors():
    with pytest.raises(ConfigError, match="not an IPv4 address"):
        resolve_interfaces(["eth0"])
    with pytest.raises(ConfigError, match="not an address of this host"):
        resolve_interfaces(["203.0.113.77"])
    assert resolve_interfaces(["127.0.0.1", "127.0.0.1"]) == ["127.0.0.1"]
    assert resolve_interfaces([])  # all non-loopback IPv4 addresses, or 127.0.0.1


class Seen:
    """What a browser reported, with condition-based waiting."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.records: dict[str, NodeRecord | None] = {}
        self.at_s: dict[str, float] = {}

    def __call__(self, node_id: str, record: NodeRecord | None) -> None:
        with self.cond:
            self.records[node_id] = record
            self.at_s[node_id] = time.monotonic()
            self.cond.notify_all()

    def wait(self, predicate, timeout_s: float = 5.0) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: predicate(self.records), timeout_s)

    async def await_(self, predicate, timeout_s: float = 5.0) -> bool:
        # wait off the event loop: the advertiser's zeroconf must keep answering meanwhile
        return await asyncio.to_thread(self.wait, predicate, timeout_s)


def test_advertiser_and_browser_on_loopback():
    node_id = f"node-{uuid.uuid4().hex[:8]}"
    state = {"free_bytes": 3 * GIB}

    def node_txt() -> dict[str, str]:
        return dict(memory_budget_bytes=str(4 * GIB), free_bytes=str(state["free_bytes"]), threads="2",
                    profile="pi5", version="0.1.0")

    async def scenario(seen: Seen) -> None:
        advertiser = NodeAdvertiser(node_id, 50123, LOOPBACK, node_txt)
        started_s = time.monotonic()
        await advertiser.start()
        assert await seen.await_(lambda r: r.get(node_id) is not None)
        print(f"register -> seen by browser: {seen.at_s[node_id] - started_s:.2f} s")
        assert seen.records[node_id] == NodeRecord(node_id, "127.0.0.1", 50123, 4 * GIB, 3 * GIB, 2, "pi5",
                                                   "0.1.0", "mdns")

        state["free_bytes"] -= MIB  # immaterial: not re-announced
        assert await advertiser.update() is False
        state["free_bytes"] = 2 * GIB
        assert await advertiser.update() is True
        assert await seen.await_(lambda r: r[node_id] is not None and r[node_id].free_bytes == 2 * GIB)

        stopped_s = time.monotonic()
        await advertiser.stop()
        assert await seen.await_(lambda r: r[node_id] is None)
        print(f"goodbye -> removal: {seen.at_s[node_id] - stopped_s:.3f} s")
        # the update's repeated announcements were still in flight: none may resurrect the node
        assert not await seen.await_(lambda r: r[node_id] is not None, timeout_s=1.0)

    seen = Seen()
    with MdnsBrowser(LOOPBACK, seen):
        asyncio.run(scenario(seen))


def test_duplicate_node_id_is_a_one_line_error():
    node_id = f"dup-{uuid.uuid4().hex[:8]}"

    def node_txt() -> dict[str, str]:
        return dict(memory_budget_bytes="1000", free_bytes="1000", threads="1", profile="t", version="0")

    async def scenario() -> None:
        first = NodeAdvertiser(node_id, 50124, LOOPBACK, node_txt)
        await first.start()
        try:
            second = NodeAdvertiser(node_id, 50125, LOOPBACK, node_txt)
            with pytest.raises(ConfigError, match="already advertised") as caught:
                await second.start()
            assert "\n" not in str(caught.value)
        finally:
            await first.stop()

    asyncio.run(scenario())
