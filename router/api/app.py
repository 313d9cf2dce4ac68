"""The OpenAI-compatible HTTP API (FastAPI on uvicorn).

    GET  /v1/models             the model this server serves
    POST /v1/completions        text completion, plain or streamed (server-sent events ending in [DONE])
    POST /v1/chat/completions   chat completion, plain or streamed
    GET  /health                200 once the functions are placed and routed, else 503 with the reason
    GET  /metrics               Prometheus (prometheus_client's ASGI app on the router's registry)

Errors come in OpenAI's JSON shape (:mod:`faasmoe.router.api.errors`).
"""

from __future__ import annotations

import logging
from typing import Callable

from fastapi import FastAPI, Header, Query
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, make_asgi_app
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from faasmoe.proto.errors import FaasmoeError, StepFailed, Unauthorized
from faasmoe.router.api import openai
from faasmoe.router.api.errors import error_body, error_response, validation_response
from faasmoe.router.api.schemas import ChatCompletionRequest, CompletionRequest
from faasmoe.router.tenancy.ledger import RETAIN_S
from faasmoe.router.tenancy.registry import TenantRegistry


log = logging.getLogger(__name__)


class _AsgiEndpoint:
    """Starlette treats a non-function endpoint as a plain ASGI app (so /metrics is served at /metrics
    exactly, not redirected to /metrics/ as a mount would be). With tenants it needs the admin key: the
    metrics name every tenant and what it used."""

    def __init__(self, app, registry: TenantRegistry):
        self.app, self.registry = app, registry

    async def __call__(self, scope, receive, send):
        try:
            self.registry.authenticate_admin(_authorization(scope))
        except Unauthorized as exc:
            await error_response(exc)(scope, receive, send)
            return
        await self.app(scope, receive, send)


class _Authenticate:
    """Who is calling, decided from the headers before the body is read (a stranger's malformed body is a
    401, not a 400). The tenant goes to ``scope["state"]["tenant"]``."""

    PATHS = ("/v1/completions", "/v1/chat/completions")

    def __init__(self, app, registry: TenantRegistry):
        self.app, self.registry = app, registry

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] in self.PATHS:
            try:
                scope.setdefault("state", {})["tenant"] = self.registry.authenticate(_authorization(scope))
            except Unauthorized as exc:
                await error_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _authorization(scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            return value.decode("latin-1")
    return None


def create_app(api: openai.ApiContext, health: Callable[[], tuple[bool, str]],
               registry: CollectorRegistry) -> FastAPI:
    app = FastAPI(title="faasmoe", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: HttpRequest, exc: RequestValidationError):
        return validation_response(exc.errors())

    @app.exception_handler(FaasmoeError)
    async def _refused(request: HttpRequest, exc: FaasmoeError):
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: HttpRequest, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}", kind),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _bug(request: HttpRequest, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(exc)

    @app.get("/v1/models")
    async def models():
        model = {"id": api.model_name, "object": "model", "created": api.created, "owned_by": "faasmoe"}
        if api.precision is not None:
            model["faasmoe_precision"] = api.precision.label()
        return {"object": "list", "data": [model]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HttpRequest):
        return await openai.completions(api, body, request, request.state.tenant)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: HttpRequest):
        return await openai.chat_completions(api, body, request, request.state.tenant)

    @app.get("/v1/usage")
    async def usage(window_s: float | None = Query(None, gt=0, le=RETAIN_S),
                    tenant_name: str | None = Query(None, alias="tenant"),
                    authorization: str | None = Header(None)):
        api.registry.authenticate_admin(authorization)
        ledger = api.ledger
        if ledger is None:
            raise StepFailed("the server keeps no ledger")
        return {"object": "usage", "window_s": window_s, "tenants": ledger.window(window_s, tenant_name),
                "unattributed_memory_gb_s": round(ledger.unattributed_memory_byte_s / 1e9, 6)}

    @app.get("/health")
    async def healthz():
        ok, reason = health()
        return JSONResponse({"status": "ok" if ok else "unavailable", "reason": reason},
                            status_code=200 if ok else 503)

    app.router.routes.append(Route("/metrics", endpoint=_AsgiEndpoint(make_asgi_app(registry), api.registry)))
    app.add_middleware(_Authenticate, registry=api.registry)
    return app
