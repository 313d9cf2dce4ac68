"""Weighted-fair scheduling across tenants, in the spirit of the Virtual Token Counter (Sheng et al.,
"Fairness in Serving Large Language Models", OSDI 2024). Pure functions over plain data:

- every tenant has a counter of the service it received, in weighted tokens divided by its weight:
  ``prefill tokens × W_PREFILL + decode tokens × W_DECODE`` (:func:`charge`);
- waiting requests join the batch tenant by tenant, always from the tenant whose counter, with the prompts
  already picked in this round charged ahead, is lowest (:func:`fair_order`); a tenant's own requests keep
  their arrival order;
- a tenant that was not queued and gets a request is lifted to the lowest counter of the tenants with requests
  waiting, or, when nobody waits, to the counter of the tenant that joined last; never lowered. Idling banks no
  credit, and a tenant that only has requests running is no reference for it (:func:`on_arrival`).

A tenant that floods the server therefore gets its weighted share of the joins and no more.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

W_PREFILL = 1.0     # a prompt token is cheaper than a generated one (the paper's input/output weights)
W_DECODE = 2.0


def charge(counters: Mapping[str, float], tenant: str, weight: float, prefill_tokens: int = 0,
           decode_tokens: int = 0) -> dict[str, float]:
    out = dict(counters)
    out[tenant] = out.get(tenant, 0.0) + (prefill_tokens * W_PREFILL + decode_tokens * W_DECODE) / weight
    return out


def on_arrival(counters: Mapping[str, float], tenant: str, waiting: Iterable[str],
               last_admitted: str | None) -> dict[str, float]:
    """``tenant`` submits a request; ``waiting``: the tenants with requests waiting before it; ``last_admitted``:
    the tenant whose request joined the batch last."""
    waiting = set(waiting)
    out = dict(counters)
    if tenant in waiting:
        return out
    if waiting:
        level = min(out.get(t, 0.0) for t in waiting)
    elif last_admitted is not None:
        level = out.get(last_admitted, 0.0)
    else:
        level = 0.0
    out[tenant] = max(out.get(tenant, 0.0), level)
    return out


def fair_order(waiting: Sequence[tuple[int, str, int]], counters: Mapping[str, float],
               weights: Mapping[str, float]) -> list[int]:
    """Order waiting requests ``(seq id, tenant, prompt tokens)`` (given in arrival order) for joining."""
    queues: dict[str, list[tuple[int, int]]] = {}
    for seq_id, tenant, prompt_tokens in waiting:
        queues.setdefault(tenant, []).append((seq_id, prompt_tokens))
    projected = {t: counters.get(t, 0.0) for t in queues}
    first_seen = {t: i for i, t in enumerate(queues)}
    order = []
    while queues:
        tenant = min(queues, key=lambda t: (projected[t], first_seen[t]))
        seq_id, prompt_tokens = queues[tenant].pop(0)
        order.append(seq_id)
        projected[tenant] += prompt_tokens * W_PREFILL / weights.get(tenant, 1.0)
        if not queues[tenant]:
            del queues[tenant]
    return order
