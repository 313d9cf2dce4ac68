"""The usage ledger: what every tenant used, in time buckets, under a lock (the engine's loop writes it, the
HTTP handlers and Prometheus read it, the memory poller adds to it from a thread).

Per tenant: requests, prompt and completion tokens, expert rows and calls per layer, expert compute seconds
measured on the nodes (attributed pro rata by rows), node memory-seconds of the loaded functions they used
(attributed by rows, see :mod:`faasmoe.router.tenancy.memory`) and the cold starts their requests waited on.
Finished requests and memory attributions are also appended as JSON lines to a usage log, for billing, by a
writer thread (the engine's loop never waits on the disk); the log file is opened for each batch of lines, so it
can be rotated (renamed) at any time. A write that fails is logged and counted, never raised.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from pathlib import Path

from prometheus_client.core import CounterMetricFamily

from faasmoe.router.tenancy.usage import Usage

log = logging.getLogger(__name__)
BUCKET_S = 10.0
RETAIN_S = 24 * 3600.0


class Ledger:
    def __init__(self, usage_log: str | Path | None = None, clock=time.time):
        self.usage_log = Path(usage_log) if usage_log else None
        self.clock = clock
        self._buckets: dict[int, dict[str, Usage]] = {}
        self._totals: dict[str, Usage] = {}
        self.unattributed_memory_byte_s = 0.0     # loaded functions nobody used in the interval (keep-alive)
        self.log_failures = 0                     # usage-log writes that failed
        self._lock = threading.Lock()
        self._lines: queue.Queue = queue.Queue()
        self._writer: threading.Thread | None = None
        if self.usage_log is not None:
            self._writer = threading.Thread(target=self._write_lines, name="faasmoe-usage-log", daemon=True)
            self._writer.start()

    def _record(self, tenant: str, usage: Usage) -> None:
        now = self.clock()
        key = int(now // BUCKET_S)
        with self._lock:
            self._buckets.setdefault(key, {}).setdefault(tenant, Usage()).add(usage)
            self._totals.setdefault(tenant, Usage()).add(usage)
            oldest = int((now - RETAIN_S) // BUCKET_S)
            for stale in [k for k in self._buckets if k < oldest]:
                del self._buckets[stale]

    # -- writers ----------------------------------------------------------------------------------------
    def request_started(self, tenant: str) -> None:
        self._record(tenant, Usage(requests=1))

    def tokens(self, tenant: str, prompt: int = 0, completion: int = 0) -> None:
        self._record(tenant, Usage(prompt_tokens=prompt, completion_tokens=completion))

    def experts(self, tenant: str, layer: int, rows: int, calls: int, compute_s: float, cold_starts: int) -> None:
        self._record(tenant, Usage(expert_rows=rows, expert_calls=calls, expert_compute_s=compute_s,
                                   cold_starts=cold_starts, rows_by_layer={layer: rows}, calls_by_layer={layer: calls}))

    def memory(self, by_tenant: dict[str, float], unattributed_byte_s: float, interval_s: float) -> None:
        for tenant, byte_s in by_tenant.items():
            self._record(tenant, Usage(memory_byte_s=byte_s))
        with self._lock:
            self.unattributed_memory_byte_s += unattributed_byte_s
        if by_tenant:
            self.log([{"type": "memory", "tenant": t, "interval_s": round(interval_s, 3),
                       "memory_gb_s": round(b / 1e9, 9)} for t, b in sorted(by_tenant.items())])

    def log(self, records: list[dict]) -> None:
        """Queue records for the usage log (never blocks, never raises)."""
        if self.usage_log is None or not records:
            return
        stamp = self.clock()
        self._lines.put("".join(json.dumps({"ts": round(stamp, 3), **r}, sort_keys=True) + "\n" for r in records))

    def flush(self, timeout_s: float = 10.0) -> None:
        """Wait until the queued lines are written (tests, shutdown)."""
        if self._writer is not None:
            done = threading.Event()
            self._lines.put(done)
            done.wait(timeout_s)

    def _write_lines(self) -> None:
        while True:
            item = self._lines.get()
            batch = [item]
            while not self._lines.empty():
                batch.append(self._lines.get_nowait())
            text = "".join(b for b in batch if isinstance(b, str))
            if text:
                try:
                    with open(self.usage_log, "a") as fh:     # opened per batch: the file may be rotated
                        fh.write(text)
                except OSError as exc:
                    self.log_failures += 1
                    log.error("usage log %s: %s (%d failed writes so far)", self.usage_log, exc, self.log_failures)
            for b in batch:
                if isinstance(b, threading.Event):
                    b.set()

    # -- readers ----------------------------------------------------------------------------------------
    def totals(self) -> dict[str, Usage]:
        with self._lock:
            out = {}
            for tenant, usage in self._totals.items():
                copy = Usage()
                copy.add(usage)
                out[tenant] = copy
            return out

    def window(self, seconds: float | None = None, tenant: str | None = None) -> dict[str, dict]:
        """Usage per tenant over the last ``seconds`` (whole buckets of 10 s; None = since start)."""
        if seconds is None:
            usage = self.totals()
        else:
            since = int((self.clock() - seconds) // BUCKET_S)
            usage = {}
            with self._lock:
                for key, by_tenant in self._buckets.items():
                    if key >= since:
                        for name, u in by_tenant.items():
                            usage.setdefault(name, Usage()).add(u)
        return {name: u.as_dict() for name, u in sorted(usage.items()) if tenant is None or name == tenant}


class LedgerCollector:
    """Prometheus families with a ``tenant`` label, read at scrape time."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    def collect(self):
        totals = self.ledger.totals()
        specs = (("requests", "requests admitted"), ("prompt_tokens", "prompt tokens"),
                 ("completion_tokens", "completion tokens"), ("expert_rows", "token rows computed by experts"),
                 ("expert_calls", "expert function calls with the tenant's rows"),
                 ("expert_compute_seconds", "node ONNX seconds attributed (pro rata by rows)"),
                 ("memory_byte_seconds", "node memory-seconds of loaded functions attributed (by rows)"),
                 ("cold_starts", "cold starts the tenant's requests waited on"))
        for name, text in specs:
            family = CounterMetricFamily(f"faasmoe_tenant_{name}", text, labels=["tenant"])
            attr = {"expert_compute_seconds": "expert_compute_s", "memory_byte_seconds": "memory_byte_s"}.get(name, name)
            for tenant, usage in sorted(totals.items()):
                family.add_metric([tenant], getattr(usage, attr))
            yield family
        rows = CounterMetricFamily("faasmoe_tenant_expert_rows_by_layer", "expert token rows per layer",
                                   labels=["tenant", "layer"])
        for tenant, usage in sorted(totals.items()):
            for layer, n in sorted(usage.rows_by_layer.items()):
                rows.add_metric([tenant, str(layer)], n)
        yield rows
