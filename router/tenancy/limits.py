"""A tenant's limits, as pure decisions over plain data.

- ``max_tokens_per_request``: prompt + max_tokens of one request; over it is a 400 (retrying cannot help).
- ``max_concurrent``: requests running or waiting at once; over it is a 429.
- ``tokens_per_minute``: a token bucket holding at most a minute's worth, refilled continuously. A request
  takes prompt + max_tokens from it when admitted and gets back what it did not generate when it ends; when
  the bucket holds too little the request is a 429 whose Retry-After is when it will hold enough. A request
  bigger than a whole minute's worth is a 400.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from faasmoe.router.tenancy.config import Tenant


MAX_RETRY_S = 60.0     # a concurrency Retry-After is a guess (when a running request ends): never longer


@dataclass(frozen=True)
class Bucket:
    level: float          # tokens available
    at_s: float           # when ``level`` was computed (monotonic seconds)


@dataclass(frozen=True)
class Decision:
    status: int = 200     # 200 admit, 400 never admissible, 429 not now
    reason: str = ""
    retry_after_s: float = 0.0


def refill(bucket: Bucket | None, tenant: Tenant, now_s: float) -> Bucket:
    capacity = tenant.tokens_per_minute
    if bucket is None:
        return Bucket(float(capacity), now_s)
    level = min(float(capacity), bucket.level + (now_s - bucket.at_s) * capacity / 60.0)
    return Bucket(level, now_s)


def admit(tenant: Tenant, bucket: Bucket | None, in_flight: int, cost_tokens: int, now_s: float,
          concurrency_retry_s: float = 1.0) -> tuple[Decision, Bucket | None]:
    """Whether a request of ``cost_tokens`` (prompt + max_tokens) may start now; the bucket after it."""
    if tenant.max_tokens_per_request and cost_tokens > tenant.max_tokens_per_request:
        return Decision(400, f"prompt + max_tokens is {cost_tokens} tokens; tenant {tenant.name!r} may ask for at "
                             f"most {tenant.max_tokens_per_request} per request"), bucket
    if tenant.tokens_per_minute and cost_tokens > tenant.tokens_per_minute:
        return Decision(400, f"prompt + max_tokens is {cost_tokens} tokens, more than tenant {tenant.name!r}'s "
                             f"{tenant.tokens_per_minute} tokens per minute"), bucket
    if tenant.max_concurrent and in_flight >= tenant.max_concurrent:
        return Decision(429, f"tenant {tenant.name!r} has {in_flight} requests in flight, its limit is "
                             f"{tenant.max_concurrent}", min(MAX_RETRY_S, max(1.0, concurrency_retry_s))), bucket
    if not tenant.tokens_per_minute:
        return Decision(), bucket
    bucket = refill(bucket, tenant, now_s)
    if bucket.level < cost_tokens:
        wait_s = (cost_tokens - bucket.level) * 60.0 / tenant.tokens_per_minute
        return Decision(429, f"tenant {tenant.name!r} used its {tenant.tokens_per_minute} tokens per minute",
                        math.ceil(wait_s * 1000) / 1000), bucket
    return Decision(), Bucket(bucket.level - cost_tokens, now_s)


def refund(bucket: Bucket | None, tenant: Tenant, unused_tokens: int, now_s: float) -> Bucket | None:
    """A request ended having generated fewer tokens than it reserved."""
    if bucket is None or not tenant.tokens_per_minute:
        return bucket
    bucket = refill(bucket, tenant, now_s)
    return Bucket(min(float(tenant.tokens_per_minute), bucket.level + max(0, unused_tokens)), now_s)
