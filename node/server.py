"""The node's gRPC server (grpc.aio): thin handlers that decode, call the runtime, encode.

``faasmoe.v1.ExpertNode``: Deploy, Undeploy, Load and Status carry protobuf; Invoke carries raw frames
(:mod:`faasmoe.proto.frames`) with no (de)serializer, so tensors are never copied into protobuf fields.
Errors of :mod:`faasmoe.proto.errors` become gRPC statuses in :func:`_rpc` and nowhere else. The standard
gRPC health service reports SERVING for "" and for the ExpertNode service while the node runs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from concurrent.futures import Executor
from typing import Callable

import grpc
import psutil
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from faasmoe.node.config import NodeConfig
from faasmoe.node.metrics import HEAT_WINDOW_S
from faasmoe.node.tls import NodeTls, require_role
from faasmoe.node.runtime import Runtime
from faasmoe.node.store import ContentStore
from faasmoe.proto import __version__, frames
from faasmoe.proto import methods
from faasmoe.proto import faasmoe_pb2 as pb
from faasmoe.proto.errors import (Backpressure, DeadlineExceeded, FaasmoeError, InvalidRequest, NodeInternalError,
                                  code_number, grpc_details)

log = logging.getLogger(__name__)
SHUTDOWN_GRACE_S = 10.0


def _error_of(exc: Exception, node_id: str, what: str) -> FaasmoeError:
    """What a failed request reports: our own errors as they are, anything else as an internal error."""
    if isinstance(exc, FaasmoeError):
        log.debug("%s failed: %s", what, exc)
        return exc
    log.error("%s failed unexpectedly", what, exc_info=exc)
    return NodeInternalError(f"node {node_id}: unexpected {type(exc).__name__}: {exc}")


def _rpc(handler):
    """The one place where errors become gRPC statuses (InvokeStream sends the same errors in-band)."""
    @functools.wraps(handler)
    async def wrapper(self: NodeServer, request, context: grpc.aio.ServicerContext):
        try:
            return await handler(self, request, context)
        except Exception as exc:  # noqa: BLE001 - report, never crash the server
            error = _error_of(exc, self.node_id, handler.__name__)
        await context.abort(error.grpc_code, grpc_details(error))
    return wrapper


def _request_id_of(frame: bytes) -> str:
    """The request id of a frame that failed, when its header can be read at all."""
    try:
        return frames.decode_header(frame, pb.InvokeRequest).request_id
    except FaasmoeError:
        return ""


def format_address(host: str, port: int) -> str:
    """``HOST:PORT`` to dial; a wildcard host is reported as loopback, IPv6 hosts get brackets."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class NodeServer:
    """A running node: store + runtime + gRPC server. ``async with NodeServer(cfg) as node: node.address``."""

    def __init__(self, config: NodeConfig, run_executor: Executor | None = None):
        self.config, self.node_id = config, config.node_id
        self._run_executor = run_executor
        self.store: ContentStore | None = None
        self.runtime: Runtime | None = None
        self.port = 0
        self.metrics_port: int | None = None     # set while the Prometheus endpoint runs (faasmoe.node.metrics)
        # called after each successful Invoke with (layer, results, handler seconds); keep them cheap
        self.invoke_listeners: list[Callable[[int, list, float], None]] = []
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._proc = psutil.Process()
        self._closing = asyncio.Event()          # set on stop: InvokeStream handlers end their streams
        self._inflight_bytes = 0                  # request frames held (received, not yet answered)
        self.tls: NodeTls | None = None           # None: plaintext (loopback development, or --insecure)
        self._renewal: asyncio.Task | None = None

    @property
    def address(self) -> str:
        return format_address(self.config.host, self.port)

    async def start(self) -> None:
        cfg = self.config
        self.store = ContentStore(cfg.store_dir, cfg.disk_budget_bytes, node=cfg.node_id)
        try:
            self.runtime = Runtime(cfg, self.store, self._run_executor)
            self._server = grpc.aio.server(maximum_concurrent_rpcs=cfg.max_concurrent_rpcs, options=[
                ("grpc.max_concurrent_streams", cfg.max_concurrent_rpcs),
                ("grpc.keepalive_time_ms", methods.NODE_PING_MS),    # keepalive: see faasmoe.proto.methods
                ("grpc.keepalive_timeout_ms", methods.NODE_PING_TIMEOUT_MS),
                ("grpc.http2.min_ping_interval_without_data_ms", methods.NODE_MIN_PING_INTERVAL_MS),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                ("grpc.so_reuseport", 0),          # a port in use is an error, not a shared port
            ])
            self._server.add_generic_rpc_handlers((self._handlers(),))
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
            bind = f"[{cfg.host}]:{cfg.port}" if ":" in cfg.host else f"{cfg.host}:{cfg.port}"
            self.tls = tls = NodeTls.start(cfg)
            try:
                self.port = (self._server.add_secure_port(bind, tls.credentials()) if tls is not None
                             else self._server.add_insecure_port(bind))
            except RuntimeError as err:
                raise FaasmoeError(f"cannot listen on {bind} ({err}); the port is in use or the address is not "
                                   "local: pick another --port (0 = any free port) or --host") from None
            if not self.port:
                raise FaasmoeError(f"cannot listen on {bind}: pick another --port (0 = any free port) or --host")
            await self.runtime.start()
            await self._server.start()
            if tls is not None:
                self._renewal = asyncio.ensure_future(tls.renew_loop())
        except BaseException:
            await self._cleanup()
            raise
        for name in ("", methods.SERVICE):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("node %s serving on %s (memory budget %.0f MiB, capacity %.0f MiB, %d threads, store %s)",
                 self.node_id, self.address, cfg.memory_budget_bytes / 2**20, cfg.capacity_bytes / 2**20,
                 cfg.threads, cfg.store_dir)

    async def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Stop accepting calls, let in-flight ones finish within ``grace_s``, release every session."""
        if self._renewal is not None:
            self._renewal.cancel()
        await self._health.enter_graceful_shutdown()
        self._closing.set()
        if self._server is not None:
            await self._server.stop(grace_s)
        await self._cleanup()
        log.info("node %s stopped", self.node_id)

    def advert(self) -> dict[str, str]:
        """What discovery announces (mDNS TXT, MQTT): ``free_bytes`` = capacity not deployed yet; ``cert`` = the
        fingerprint of the certificate the node presents (routers connect only when it matches)."""
        cfg, deployed = self.config, self.runtime.deployed_bytes if self.runtime else 0
        advert = {"memory_budget_bytes": str(cfg.memory_budget_bytes), "threads": str(cfg.threads),
                  "free_bytes": str(max(0, cfg.capacity_bytes - deployed)), "profile": cfg.profile,
                  "version": __version__, "max_message_bytes": str(cfg.max_message_bytes)}
        if self.tls is not None:
            advert["cert"] = self.tls.identity.fingerprint
        return advert

    async def _cleanup(self) -> None:
        if self.runtime is not None:
            await self.runtime.close()
            self.runtime = None
        if self.store is not None:
            self.store.close()
            self.store = None

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()

    async def __aenter__(self) -> NodeServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop(grace_s=1.0)

    def _handlers(self) -> grpc.GenericRpcHandler:
        return methods.handlers({"Deploy": self._deploy, "Undeploy": self._undeploy, "Invoke": self._invoke,
                                 "InvokeStream": self._invoke_stream, "Load": self._load, "Status": self._status})

    @_rpc
    async def _invoke(self, frame: bytes, context) -> bytes:
        self._require_router(context)
        return await self._run_frame(frame)

    def _require_router(self, context) -> None:
        """With cluster identities, only a router may deploy, undeploy, load or invoke."""
        if self.tls is not None:
            require_role(context, "router")

    async def _invoke_stream(self, frames_in, context):
        """One reply per request frame, in order; a failed request gets an error reply, the stream lives
        on. Ends (OK) when the node shuts down, so a graceful stop never waits on an idle stream."""
        if self.tls is not None:
            try:
                require_role(context, "router")
            except FaasmoeError as err:
                await context.abort(err.grpc_code, str(err))
        closing = asyncio.ensure_future(self._closing.wait())
        try:
            while True:
                read = asyncio.ensure_future(context.read())
                await asyncio.wait((read, closing), return_when=asyncio.FIRST_COMPLETED)
                if not read.done():
                    read.cancel()
                    return
                frame = read.result()
                if frame is grpc.aio.EOF:
                    return
                t0 = time.perf_counter()
                try:
                    reply = await self._run_frame(frame)
                except Exception as exc:  # noqa: BLE001 - answered in-band, the stream lives on
                    err = _error_of(exc, self.node_id, "InvokeStream request")
                    reply = frames.encode_error_reply(_request_id_of(frame), self.node_id, code_number(err),
                                                      grpc_details(err), time.perf_counter() - t0,
                                                      getattr(err, "missing", ()))
                await context.write(reply)
        finally:
            closing.cancel()

    async def _run_frame(self, frame: bytes) -> bytes:
        t0 = time.perf_counter()
        limit = self.config.inflight_limit_bytes
        if self._inflight_bytes + len(frame) > limit:
            self.runtime.counters.backpressure += 1
            raise Backpressure(f"node {self.node_id} holds {self._inflight_bytes} bytes of frames, its limit is {limit}: "
                               "retry after a short backoff", node=self.node_id)
        self._inflight_bytes += len(frame)
        try:
            header, hidden, calls = frames.decode_request(frame)
            results = await self.runtime.invoke(calls, hidden, header.caller, header.layer)
        finally:
            self._inflight_bytes -= len(frame)
        reply = frames.encode_reply(header.request_id, self.node_id, results, time.perf_counter() - t0)
        if self.invoke_listeners:
            elapsed_s = time.perf_counter() - t0
            for listener in self.invoke_listeners:
                try:
                    listener(header.layer, results, elapsed_s)
                except Exception:  # noqa: BLE001 - telemetry never fails a call
                    log.exception("invoke listener %r failed", listener)
        return reply

    @_rpc
    async def _deploy(self, chunks, context) -> pb.DeployReply:
        self._require_router(context)
        it = chunks.__aiter__()
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            first = None
        if first is None or not first.HasField("header"):
            raise InvalidRequest("the first Deploy chunk must carry the function header")

        async def data():
            yield first.data
            async for chunk in it:
                yield chunk.data

        try:
            async with asyncio.timeout(self.config.deploy_timeout_s):
                present = await self.runtime.deploy(first.header, data())
        except TimeoutError:
            raise DeadlineExceeded(f"the deployment of {first.header.function_id[:12]} did not arrive within "
                                   f"{self.config.deploy_timeout_s:g} s (--deploy-timeout-s)", node=self.node_id) from None
        return pb.DeployReply(function_id=first.header.function_id, already_present=present,
                              deployed_bytes=self.runtime.deployed_bytes)

    @_rpc
    async def _undeploy(self, request: pb.UndeployRequest, context) -> pb.UndeployReply:
        self._require_router(context)
        was, released = self.runtime.undeploy(request.function_id, request.owner)
        return pb.UndeployReply(was_deployed=was, released=released, deployed_bytes=self.runtime.deployed_bytes)

    @_rpc
    async def _load(self, request: pb.LoadRequest, context) -> pb.LoadReply:
        self._require_router(context)
        loaded, missing = await self.runtime.load(list(request.function_ids), request.wait)
        return pb.LoadReply(loaded=loaded, missing=missing)

    @_rpc
    async def _status(self, request: pb.StatusRequest, context) -> pb.StatusReply:
        return self.status()

    def status(self) -> pb.StatusReply:
        cfg, rt, now = self.config, self.runtime, time.monotonic()
        reply = pb.StatusReply(
            node_id=self.node_id, version=__version__, profile=cfg.profile,
            memory_budget_bytes=cfg.memory_budget_bytes, deployed_bytes=rt.deployed_bytes,
            loaded_bytes=rt.loaded_bytes, disk_budget_bytes=cfg.disk_budget_bytes,
            disk_used_bytes=self.store.used_bytes, threads=cfg.threads, rss_bytes=self._proc.memory_info().rss,
            keep_alive_s=cfg.keep_alive_s if math.isfinite(cfg.keep_alive_s) else -1.0,
            queue_depth=rt.queue_depth, capacity_bytes=cfg.capacity_bytes, heat_window_s=HEAT_WINDOW_S,
            max_message_bytes=cfg.max_message_bytes, max_concurrent_rpcs=cfg.max_concurrent_rpcs,
            max_inflight_bytes=cfg.inflight_limit_bytes)
        for fn in rt.deployed.values():
            info, st = fn.info, fn.stats
            reply.functions.add(
                function_id=info.function_id, layer=info.layer, expert_ids=info.expert_ids,
                size_bytes=info.size_bytes, loaded=fn.session is not None, idle_s=max(0.0, now - st.last_used_s),
                invocations=st.invocations, in_flight=st.in_flight, resident_bytes=fn.resident_bytes,
                model_id=info.model_id, expert_calls_window=st.heat.totals(len(info.expert_ids), now),
                owners=sorted(fn.owners), rows=st.rows, compute_s=st.compute_s, rows_by_caller=st.rows_by_caller,
                precision=info.precision.name, block_size=info.precision.block_size,
                footprint_bytes=info.footprint_bytes, rss_delta_bytes=st.rss_delta_bytes,
                wait_s=st.wait_s_now(time.perf_counter()), waits=st.waits)
        return reply
