"""``/v1/completions`` and ``/v1/chat/completions``: a request becomes one engine sequence; its events become
one JSON response or a stream of server-sent events ending in ``[DONE]``.

A client that goes away cancels its sequence: a stream's generator is cancelled by Starlette when the client
disconnects; a plain request races the generation against the connection's ``http.disconnect``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from faasmoe.proto.errors import BadRequest, UnknownModel
from faasmoe.router.api.chat import render_chat
from faasmoe.router.api.errors import error_response, status_of
from faasmoe.router.api.schemas import ChatCompletionRequest, CompletionRequest
from faasmoe.router.engine.engine import Engine
from faasmoe.router.engine.sampling import Choice, SamplingParams
from faasmoe.router.engine.sequence import FinishEvent, Request, TokenEvent
from faasmoe.router.model.precision import HEADER as PRECISION_HEADER
from faasmoe.router.model.precision import ServedPrecision
from faasmoe.router.tenancy.config import Tenant
from faasmoe.router.tenancy.registry import TenantRegistry

log = logging.getLogger(__name__)


@dataclass
class ApiContext:
    engine: Callable[[], Engine]      # the running engine (raises while the server is starting)
    model_name: str
    tokenizer: object
    created: int = 0
    registry: TenantRegistry = field(default_factory=lambda: TenantRegistry(None))
    ledger: object = None             # the usage ledger (GET /v1/usage)
    precision: ServedPrecision | None = None   # named in every response (body field and header)

    def precision_headers(self) -> dict[str, str]:
        return {PRECISION_HEADER: self.precision.header()} if self.precision else {}


def degraded_label(dropped: dict) -> dict:
    """How a degraded response says what it lost (opt-in ``--degraded``: such output is NOT exact)."""
    return {"exact": False, "dropped_expert_calls": sum(dropped.values()),
            "dropped_experts": [{"layer": layer, "expert": expert, "token_calls": n}
                                for (layer, expert), n in sorted(dropped.items())]}


def _usage(finish: FinishEvent) -> dict:
    return {"prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens,
            "total_tokens": finish.prompt_tokens + finish.completion_tokens}


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class _Call:
    """One API call: its sequence, how its pieces are rendered, and the response (plain or stream)."""

    def __init__(self, api: ApiContext, kind: str, engine_request: Request, include_usage: bool, logprobs: bool,
                 tenant: Tenant):
        self.api, self.kind, self.include_usage, self.logprobs = api, kind, include_usage, logprobs
        self.engine = api.engine()
        self.seq = self.engine.admit_and_submit(tenant, engine_request)
        self.id = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex
        self.created = int(time.time())

    def _token_text(self, token_id: int) -> str:
        if self.api.tokenizer is None:               # a store without a tokenizer: name the id
            return f"token_id:{token_id}"
        return self.api.tokenizer.decode([token_id])

    # -- rendering (completions and chat differ only here) -----------------------------------------------
    def _choice(self, text: str, events: list[TokenEvent], finish: str | None, delta: bool) -> dict:
        if self.kind == "text_completion":
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            if self.logprobs:
                choice["logprobs"] = {
                    "tokens": [self._token_text(e.token_id) for e in events],
                    "token_logprobs": [e.choice.logprob for e in events],
                    "top_logprobs": [{self._token_text(t): lp for t, lp in e.choice.top} for e in events],
                    "text_offset": [e.text_offset for e in events]}
            return choice
        message = {"role": "assistant", "content": text} if not delta else {"content": text}
        choice = {"index": 0, ("delta" if delta else "message"): message, "finish_reason": finish, "logprobs": None}
        if self.logprobs:
            choice["logprobs"] = {"content": [self._chat_logprob(e.token_id, e.choice) for e in events]}
        return choice

    def _chat_logprob(self, token_id: int, choice: Choice) -> dict:
        def entry(t, lp):
            s = self._token_text(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}
        return {**entry(token_id, choice.logprob), "top_logprobs": [entry(t, lp) for t, lp in choice.top]}

    def _envelope(self, choices: list[dict], usage: dict | None, chunk: bool) -> dict:
        obj = self.kind if not chunk else ("text_completion" if self.kind == "text_completion"
                                           else "chat.completion.chunk")
        body = {"id": self.id, "object": obj, "created": self.created, "model": self.api.model_name,
                "choices": choices, "usage": usage}
        if self.api.precision is not None:
            body["faasmoe_precision"] = self.api.precision.label()
        return body

    # -- responses -------------------------------------------------------------------------------------
    async def respond(self, http: HttpRequest) -> Response:
        generation = asyncio.ensure_future(self._collect())
        gone = asyncio.ensure_future(_disconnected(http))
        try:
            await asyncio.wait({generation, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not generation.done():                  # the client left: free its sequence at the next step
            self.engine.cancel(self.seq)
            generation.cancel()
            return Response(status_code=499)
        events, finish = generation.result()
        if finish.error is not None:
            return error_response(finish.error)
        text = "".join(e.text for e in events) + finish.text
        body = self._envelope([self._choice(text, events, finish.reason, False)], _usage(finish), False)
        if finish.dropped:
            body["faasmoe_degraded"] = degraded_label(finish.dropped)
        headers = self.api.precision_headers() | ({"x-faasmoe-degraded": "true"} if finish.dropped else {})
        return JSONResponse(body, headers=headers)

    async def _collect(self) -> tuple[list[TokenEvent], FinishEvent]:
        events = []
        async for event in self.engine.events(self.seq):
            if isinstance(event, FinishEvent):
                return events, event
            events.append(event)

    def stream(self) -> StreamingResponse:
        return StreamingResponse(self._chunks(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no",
                                          **self.api.precision_headers()})

    async def _chunks(self) -> AsyncIterator[str]:
        try:
            async for piece in self._pieces():
                yield piece
        except Exception as exc:  # noqa: BLE001 - the headers are sent: report in-band
            log.exception("stream %s failed", self.id)
            yield _sse(status_of(exc)[1])
            yield _sse("[DONE]")
        finally:
            self.engine.cancel(self.seq)         # however the stream ended, the sequence leaves the batch

    async def _pieces(self) -> AsyncIterator[str]:
        if self.kind == "chat.completion":
            first = self._envelope([{"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "finish_reason": None, "logprobs": None}], None, True)
            yield _sse(first if self.include_usage else _drop_usage(first))
        async for event in self.engine.events(self.seq):
            if isinstance(event, TokenEvent):
                if event.text or self.logprobs:
                    chunk = self._envelope([self._choice(event.text, [event], None, True)], None, True)
                    yield _sse(chunk if self.include_usage else _drop_usage(chunk))
                continue
            if event.error is not None:
                yield _sse(status_of(event.error)[1])
                yield _sse("[DONE]")
                return
            chunk = self._envelope([self._choice(event.text, [], event.reason, True)], None, True)
            if event.dropped:
                chunk["faasmoe_degraded"] = degraded_label(event.dropped)
            yield _sse(chunk if self.include_usage else _drop_usage(chunk))
            if self.include_usage:
                yield _sse(self._envelope([], _usage(event), True))
            yield _sse("[DONE]")


def _drop_usage(chunk: dict) -> dict:
    chunk.pop("usage", None)
    return chunk


async def _disconnected(http: HttpRequest) -> None:
    """Returns when the client disconnects (the body was read already, so only http.disconnect can come)."""
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


def _check_model(api: ApiContext, model: str) -> None:
    if model != api.model_name:
        raise UnknownModel(f"The model `{model}` does not exist; this server serves `{api.model_name}`")


def _check_text_features(api: ApiContext, body) -> None:
    if api.tokenizer is None and body.stop:
        raise BadRequest("this model has no tokenizer, so stop strings cannot be matched", "stop")


def _params(body, logprobs: int | None) -> SamplingParams:
    return SamplingParams(temperature=body.temperature, top_p=body.top_p, seed=body.seed, logprobs=logprobs)


async def completions(api: ApiContext, body: CompletionRequest, http: HttpRequest, tenant: Tenant) -> Response:
    _check_model(api, body.model)
    _check_text_features(api, body)
    if isinstance(body.prompt, str):
        if api.tokenizer is None:
            raise BadRequest("this model has no tokenizer: send the prompt as token ids", "prompt")
        prompt_ids = tuple(api.tokenizer(body.prompt)["input_ids"])
    else:
        prompt_ids = tuple(body.prompt)
    request = Request(prompt_ids, body.max_tokens, _params(body, body.logprobs), tuple(body.stop), tenant.name,
                      ignore_eos=body.ignore_eos)
    return await _respond(api, "text_completion", request, body, body.logprobs is not None, http, tenant)


async def chat_completions(api: ApiContext, body: ChatCompletionRequest, http: HttpRequest,
                           tenant: Tenant) -> Response:
    _check_model(api, body.model)
    if api.tokenizer is None:
        raise BadRequest("this model has no tokenizer, so it cannot chat: use /v1/completions with token ids",
                         "messages")
    prompt_ids = tuple(render_chat(api.tokenizer, [(m.role, m.text) for m in body.messages]))
    context = api.engine().runner.max_positions
    max_tokens = body.token_limit if body.token_limit is not None else context - len(prompt_ids)
    if max_tokens < 1:
        raise BadRequest(f"the messages take {len(prompt_ids)} tokens, the whole context of {context}", "messages")
    top = (body.top_logprobs or 0) if body.logprobs else None
    if body.token_limit is None:                     # "the rest of the context", within the tenant's limits
        for limit in (tenant.max_tokens_per_request, tenant.tokens_per_minute):
            if limit:
                max_tokens = max(1, min(max_tokens, limit - len(prompt_ids)))
    request = Request(prompt_ids, max_tokens, _params(body, top), tuple(body.stop), tenant.name,
                      ignore_eos=body.ignore_eos)
    return await _respond(api, "chat.completion", request, body, body.logprobs, http, tenant)


async def _respond(api: ApiContext, kind: str, request: Request, body, logprobs: bool,
                   http: HttpRequest, tenant: Tenant) -> Response:
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    call = _Call(api, kind, request, include_usage, logprobs, tenant)
    return call.stream() if body.stream else await call.respond(http)
