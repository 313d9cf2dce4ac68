"""``faasmoe-router serve``: the whole router as one long-running process.

The control plane (node directory with health checks, placement controller) runs in its threads and keeps
the store placed while nodes come and go; the engine (the dense model, the mesh transport) runs on its own
loop in its own thread (:mod:`faasmoe.router.engine.core`), the HTTP API on another, so a long prefill delays
no health check and no admission. The server
prints one line ``FAASMOE_ROUTER_READY {"url": ..., "model": ...}`` once it listens (tests and scripts wait
for it), then serves until SIGINT or SIGTERM.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from faasmoe.proto.errors import StepFailed
from faasmoe.router.api.front import HttpFront, ServeOptions  # noqa: F401 - re-exported
from faasmoe.router.api.app import create_app
from faasmoe.router.api.openai import ApiContext
from faasmoe.router.control.controller import PlacementController
from faasmoe.router.control.directory import NodeDirectory
from faasmoe.router.control.session import RouterSession
from faasmoe.router.engine.core import EngineCore
from faasmoe.router.engine.engine import EngineConfig
from faasmoe.router.engine.serving import Serving, start_serving
from faasmoe.router.model.precision import dense_dtype
from faasmoe.router.observe.metrics import RouterMetrics
from faasmoe.router.tenancy.ledger import LedgerCollector
from faasmoe.router.tenancy.memory import MemoryPoller

log = logging.getLogger(__name__)


class _Readiness:
    def __init__(self, session: RouterSession):
        self.session = session
        self.serving: Serving | None = None

    def health(self) -> tuple[bool, str]:
        if self.serving is None:
            return False, "starting: loading the model"
        if not self.serving.engine.alive:
            return False, "the engine has stopped"
        if not self.session.placed_once.is_set():
            return False, "starting: placing the expert functions on the nodes"
        if not self.session.placement_holds():
            return False, "some functions have no live node (re-placing)"
        return True, "placement holds"

    def engine(self):
        if self.serving is None or not self.session.placed_once.is_set():
            raise StepFailed("the server is starting: the expert functions are not placed yet; retry shortly")
        return self.serving.engine


class RouterServer:
    """The serving router: ``await RouterServer(...).run()`` until :meth:`stop` (thread-safe) or a signal."""

    def __init__(self, session: RouterSession, directory: NodeDirectory, config: EngineConfig,
                 options: ServeOptions, announce=print):
        self.session, self.directory, self.config, self.options = session, directory, config, options
        self.front = HttpFront(options, announce)
        self.registry, self.ledger, self.accounting = self.front.registry, self.front.ledger, self.front.accounting
        self.readiness = _Readiness(session)
        self.controller: PlacementController | None = None

    @property
    def url(self) -> str | None:
        return self.front.url

    @property
    def serving(self) -> Serving | None:
        return self.readiness.serving

    def stop(self) -> None:
        self.front.stop()

    async def _start_enrolment(self):
        """(uvicorn server, task) of the enrolment endpoint when serving with a cluster, else None."""
        options = self.options
        if not options.cluster_dir or not options.enroll_listen:
            return None
        from faasmoe.router.control import enroll_server as es
        from faasmoe.router.control.cluster import Cluster
        cluster = Cluster(options.cluster_dir)
        host, port = cluster.listen_address(None if options.enroll_listen == "default" else options.enroll_listen)
        server = es.enroll_server(cluster, host, port)
        task, bound = await es.start(server)
        self.front.announce(f"node enrolment on https://{host}:{bound} (nodes dial {cluster.address})")
        return server, task

    async def run(self) -> None:
        options, session, readiness = self.options, self.session, self.readiness
        telemetry = None
        if options.mqtt_url:
            from faasmoe.router.observe.telemetry import TelemetryCollector
            telemetry = TelemetryCollector(options.mqtt_url).start()
        metrics = RouterMetrics(lambda: readiness.serving.mesh.stats if readiness.serving else None, telemetry,
                                engine=lambda: readiness.serving.engine if readiness.serving else None)
        metrics.registry.register(LedgerCollector(self.ledger))
        self.front.start_tenants()
        poller = MemoryPoller(session, session.router_id, self.accounting.take_rows, self.ledger.memory,
                              options.usage_poll_s)
        enrolment = await self._start_enrolment()
        self.directory.start()
        self.controller = PlacementController(session, self.directory, settle_s=options.settle_s)
        self.controller.start()
        core = EngineCore().start()
        try:
            serving = readiness.serving = await core.run(start_serving(session, self.config,
                                                                       dense_dtype(options.dense_dtype),
                                                                       accounting=self.accounting))
            serving.engine.tenant_of = self.registry.tenant
            metrics.watch(serving.mesh, serving.engine)
            poller.start()
            if options.warm:
                while not session.placed_once.is_set():        # a stop while waiting ends the wait
                    if self.front.stop_requested:
                        return
                    await asyncio.sleep(0.1)
                await asyncio.to_thread(session.warm)
            name = options.model_name or session.store.name
            api = ApiContext(readiness.engine, name, serving.tokenizer, int(time.time()), self.registry, self.ledger,
                             serving.precision)
            app = create_app(api, readiness.health, metrics.registry)
            await self.front.serve(app, name, {"router_id": session.router_id, "precision": serving.precision.label()},
                                   f"{len(session.manifest.functions)} {serving.precision.header()} expert "
                                   "functions on the mesh")
        finally:
            if enrolment is not None:
                enrolment[0].should_exit = True
                await enrolment[1]
            if poller._thread.is_alive():
                await asyncio.to_thread(poller.stop)
            await self.front.close()
            if readiness.serving is not None:
                await core.run(readiness.serving.close())
            core.stop()
            await asyncio.to_thread(self.controller.stop)
            try:
                released = await asyncio.to_thread(session.release)
                log.info("released %d function leases", released)
            except Exception:  # noqa: BLE001 - a stop must finish; the nodes keep what they could not hear
                log.exception("releasing the leases failed")
            self.directory.stop()
            if telemetry is not None:
                telemetry.stop()
            session.close()


class ServerThread:
    """A :class:`RouterServer` on its own thread and event loop, over static nodes (the demo, tests and
    benchmarks): ``with ServerThread(session, addresses) as server: server.url``."""

    def __init__(self, session: RouterSession, addresses, config: EngineConfig = EngineConfig(),
                 options: ServeOptions = ServeOptions(port=0), ready_timeout_s: float = 120.0):
        self.session = session
        self.server = RouterServer(session, NodeDirectory(static=list(addresses)), config, options,
                                   announce=lambda line: log.info("%s", line))
        self.ready_timeout_s = ready_timeout_s
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return self.server.url

    def _main(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self.server.run())
        except BaseException as exc:  # noqa: BLE001 - reported to the starting thread
            self._error = exc
        finally:
            self.loop.close()

    def call(self, coro, timeout_s: float = 60.0):
        """Run ``coro`` on the server's loop (e.g. to read engine state) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def __enter__(self) -> ServerThread:
        self._thread = threading.Thread(target=self._main, name="faasmoe-router-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.ready_timeout_s
        while self.server.url is None or not self.session.placed_once.is_set():
            if not self._thread.is_alive():
                raise self._error or RuntimeError("the router server stopped while starting")
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise TimeoutError(f"the router server was not ready within {self.ready_timeout_s} s")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.stop()
        if self._thread is not None:
            self._thread.join(30)
