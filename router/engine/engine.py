"""The serving engine: continuous batching across every caller, on the engine's own asyncio loop.

A step is schedule → execute → update (the vLLM v1 split): :func:`~faasmoe.router.engine.scheduler.plan_step`
decides on plain data which sequences feed how many tokens; the runner runs one batched forward of the dense
part for all of them, with one frame per node and MoE layer for all their rows; then each sequence that
completed its step samples its next token, streams it and maybe finishes. Sequences join and leave at step
boundaries. A cancelled sequence (its client went away) leaves at the next boundary, its cache freed. A step
the mesh fails (after the mesh's own retries, within the step deadline) fails the requests in it, and only
them; their caches are rolled back and every other request goes on.

The engine's state is only touched on its loop. The API may run on another loop in another thread (the
server keeps the engine in a thread of its own, :mod:`faasmoe.router.engine.core`, so that no step ever
blocks HTTP): :meth:`Engine.admit`, :meth:`Engine.submit`, :meth:`Engine.cancel` and :meth:`Engine.events` may
be called from any loop and never wait for a step; a sequence's events are delivered to the loop that
submitted it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import torch

from faasmoe.proto.errors import FaasmoeError, Overloaded, StepFailed
from faasmoe.router.engine.admission import check_request, raise_for
from faasmoe.router.engine.sampling import sample
from faasmoe.router.engine.queues import BatchQueues
from faasmoe.router.engine.scheduler import Limits
from faasmoe.router.engine.sequence import FinishEvent, Request, Result, Sequence, TokenEvent
from faasmoe.router.model.runner import ModelRunner, SeqChunk
from faasmoe.router.tenancy.accounting import row_owners

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    limits: Limits = Limits()
    max_waiting: int = 256         # requests queued beyond the batch; more are refused (Overloaded)
    step_timeout_s: float = 30.0   # one step across the mesh, recovery included
    frame_timeout_s: float = 10.0  # one frame's reply; then another replica, or recovery
    degraded: bool = False         # opt-in: drop experts no replica answers (the response lists them)
    kv_cache_bytes: int = 4 << 30  # KV cache all running sequences may reserve together


@dataclass
class EngineStats:
    steps: int = 0
    decode_steps: int = 0          # steps that fed only decode tokens
    decode_step_rpcs: int = 0      # frames sent during those steps
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    failed_steps: int = 0
    step_s: float = 0.0


@dataclass
class _StepWork:
    """What the scheduler decided for one step, as the executor and the updater need it."""

    runs: list                                    # (sequence, tokens fed)
    chunks: list = field(default_factory=list)    # SeqChunk per run
    samplers: list = field(default_factory=list)  # sequences that sample a token after this step
    decode_only: bool = False
    row_owner: object = None                      # the run (index) of every packed row


class Engine:
    def __init__(self, runner: ModelRunner, tokenizer, *, mesh=None, config: EngineConfig = EngineConfig(),
                 eos_ids: frozenset[int] = frozenset(), accounting=None):
        self.runner, self.tokenizer, self.mesh, self.config = runner, tokenizer, mesh, config
        self.cache_tokens = max(1, config.kv_cache_bytes // runner.kv_bytes_per_token)
        self.limits = dataclasses.replace(config.limits, cache_tokens=self.cache_tokens,
                                          reserved_slots=config.limits.reserved_slots if accounting else 0)
        # one slot per batch place, each as long as a sequence may be (untouched pages cost nothing)
        self.kv = runner.new_kv_cache(self.limits.max_running, min(runner.max_positions, self.cache_tokens))
        self.eos_ids = eos_ids
        self.queues = BatchQueues(self.limits)
        self.stats = EngineStats()
        self.on_step: Callable[[float, int], None] | None = None     # (seconds, tokens): metrics hook
        self.accounting = accounting       # tenancy: fairness order, ledger (None: arrival order, no ledger)
        self.tenant_of: Callable[[str], object] = lambda name: None    # the tenants' limits (for refunds)
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._in_flight: dict[str, int] = {}         # per tenant: submitted and not finished (any thread reads)
        self._in_flight_lock = threading.Lock()
        self._step_no = 0
        self._in_step: list[Sequence] = []

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._run(), name="faasmoe-engine")

    def _on_engine_loop(self, callback, *args) -> None:
        """Run ``callback`` on the engine's loop: now when called there, else as soon as the loop is free."""
        if self._loop is None or _running_loop() is self._loop:
            callback(*args)
        else:
            self._loop.call_soon_threadsafe(callback, *args)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        for seq in self.queues.take_all():
            self._finish(seq, "error", StepFailed("the server is shutting down"))

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    # -- requests ----------------------------------------------------------------------------------------
    def check(self, request: Request) -> None:
        """Refuse what cannot be served (BadRequest names the field)."""
        check_request(request, self.runner.max_positions, self.runner.config.vocab_size, self.cache_tokens,
                      self.runner.kv_bytes_per_token, self.config.kv_cache_bytes)

    def admit(self, tenant, request: Request) -> None:
        """The tenant's limits, from any thread: BadRequest when the request can never pass them, RateLimited
        (with Retry-After) when not now. An admitted request that is then not submitted must be refunded."""
        if self.accounting is not None:
            raise_for(self.accounting.admit(tenant, self.in_flight(tenant.name),
                                            len(request.prompt_ids) + request.max_tokens,
                                            self.expected_wait_s(tenant.name)))

    def admit_and_submit(self, tenant, request: Request) -> Sequence:
        """:meth:`check`, :meth:`admit`, :meth:`submit`; what the limits took is given back if it is refused."""
        self.check(request)
        self.admit(tenant, request)
        try:
            return self._submit_checked(request)
        except Exception:
            if self.accounting is not None:
                self.accounting.refund(tenant, len(request.prompt_ids) + request.max_tokens)
            raise

    def submit(self, request: Request) -> Sequence:
        """Queue a request (from any thread; never waits for a step). Its events go to the caller's loop."""
        self.check(request)
        return self._submit_checked(request)

    def _submit_checked(self, request: Request) -> Sequence:
        if self._task is not None and self._task.done():
            raise StepFailed("the engine has stopped; restart the server")
        seq = Sequence(request, self.tokenizer, self.eos_ids)
        with self._in_flight_lock:                 # counted here: the engine's loop may not have seen the others yet
            running = len(self.running)
            waiting = sum(self._in_flight.values()) - running
            if waiting >= self.config.max_waiting:
                raise Overloaded(f"the server is full ({running} running, {waiting} waiting); retry shortly",
                                 retry_after_s=max(1.0, self._drain_estimate_s()))
            self._in_flight[request.tenant] = self._in_flight.get(request.tenant, 0) + 1
        self._on_engine_loop(self._enqueue, seq)
        return seq

    def _enqueue(self, seq: Sequence) -> None:
        if self.accounting is not None:
            self.accounting.arrived(seq.request.tenant, {s.request.tenant for s in self.waiting})
        if seq.cancelled or (self._task is not None and self._task.done()):
            self._finish(seq, "cancelled" if seq.cancelled else "error",
                         None if seq.cancelled else StepFailed("the engine has stopped; restart the server"))
            return
        self.queues.arrive(seq)
        self.stats.requests += 1
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def cancel(self, seq: Sequence) -> None:
        """The caller went away: the sequence leaves the batch at the next step boundary."""
        if not seq.finished:
            seq.cancelled = True
            self._on_engine_loop(self._wake.set)

    async def events(self, seq: Sequence) -> AsyncIterator[TokenEvent | FinishEvent]:
        """The sequence's events until it finishes; leaving early cancels it."""
        try:
            while True:
                event = await seq.events.get()
                yield event
                if isinstance(event, FinishEvent):
                    return
        finally:
            self.cancel(seq)

    async def generate(self, request: Request) -> Result:
        seq = self.submit(request)
        choices, text = [], []
        async for event in self.events(seq):
            if isinstance(event, TokenEvent):
                choices.append(event.choice)
                text.append(event.text)
            else:
                if event.error is not None:
                    raise event.error
                text.append(event.text)
                ttft = None if seq.first_token_s is None else seq.first_token_s - seq.arrival_s
                return Result("".join(text), list(seq.output_ids), event.reason, event.prompt_tokens, choices, ttft,
                              torch.stack(seq.logits) if seq.logits else None, event.dropped)

    def _drain_estimate_s(self) -> float:
        mean_step_s = self.stats.step_s / self.stats.steps if self.stats.steps else 0.05
        return mean_step_s * 16

    # -- the loop ------------------------------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            self._drop_cancelled()
            if not self.queues:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self.step()
            except Exception as exc:  # noqa: BLE001 - a bug outside the forward fails its step, not the engine
                log.exception("engine step %d failed", self._step_no)
                self.stats.failed_steps += 1
                self._fail(self._in_step, StepFailed(f"internal error in step: {type(exc).__name__}: {exc}"))
            await asyncio.sleep(0)          # let handlers and streams run between steps

    def _drop_cancelled(self) -> None:
        for seq in self.queues.take_cancelled():
            self._finish(seq, "cancelled")

    async def step(self) -> None:
        """One step: schedule (the plan is plain data; the queues and the KV manager apply it), execute (the forward on the mesh), update
        (sample, stream, finish)."""
        work = self._schedule()
        if work is None:
            return
        logits = await self._execute(work)
        if logits is not None:
            self._update(work, logits)

    def _schedule(self) -> _StepWork | None:
        self._in_step = []
        several = self.accounting is not None and len({s.request.tenant for s in self.waiting}) > 1
        plan = self.queues.plan(self.accounting.order if several else None, self._urgent())
        if not plan.runs:
            return None
        by_id = self.queues.admit(plan, self.kv.manager.allocate)     # joins: out of the queue, into a KV slot
        if self.accounting is not None and plan.admitted:
            self.accounting.admitted(by_id[i].request.tenant for i in plan.admitted)
        work = _StepWork([(by_id[i], n) for i, n in plan.runs])
        self._in_step = [seq for seq, _ in work.runs]
        for seq, n in work.runs:
            tokens, want = seq.feed(n)
            work.chunks.append(SeqChunk(seq.slot, tokens, want))
            if want:
                work.samplers.append(seq)
        work.decode_only = all(seq.prompt_left == 0 for seq, _ in work.runs)
        work.row_owner = row_owners([len(c.token_ids) for c in work.chunks])
        return work

    async def _execute(self, work: _StepWork) -> torch.Tensor | None:
        """The forward; on failure the step's requests fail (and only them) and None is returned."""
        rpcs_before = self.mesh.stats.rpcs if self.mesh is not None else 0
        self._step_no += 1
        ctx = None
        if self.mesh is not None:
            tenants = {seq.request.tenant for seq, _ in work.runs}
            ctx = self.mesh.context(f"step-{self._step_no}", next(iter(tenants)) if len(tenants) == 1 else "",
                                    self.config.step_timeout_s)
            if self.accounting is not None:
                ctx.on_reply = self.accounting.reply_hook([s.request.tenant for s in self._in_step],
                                                          [s.usage for s in self._in_step], work.row_owner)
        t0 = time.perf_counter()
        try:
            logits = await self.runner.forward(self.kv, work.chunks, ctx)
        except FaasmoeError as exc:
            self.stats.failed_steps += 1
            self._fail(self._in_step, StepFailed(f"the mesh failed this request's step: {exc}"))
            return None
        except Exception as exc:  # noqa: BLE001 - a bug fails the step's requests, never the engine
            log.exception("step %d failed", self._step_no)
            self.stats.failed_steps += 1
            self._fail(self._in_step, StepFailed(f"internal error in step: {type(exc).__name__}: {exc}"))
            return None
        if ctx is not None:
            for layer, expert, row in ctx.dropped:     # degraded mode: tell each request what it lost
                seq = self._in_step[work.row_owner[row]]
                seq.dropped[layer, expert] = seq.dropped.get((layer, expert), 0) + 1
        self._account(work.runs, work.decode_only, rpcs_before, time.perf_counter() - t0)
        return logits

    def _update(self, work: _StepWork, logits: torch.Tensor) -> None:
        if self.accounting is not None:
            self.accounting.charge([(seq, n, seq.prompt_left > 0) for seq, n in work.runs])
        for seq, n in work.runs:
            seq.advance(n)
        for seq, row in zip(work.samplers, logits):
            try:
                reason = seq.take(sample(row, seq.request.params, seq.generator), row)
            except Exception as exc:  # noqa: BLE001 - one request's sampling fails that request only
                log.exception("sampling failed for request %s", seq.request.request_id)
                self._fail([seq], StepFailed(f"sampling failed: {type(exc).__name__}: {exc}"))
                continue
            self.stats.completion_tokens += 1
            if reason is not None:
                self.queues.leave([seq])
                self._finish(seq, reason)

    def _account(self, runs, decode_only: bool, rpcs_before: int, elapsed_s: float) -> None:
        st = self.stats
        st.steps += 1
        st.step_s += elapsed_s
        st.prompt_tokens += sum(n for seq, n in runs if seq.prompt_left > 0)
        if decode_only:
            st.decode_steps += 1
            st.decode_step_rpcs += (self.mesh.stats.rpcs - rpcs_before) if self.mesh is not None else 0
        if self.on_step is not None:
            self.on_step(elapsed_s, sum(n for _, n in runs))

    def _finish(self, seq: Sequence, reason: str, error: FaasmoeError | None = None) -> None:
        if seq.finished:
            return
        seq.finish(reason, error)
        with self._in_flight_lock:
            self._in_flight[seq.request.tenant] -= 1
        if seq.slot is not None:
            self.kv.free(seq.slot)
            seq.slot = None
        if self.accounting is not None:
            try:
                self.accounting.finished(seq, reason, self.tenant_of(seq.request.tenant))
            except Exception:  # noqa: BLE001 - accounting never takes a request or the engine down
                log.exception("accounting of request %s failed", seq.request.request_id)

    def _urgent(self) -> set[int]:
        """The first waiting request of each tenant that has nothing running while others run: it should not
        wait behind them (one per tenant: once it runs, the tenant's others wait their turn as usual)."""
        if self.accounting is None or not self.running:
            return set()
        running = {s.request.tenant for s in self.running}
        first: dict[str, int] = {}
        for s in self.waiting:
            if s.request.tenant not in running:
                first.setdefault(s.request.tenant, s.id)
        return set(first.values())

    @property
    def waiting(self) -> list[Sequence]:
        return self.queues.waiting

    @property
    def running(self) -> list[Sequence]:
        return self.queues.running

    def in_flight(self, tenant: str) -> int:
        """``tenant``'s requests submitted and not finished (from any thread)."""
        with self._in_flight_lock:
            return self._in_flight.get(tenant, 0)

    def expected_wait_s(self, tenant: str) -> float:
        """A guess at when one of ``tenant``'s requests ends: the fewest tokens it has left × the mean step."""
        left = [s.request.max_tokens - len(s.output_ids) for s in list(self.running) if s.request.tenant == tenant]
        mean_step_s = self.stats.step_s / self.stats.steps if self.stats.steps else 0.05
        return (min(left) if left else 16) * mean_step_s

    def _fail(self, seqs: list[Sequence], error: FaasmoeError) -> None:
        log.warning("step %d: %d requests failed: %s", self._step_no, len(seqs), error)
        self.queues.leave(seqs)
        for seq in seqs:
            self._finish(seq, "error", error)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
