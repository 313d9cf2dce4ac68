"""What every faasmoe HTTP server shares, whatever serves the model behind it (the mesh, or a full model in
the process): tenants (keys, limits, reloads), the usage ledger, and uvicorn's lifecycle with the ready line
``FAASMOE_ROUTER_READY {"url": ...}`` that tests and scripts wait for."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass

import uvicorn

from faasmoe.proto.discovery import is_loopback
from faasmoe.proto.errors import ConfigError
from faasmoe.proto.ready import ROUTER_READY, ready_line
from faasmoe.router.tenancy.accounting import Accounting
from faasmoe.router.tenancy.ledger import Ledger
from faasmoe.router.tenancy.registry import TenantRegistry

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str | None = None       # default: the store (or model) directory's name
    warm: bool = False
    settle_s: float = 1.0
    mqtt_url: str | None = None
    tenants_file: str | None = None     # None: open, loopback only, everyone is tenant "default"
    private_tenant: str | None = None   # serve this tenant only (private mode)
    usage_log: str | None = None        # JSON lines of finished requests and memory attributions
    usage_poll_s: float = 5.0           # how often the nodes' loaded memory is read and attributed
    tenants_poll_s: float = 1.0         # how often the tenants file is checked for changes
    cluster_dir: str | None = None      # with enroll_listen: serve node enrolment for this cluster too
    enroll_listen: str | None = None    # HOST:PORT of the enrolment endpoint
    dense_dtype: str = "float32"        # the router's dense part: float32 (exact) or bfloat16


class HttpFront:
    def __init__(self, options: ServeOptions, announce=print):
        self.options, self.announce = options, announce
        self.registry = TenantRegistry(options.tenants_file, options.private_tenant)
        if self.registry.open and not is_loopback(options.host):
            raise ConfigError(f"refusing to serve {options.host} without --tenants: anyone on the network could use "
                              "it; give --tenants FILE (faasmoe-router tenants add) or --host 127.0.0.1")
        if options.usage_log:
            try:
                with open(options.usage_log, "a"):
                    pass
            except OSError as exc:
                raise ConfigError(f"cannot write the usage log {options.usage_log} ({exc.strerror}): pick a "
                                  "writable --usage-log") from None
        self.ledger = Ledger(options.usage_log)
        self.accounting = Accounting(self.ledger, self.registry.weight)
        self.url: str | None = None
        self.stop_requested = False
        self._server: uvicorn.Server | None = None
        self._watcher: asyncio.Task | None = None

    def stop(self) -> None:
        self.stop_requested = True
        if self._server is not None:
            self._server.should_exit = True

    def start_tenants(self) -> None:
        """Reload the tenants on file changes and on SIGHUP (in the main thread)."""
        self._watcher = asyncio.ensure_future(self.registry.watch(self.options.tenants_poll_s))
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):   # not the main thread: no SIGHUP
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.registry.reload)

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        await asyncio.to_thread(self.ledger.flush)

    async def serve(self, app, name: str, ready: dict, what: str) -> None:
        """Run uvicorn until stopped; announce the ready line once it listens."""
        options = self.options
        self._server = server = uvicorn.Server(uvicorn.Config(
            app, host=options.host, port=options.port, log_level="warning", lifespan="off",
            timeout_graceful_shutdown=5))
        server.should_exit = self.stop_requested
        task = asyncio.create_task(server.serve())
        while not server.started:
            if task.done():
                with contextlib.suppress(SystemExit):
                    await task
                if self.stop_requested:
                    return
                raise ConfigError(f"the HTTP server did not start on {options.host}:{options.port} (the port is in "
                                  "use or the address is not local): pick another --port (0 = any free port) or --host")
            await asyncio.sleep(0.02)
        if self.stop_requested:
            server.should_exit = True
            await task
            return
        port = server.servers[0].sockets[0].getsockname()[1]
        host = options.host if ":" not in options.host else f"[{options.host}]"
        self.url = f"http://{host}:{port}"
        self.announce(ready_line(ROUTER_READY, {"url": self.url, "model": name, **ready}))
        self.announce(f"faasmoe-router serving {name} ({what}) at {self.url}/v1")
        if self.registry.open:
            self.announce("no --tenants file: open to every local client as tenant 'default', on loopback only")
        else:
            self.announce(f"tenants from {self.registry.path}: {len(self.registry.config.tenants)}"
                          + (f"; private router of tenant {options.private_tenant!r}" if options.private_tenant
                             else ""))
        await task
