"""Errors as OpenAI returns them: ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status
each error of the tree maps to (the one place where that mapping lives)."""

from __future__ import annotations

import math

from fastapi.responses import JSONResponse

from faasmoe.proto.errors import (BadRequest, FaasmoeError, Overloaded, RateLimited, StepFailed, Unauthorized,
                                  UnknownModel)


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def status_of(exc: BaseException) -> tuple[int, dict, dict[str, str]]:
    """(HTTP status, OpenAI error body, extra headers) for ``exc``."""
    if isinstance(exc, BadRequest):
        return 400, error_body(str(exc), "invalid_request_error", exc.param), {}
    if isinstance(exc, Unauthorized):
        return 401, error_body(str(exc), "invalid_request_error", None, "invalid_api_key"), {
            "WWW-Authenticate": "Bearer"}
    if isinstance(exc, RateLimited):
        retry_s = str(max(1, math.ceil(exc.retry_after_s)))
        return 429, error_body(str(exc), "rate_limit_exceeded", None, "rate_limit_exceeded"), {"Retry-After": retry_s}
    if isinstance(exc, UnknownModel):
        return 404, error_body(str(exc), "invalid_request_error", "model", "model_not_found"), {}
    if isinstance(exc, Overloaded):
        retry_s = str(max(1, math.ceil(exc.retry_after_s)))
        return 503, error_body(str(exc), "server_overloaded", None, "server_full"), {"Retry-After": retry_s}
    if isinstance(exc, StepFailed):
        return 503, error_body(str(exc), "service_unavailable", None, "mesh_step_failed"), {"Retry-After": "1"}
    if isinstance(exc, FaasmoeError):
        return 500, error_body(str(exc), "server_error"), {}
    return 500, error_body(f"internal error: {type(exc).__name__}", "server_error"), {}


def error_response(exc: BaseException) -> JSONResponse:
    status, body, headers = status_of(exc)
    return JSONResponse(body, status_code=status, headers=headers)


def validation_response(errors: list[dict]) -> JSONResponse:
    """A malformed body: 400 naming the first offending field."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request body"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not isinstance(p, int)]
    param = ".".join(loc) or None
    message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
    return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)
