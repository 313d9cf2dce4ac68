"""A request as the engine sees it, and the events it streams back to its caller."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from dataclasses import dataclass, field

import torch

from faasmoe.proto.errors import FaasmoeError
from faasmoe.router.engine.sampling import Choice, SamplingParams
from faasmoe.router.engine.text import TextStream
from faasmoe.router.tenancy.usage import Usage

_ids = itertools.count(1)


@dataclass(frozen=True)
class Request:
    prompt_ids: tuple[int, ...]
    max_tokens: int
    params: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()                 # stop strings: the text ends right before the first one
    tenant: str = "default"
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    keep_logits: bool = False                   # diagnostics: return every sampled step's logits
    ignore_eos: bool = False                    # run to max_tokens even past end-of-sequence (benchmarks)


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    text: str                  # new text released with this token ('' while held back or mid-character)
    choice: Choice
    text_offset: int           # where ``text`` starts in the completion


@dataclass(frozen=True)
class FinishEvent:
    reason: str                # stop | length | error | cancelled
    prompt_tokens: int
    completion_tokens: int
    text: str = ""             # text released at the end (held back until then)
    error: FaasmoeError | None = None
    dropped: dict = field(default_factory=dict)   # degraded mode: (layer, expert) -> token calls dropped


@dataclass
class Result:
    """A finished request, collected (:meth:`Engine.generate`)."""

    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    choices: list[Choice]
    ttft_s: float | None
    logits: torch.Tensor | None = None
    dropped: dict = field(default_factory=dict)     # degraded mode: (layer, expert) -> token calls dropped


class Sequence:
    def __init__(self, request: Request, tokenizer, eos_ids: frozenset[int]):
        self.id = next(_ids)
        self.request = request
        self.eos_ids = eos_ids
        self.generator = request.params.generator()
        self.text = TextStream(tokenizer, request.stop)
        self.slot: int | None = None               # its KV cache slot while it runs (the engine frees it)
        self.fed = 0                                # prompt tokens in the cache (or sent this step)
        self.output_ids: list[int] = []
        self.logits: list[torch.Tensor] = []
        self.events: asyncio.Queue = asyncio.Queue()      # read on the loop that created the sequence
        try:
            self._caller_loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._caller_loop = None
        self.cancelled = False
        self.finished = False
        self.arrival_s = time.perf_counter()
        self.first_token_s: float | None = None
        self.usage = Usage()                        # what it cost on the nodes (attributed from replies)
        self.dropped: dict[tuple[int, int], int] = {}   # degraded mode: expert calls of this request dropped

    @property
    def reserve(self) -> int:
        """KV cache tokens this sequence may hold: its whole length."""
        return len(self.request.prompt_ids) + self.request.max_tokens

    @property
    def prompt_left(self) -> int:
        return len(self.request.prompt_ids) - self.fed

    def feed(self, n: int) -> tuple[list[int], bool]:
        """The tokens this sequence feeds in a step of ``n`` and whether that step samples its next token."""
        if self.prompt_left > 0:
            tokens = list(self.request.prompt_ids[self.fed:self.fed + n])
            return tokens, self.fed + n == len(self.request.prompt_ids)
        return [self.output_ids[-1]], True

    def advance(self, n: int) -> None:
        if self.prompt_left > 0:
            self.fed += n

    def take(self, choice: Choice, logits: torch.Tensor | None) -> str | None:
        """Add a sampled token and stream it; returns the finish reason when this token ends the sequence."""
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter()
        self.output_ids.append(choice.token_id)
        if logits is not None and self.request.keep_logits:
            self.logits.append(logits.clone())
        delta = self.text.push(choice.token_id)
        self._emit(TokenEvent(choice.token_id, delta, choice, self.text.offsets[-1]))
        if (choice.token_id in self.eos_ids and not self.request.ignore_eos) or self.text.stopped:
            return "stop"
        if len(self.output_ids) >= self.request.max_tokens:
            return "length"
        return None

    def finish(self, reason: str, error: FaasmoeError | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        tail = self.text.finish() if reason in ("stop", "length") else ""
        self._emit(FinishEvent(reason, len(self.request.prompt_ids), len(self.output_ids), tail, error,
                               dict(self.dropped)))

    def _emit(self, event) -> None:
        """Deliver ``event`` on the caller's loop (the engine may run on another loop, in another thread)."""
        loop = self._caller_loop
        try:
            same = loop is None or asyncio.get_running_loop() is loop
        except RuntimeError:
            same = False
        if same:
            self.events.put_nowait(event)
            return
        try:
            loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:          # the caller's loop is closed: nobody is listening any more
            pass
