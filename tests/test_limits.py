"""A tenant's limits: pure decisions, table-driven."""

import pytest

from faasmoe.router.tenancy.config import Tenant
from faasmoe.router.tenancy.limits import Bucket, admit, refill, refund

T = Tenant("t", "0" * 64, max_concurrent=2, tokens_per_minute=600, max_tokens_per_request=300)
FREE = Tenant("free", "1" * 64)


@pytest.mark.parametrize("tenant, bucket, in_flight, cost, now, status, retry, level_after", [
    (FREE, None, 99, 10_000, 0.0, 200, 0.0, None),                     # no limits
    (T, None, 0, 100, 0.0, 200, 0.0, 500.0),                           # a full bucket to start
    (T, None, 0, 301, 0.0, 400, 0.0, None),                            # over max_tokens_per_request
    (T, None, 2, 10, 0.0, 429, 1.0, None),                             # at max_concurrent
    (T, Bucket(100.0, 0.0), 0, 200, 0.0, 429, 10.0, 100.0),             # 100 short at 10 tokens/s: 10 s
    (T, Bucket(100.0, 0.0), 0, 200, 10.0, 200, 0.0, 0.0),              # 10 s later it fits exactly
    (T, Bucket(0.0, 0.0), 0, 50, 1000.0, 200, 0.0, 550.0),              # refill caps at a minute's worth
    (Tenant("u", "2" * 64, tokens_per_minute=100), None, 0, 101, 0.0, 400, 0.0, None),   # never fits a minute
    (Tenant("v", "3" * 64, max_concurrent=1, tokens_per_minute=100), None, 5, 101, 0.0, 400, 0.0, None),  # 400 first
])
def test_admit(tenant, bucket, in_flight, cost, now, status, retry, level_after):
    decision, after = admit(tenant, bucket, in_flight, cost, now)
    assert decision.status == status and decision.retry_after_s == pytest.approx(retry)
    assert (status == 200) == (decision.reason == "")
    if level_after is not None:
        assert after.level == pytest.approx(level_after)


def test_refill_and_refund():
    assert refill(None, T, 5.0) == Bucket(600.0, 5.0)
    assert refill(Bucket(0.0, 0.0), T, 6.0).level == pytest.approx(60.0)
    assert refund(Bucket(100.0, 0.0), T, 50, 0.0).level == pytest.approx(150.0)
    assert refund(Bucket(590.0, 0.0), T, 50, 0.0).level == 600.0                  # never above a minute's worth
    assert refund(None, FREE, 50, 0.0) is None
