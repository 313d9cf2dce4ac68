"""The engine's tenant bookkeeping: limits at admission, the fairness counters that order joins, and the
ledger fed from every node reply (rows, compute seconds, cold starts) and every finished request (tokens).
The fairness counters live on the engine's loop. The token buckets are taken by the API's thread and given
back by the engine's, under a lock; the memory poller's thread reads the rows per function through
:meth:`take_rows`, under another."""

from __future__ import annotations

import threading
import time
from typing import Callable

import numpy as np

from faasmoe.router.tenancy import fair
from faasmoe.router.tenancy.attribution import attribute
from faasmoe.router.tenancy.config import Tenant
from faasmoe.router.tenancy.ledger import Ledger
from faasmoe.router.tenancy.limits import Bucket, Decision, admit, refund
from faasmoe.router.tenancy.usage import Usage


class Accounting:
    def __init__(self, ledger: Ledger, weight_of: Callable[[str], float] = lambda tenant: 1.0):
        self.ledger = ledger
        self.weight_of = weight_of
        self.counters: dict[str, float] = {}          # weighted service received (fairness)
        self.last_admitted: str | None = None
        self.buckets: dict[str, Bucket | None] = {}    # tokens-per-minute state
        self._rows: dict[tuple[str, str], int] = {}    # (function, tenant) -> rows since the last memory poll
        self._rows_lock = threading.Lock()
        self._buckets_lock = threading.Lock()

    # -- admission -------------------------------------------------------------------------------------
    def admit(self, tenant: Tenant, in_flight: int, cost_tokens: int, retry_s: float) -> Decision:
        with self._buckets_lock:
            decision, bucket = admit(tenant, self.buckets.get(tenant.name), in_flight, cost_tokens, time.monotonic(),
                                     retry_s)
            self.buckets[tenant.name] = bucket
        return decision

    def refund(self, tenant: Tenant, tokens: int) -> None:
        """A request the limits admitted did not start after all."""
        with self._buckets_lock:
            self.buckets[tenant.name] = refund(self.buckets.get(tenant.name), tenant, tokens, time.monotonic())

    def arrived(self, tenant: str, waiting: set[str]) -> None:
        self.counters = fair.on_arrival(self.counters, tenant, waiting, self.last_admitted)
        self.ledger.request_started(tenant)

    def admitted(self, tenants) -> None:
        """Sequences of these tenants joined the batch (in this order)."""
        for tenant in tenants:
            self.last_admitted = tenant

    def finished(self, seq, reason: str, tenant: Tenant | None) -> None:
        req = seq.request
        prompt_fed = seq.fed if reason in ("error", "cancelled") else len(req.prompt_ids)
        self.ledger.tokens(req.tenant, prompt_fed, len(seq.output_ids))
        if tenant is not None:                       # what it reserved and did not use: unfed prompt, ungenerated tokens
            unused = len(req.prompt_ids) - prompt_fed + req.max_tokens - len(seq.output_ids)
            with self._buckets_lock:
                self.buckets[req.tenant] = refund(self.buckets.get(req.tenant), tenant, unused, time.monotonic())
        self.ledger.log([{"type": "request", "tenant": req.tenant, "request_id": req.request_id,
                          "finish_reason": reason, "prompt_tokens": prompt_fed,
                          "completion_tokens": len(seq.output_ids), **seq.usage.expert_record()}])

    # -- fairness ----------------------------------------------------------------------------------------
    def order(self, waiting: list) -> list:
        by_id = {s.id: s for s in waiting}
        weights = {s.request.tenant: self.weight_of(s.request.tenant) for s in waiting}
        ids = fair.fair_order([(s.id, s.request.tenant, s.prompt_left) for s in waiting], self.counters, weights)
        return [by_id[i] for i in ids]

    def charge(self, runs) -> None:
        """A step ran: ``runs`` are (sequence, tokens fed, prefill?) ."""
        for seq, n, prefill in runs:
            tenant = seq.request.tenant
            self.counters = fair.charge(self.counters, tenant, self.weight_of(tenant),
                                        prefill_tokens=n if prefill else 0, decode_tokens=0 if prefill else n)

    # -- the nodes' replies ------------------------------------------------------------------------------
    def reply_hook(self, tenants: list[str], usages: list[Usage], row_owner: np.ndarray):
        """The step's hook for node replies (:attr:`StepContext.on_reply`): owner ``i`` of the step's rows
        (``row_owner[row]``) is a request of tenant ``tenants[i]`` whose usage is ``usages[i]``."""
        return lambda layer, node, batch, header, offset: self.on_reply(tenants, usages, row_owner, layer, batch,
                                                                        header, offset)

    def on_reply(self, tenants: list[str], usages: list[Usage], row_owner: np.ndarray, layer: int, batch, header,
                 offset: int) -> None:
        segments = [(seg.call_index, seg.tokens) for seg in batch.segments]
        shares, by_function = attribute(segments, header.results, row_owner, offset,
                                        [c.function_id for c in batch.calls])
        per_tenant: dict[str, list] = {}
        for owner, share in shares.items():
            usages[owner].add(Usage(expert_rows=share.rows, expert_calls=len(share.calls),
                                    expert_compute_s=share.compute_s, cold_starts=share.cold_starts(header.results)))
            acc = per_tenant.setdefault(tenants[owner], [0, set(), 0.0])
            acc[0] += share.rows
            acc[1] |= share.calls
            acc[2] += share.compute_s
        for tenant, (rows, calls, compute_s) in per_tenant.items():       # a call counts once per tenant
            cold = sum(bool(header.results[c].cold_start) for c in calls)
            self.ledger.experts(tenant, layer, rows, len(calls), compute_s, cold)
        with self._rows_lock:
            for (fid, owner), n in by_function.items():
                key = (fid, tenants[owner])
                self._rows[key] = self._rows.get(key, 0) + n

    def take_rows(self) -> dict[tuple[str, str], int]:
        with self._rows_lock:
            rows, self._rows = self._rows, {}
            return rows


def row_owners(lengths) -> np.ndarray:
    """The owner (index in the step's list of sequences) of every packed row of a step."""
    return np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
