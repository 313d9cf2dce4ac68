"""The live tenants of a server: the tenants file, reloaded on SIGHUP or when it changes on disk (a malformed
file is refused with a one-line error and the last good one stays); or, without a file, one open tenant
``default`` (the server then listens on loopback only). A private router (``serve --tenant NAME``) accepts
only that tenant's key."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from faasmoe.proto.errors import ConfigError, Unauthorized
from faasmoe.router.tenancy.config import Tenant, TenantsConfig, load_tenants

log = logging.getLogger(__name__)
DEFAULT = Tenant("default", "")


class TenantRegistry:
    def __init__(self, path: str | Path | None, private: str | None = None):
        self.path = Path(path) if path else None
        self.private = private
        self.config = TenantsConfig({"default": DEFAULT}) if self.path is None else load_tenants(self.path)
        self._stamp = self._file_stamp()
        self.reloads = 0
        self.last_error: str | None = None
        if private is not None and private not in self.config.tenants:
            raise ConfigError(f"{self.path or 'no tenants file'}: no tenant {private!r} to serve privately "
                              "(add it with 'faasmoe-router tenants add')")

    @property
    def open(self) -> bool:
        """No tenants file: everyone is the tenant ``default``, without a key."""
        return self.path is None

    def _file_stamp(self):
        if self.path is None:
            return None
        try:
            st = os.stat(self.path)
            return st.st_mtime_ns, st.st_size, st.st_ino
        except OSError:
            return None

    def reload(self) -> bool:
        """Read the file again; on error keep the last good tenants (returns whether it took)."""
        if self.path is None:
            return False
        self._stamp = self._file_stamp()
        try:
            config = load_tenants(self.path)
            if self.private is not None and self.private not in config.tenants:
                raise ConfigError(f"{self.path}: tenant {self.private!r}, which this router serves, is gone")
        except ConfigError as exc:
            self.last_error = str(exc)
            log.error("tenants not reloaded, keeping the last good ones: %s", exc)
            return False
        self.config, self.last_error = config, None
        self.reloads += 1
        log.warning("tenants reloaded from %s: %d tenants", self.path, len(config.tenants))
        return True

    async def watch(self, interval_s: float = 1.0) -> None:
        """Reload whenever the file changes (the server also reloads on SIGHUP)."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                if self._file_stamp() != self._stamp:
                    self.reload()
            except Exception:  # noqa: BLE001 - watching must outlive any surprise
                log.exception("watching the tenants file failed")

    def tenant(self, name: str) -> Tenant | None:
        return self.config.tenants.get(name)

    def weight(self, name: str) -> float:
        tenant = self.config.tenants.get(name)
        return tenant.weight if tenant is not None else 1.0

    def authenticate(self, authorization: str | None) -> Tenant:
        if self.open:
            return DEFAULT
        key = _bearer(authorization)
        tenant = self.config.by_key(key) if key else None
        if tenant is None:
            raise Unauthorized("missing or wrong API key: send 'Authorization: Bearer <key>'" if not key
                               else "wrong API key")
        if self.private is not None and tenant.name != self.private:
            raise Unauthorized("wrong API key")
        return tenant

    def authenticate_admin(self, authorization: str | None) -> None:
        if self.open:
            return
        key = _bearer(authorization)
        if not key or not self.config.is_admin(key):
            raise Unauthorized("usage needs the admin key (admin_key_sha256 in the tenants file)")


def _bearer(authorization: str | None) -> str:
    if not authorization:
        return ""
    scheme, _, value = authorization.partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""
