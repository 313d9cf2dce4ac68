"""What the engine refuses at the door, as pure functions: a request it can never serve (400, naming the
field), and a tenant's limit decision turned into its error (400 never, 429 not now)."""

from __future__ import annotations

from faasmoe.proto.errors import BadRequest, RateLimited
from faasmoe.router.engine.sequence import Request
from faasmoe.router.tenancy.limits import Decision


def check_request(request: Request, max_positions: int, vocab_size: int, cache_tokens: int,
                  kv_bytes_per_token: int, kv_cache_bytes: int) -> None:
    n = len(request.prompt_ids)
    if n == 0:
        raise BadRequest("the prompt is empty", "prompt")
    if request.max_tokens < 1:
        raise BadRequest(f"max_tokens must be at least 1, got {request.max_tokens}", "max_tokens")
    total = n + request.max_tokens
    if total > max_positions:
        raise BadRequest(f"this model's context is {max_positions} tokens; the prompt has {n} and max_tokens asks "
                         f"for {request.max_tokens} more ({total}): shorten the prompt or lower max_tokens",
                         "max_tokens")
    if total > cache_tokens:
        need_mib = total * kv_bytes_per_token / 2**20
        raise BadRequest(f"prompt + max_tokens ({total} tokens) need {need_mib:.0f} MiB of KV cache, more than the "
                         f"server's {kv_cache_bytes / 2**20:.0f} MiB (--kv-cache-mb): lower max_tokens", "max_tokens")
    if any(not 0 <= t < vocab_size for t in request.prompt_ids):
        raise BadRequest(f"prompt token ids must be in [0, {vocab_size})", "prompt")


def raise_for(decision: Decision) -> None:
    """A tenant limit's decision as the error the API answers with (nothing when admitted)."""
    if decision.status == 400:
        raise BadRequest(decision.reason, "max_tokens")
    if decision.status == 429:
        raise RateLimited(decision.reason, decision.retry_after_s)
