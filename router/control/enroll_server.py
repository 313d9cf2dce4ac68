"""The enrolment endpoint (HTTPS with the router's certificate): nodes fetch the CA (to check it against the
hash pinned in their join token), then present the token with a certificate request; later they renew.

    GET  /v1/cluster/ca        the CA certificate (PEM)
    POST /v1/cluster/enroll    {"token_id", "secret", "node_id", "csr"} -> {"cert", "ca", "renew_secret"}
    POST /v1/cluster/renew     {"node_id", "renew_secret", "csr"}      -> {"cert", "renew_secret"}

A wrong or expired token is 401; a malformed body is 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import uvicorn
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field

from faasmoe.proto.errors import ConfigError, Unauthorized
from faasmoe.router.control.cluster import Cluster


class EnrollBody(BaseModel):
    token_id: str = Field(max_length=64)
    secret: str = Field(max_length=256)
    node_id: str = Field(min_length=1, max_length=128)
    csr: str = Field(max_length=16384)


class RenewBody(BaseModel):
    node_id: str = Field(min_length=1, max_length=128)
    renew_secret: str = Field(max_length=256)
    csr: str = Field(max_length=16384)


def enroll_app(cluster: Cluster) -> FastAPI:
    app = FastAPI(title="faasmoe enrolment", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(Unauthorized)
    async def _denied(request, exc):
        return JSONResponse({"error": str(exc)}, status_code=401)

    @app.exception_handler(ConfigError)
    async def _bad(request, exc):
        return JSONResponse({"error": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc):
        return JSONResponse({"error": "malformed request"}, status_code=400)

    # plain ``def`` handlers: FastAPI runs them in its thread pool, so file locks, key loading and signing never
    # block the event loop that (under ``serve``) also runs the serving engine
    @app.get("/v1/cluster/ca")
    def ca():
        return PlainTextResponse((cluster.dir / "ca.crt").read_text())

    @app.post("/v1/cluster/enroll")
    def enroll(body: EnrollBody):
        cert, renew = cluster.enroll(body.token_id, body.secret, body.node_id, body.csr.encode())
        return {"cert": cert.decode(), "ca": (cluster.dir / "ca.crt").read_text(), "renew_secret": renew}

    @app.post("/v1/cluster/renew")
    def renew(body: RenewBody):
        cert, secret = cluster.renew(body.node_id, body.renew_secret, body.csr.encode())
        return {"cert": cert.decode(), "renew_secret": secret}

    return app


def enroll_server(cluster: Cluster, host: str, port: int) -> uvicorn.Server:
    """uvicorn over HTTPS with the router's certificate (nodes verify it against the pinned CA)."""
    return uvicorn.Server(uvicorn.Config(
        enroll_app(cluster), host=host, port=port, log_level="warning", lifespan="off",
        ssl_keyfile=str(cluster.dir / "router.key"), ssl_certfile=str(cluster.dir / "router.crt"),
        limit_concurrency=64, timeout_keep_alive=5))


async def start(server: uvicorn.Server) -> tuple[asyncio.Task, int]:
    """Start ``server`` on the running loop; (its task, the port it listens on), ConfigError if it cannot."""
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            with contextlib.suppress(SystemExit, Exception):
                await task
            cfg = server.config
            raise ConfigError(f"the enrolment endpoint did not start on {cfg.host}:{cfg.port} (the port is in use "
                              "or the address is not local)")
        await asyncio.sleep(0.02)
    return task, server.servers[0].sockets[0].getsockname()[1]


class EnrollThread:
    """The enrolment endpoint on a thread of its own (tests, and routers that are not serving)."""

    def __init__(self, cluster: Cluster, host: str = "127.0.0.1", port: int = 0):
        self.server = enroll_server(cluster, host, port)
        self.port = 0
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="faasmoe-enroll", daemon=True)

    def _run(self) -> None:
        async def main():
            task, self.port = await start(self.server)
            self._ready.set()
            await task
        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - handed to the starting thread
            self._error = exc
            self._ready.set()

    def __enter__(self) -> EnrollThread:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None or not self.port:
            raise self._error or ConfigError("the enrolment endpoint did not start within 30 s")
        return self

    def __exit__(self, *exc_info) -> None:
        self.server.should_exit = True
        self._thread.join(10)
