"""What the engine refuses at the door (router/engine/admission.py), as tables."""

from __future__ import annotations

import pytest

from faasmoe.proto.errors import BadRequest, RateLimited
from faasmoe.router.engine.admission import check_request, raise_for
from faasmoe.router.engine.sequence import Request
from faasmoe.router.tenancy.limits import Decision

LIMITS = dict(max_positions=64, vocab_size=10, cache_tokens=48, kv_bytes_per_token=1 << 20, kv_cache_bytes=48 << 20)


@pytest.mark.parametrize("prompt, max_tokens, param, match", [
    ((), 4, "prompt", "the prompt is empty"),
    ((1, 2), 0, "max_tokens", "at least 1, got 0"),
    ((1,) * 10, 60, "max_tokens", "context is 64 tokens; the prompt has 10 and max_tokens asks for 60 more"),
    ((1,) * 10, 40, "max_tokens", r"50 tokens\) need 50 MiB of KV cache, more than the server's 48 MiB"),
    ((1, 10), 4, "prompt", r"token ids must be in \[0, 10\)"),
    ((1, -1), 4, "prompt", r"token ids must be in \[0, 10\)"),
])
def test_refused(prompt, max_tokens, param, match):
    with pytest.raises(BadRequest, match=match) as refused:
        check_request(Request(prompt, max_tokens), **LIMITS)
    assert refused.value.param == param


@pytest.mark.parametrize("prompt, max_tokens", [((1,), 1), ((9,) * 10, 38), ((0,) * 47, 1)])
def test_served(prompt, max_tokens):
    check_request(Request(prompt, max_tokens), **LIMITS)


@pytest.mark.parametrize("decision, error", [
    (Decision(200), None),
    (Decision(400, "at most 10 per request"), BadRequest),
    (Decision(429, "2 in flight", 3.0), RateLimited),
])
def test_a_limit_decision(decision, error):
    if error is None:
        assert raise_for(decision) is None
        return
    with pytest.raises(error, match=decision.reason) as refused:
        raise_for(decision)
    if error is RateLimited:
        assert refused.value.retry_after_s == 3.0
