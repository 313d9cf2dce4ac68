"""The discovery contract shared by nodes (advertise) and routers (browse): the mDNS service type, the TXT
keys, and which IPv4 interfaces to use."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import ifaddr

from faasmoe.proto.errors import ConfigError

SERVICE_TYPE = "_faasmoe._tcp.local."
TXT_KEYS = ("node_id", "port", "memory_budget_bytes", "free_bytes", "threads", "profile", "version")


def is_loopback(host: str) -> bool:
    """Is ``host`` (an address, or "localhost") a loopback address: reachable from this host only?"""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def host_ipv4_addresses(include_loopback: bool = False) -> list[str]:
    """The host's IPv4 addresses, in adapter order."""
    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if isinstance(ip.ip, str) and ip.ip not in found:
                if include_loopback or not ipaddress.IPv4Address(ip.ip).is_loopback:
                    found.append(ip.ip)
    return found


def resolve_interfaces(interfaces: Sequence[str]) -> list[str]:
    """Check explicit interface addresses, or pick all non-loopback IPv4 ones (127.0.0.1 if none).

    Raises ConfigError for anything that is not an IPv4 address of this host.
    """
    if isinstance(interfaces, str):
        interfaces = [part.strip() for part in interfaces.split(",") if part.strip()]
    if not interfaces:
        return host_ipv4_addresses() or ["127.0.0.1"]
    available = host_ipv4_addresses(include_loopback=True)
    chosen: list[str] = []
    for item in interfaces:
        try:
            address = str(ipaddress.IPv4Address(item))
        except ValueError:
            raise ConfigError(
                f"mDNS interface {item!r} is not an IPv4 address; give addresses such as 192.168.1.5 "
                f"(this host has {', '.join(available) or 'none'})"
            ) from None
        if address not in available:
            raise ConfigError(
                f"mDNS interface {address} is not an address of this host; "
                f"use one of {', '.join(available) or 'none'}"
            )
        if address not in chosen:
            chosen.append(address)
    return chosen
