"""Pure decision: which sequences run in the next step and how many tokens each feeds.

    plan_step(running, waiting, limits) -> StepPlan

1. Every running sequence that is decoding feeds its one token: decodes never wait behind prefills.
2. Running sequences still prefilling feed their next prompt chunk (at most ``prefill_chunk`` tokens), in order,
   while the step's token budget (``max_step_tokens``) lasts.
3. Waiting sequences join in the order given (arrival, or a fairness order decided elsewhere) while there is
   room in the batch (``max_running``), step budget left and room in the KV cache: a sequence reserves its
   whole length (prompt + max tokens) when it joins, and the running ones together stay within
   ``cache_tokens``. One that does not fit waits; the ones behind it wait too (no overtaking by size).

Long prompts are so prefilled over several steps while the running decodes keep stepping.

With tenants, a waiting sequence is *urgent* when its tenant has nothing running (a light tenant's request
beside a heavy one). Two rules keep its time to first token short: the last ``reserved_slots`` places of the
batch are kept for urgent sequences (a flooding tenant cannot fill the batch to the brim), and an urgent
sequence that can join runs its first chunk in a step of its own (the decodes wait that one short step), but
never two such steps in a row, so decodes cannot starve.

The plan is plain data (sequence ids and token counts); nothing here touches a tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class SeqView:
    seq_id: int
    prompt_left: int         # prompt tokens not yet in the cache; 0 = decoding
    reserve: int = 0         # KV cache tokens the sequence holds at most (prompt + max tokens)
    urgent: bool = False     # its tenant has nothing running


@dataclass(frozen=True)
class Limits:
    max_running: int = 32        # sequences in the batch at once
    max_step_tokens: int = 512   # tokens fed per step, all sequences together
    prefill_chunk: int = 256     # prompt tokens one sequence feeds per step at most
    cache_tokens: int = 1 << 62  # KV cache tokens all running sequences may reserve together
    reserved_slots: int = 0      # batch places only urgent sequences may take (ignored without tenants)

    def __post_init__(self):
        if min(self.max_running, self.max_step_tokens, self.prefill_chunk) < 1:
            raise ValueError("scheduler limits must be >= 1")
        if not 0 <= self.reserved_slots < self.max_running:
            raise ValueError(f"reserved_slots ({self.reserved_slots}) must be >= 0 and below max_running "
                             f"({self.max_running})")
        if self.max_step_tokens < self.max_running:
            raise ValueError(f"max_step_tokens ({self.max_step_tokens}) must be at least max_running "
                             f"({self.max_running}): every running decode feeds one token per step")


@dataclass(frozen=True)
class StepPlan:
    runs: tuple[tuple[int, int], ...]     # (seq id, tokens fed), running sequences first
    admitted: tuple[int, ...]             # waiting sequences that join the batch
    urgent: bool = False                  # a step of urgent prefills only

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.runs)


def plan_step(running: Sequence[SeqView], waiting: Sequence[SeqView], limits: Limits,
              last_urgent: bool = False) -> StepPlan:
    room = limits.max_running - len(running)
    cache_left = limits.cache_tokens - sum(s.reserve for s in running)
    if not last_urgent and room > 0 and any(s.urgent for s in waiting):
        urgent = _admit([s for s in waiting if s.urgent], room, limits.max_step_tokens, cache_left, limits)
        if urgent:
            return StepPlan(tuple(urgent), tuple(i for i, _ in urgent), urgent=True)
    runs = [(s.seq_id, 1) for s in running if s.prompt_left == 0]
    budget = limits.max_step_tokens - len(runs)
    for s in running:
        if s.prompt_left > 0 and budget > 0:
            n = min(s.prompt_left, limits.prefill_chunk, budget)
            runs.append((s.seq_id, n))
            budget -= n
    joined = _admit(waiting, room, budget, cache_left, limits)
    return StepPlan(tuple(runs + joined), tuple(i for i, _ in joined))


def _admit(waiting: Sequence[SeqView], room: int, budget: int, cache_left: int, limits: Limits) -> list:
    """Waiting sequences that join, in order, with their first chunk; the reserved places are for urgent ones."""
    joined = []
    for s in waiting:
        free = room if s.urgent else room - limits.reserved_slots
        if free <= 0 or budget <= 0 or s.reserve > cache_left:
            break
        cache_left -= s.reserve
        n = min(s.prompt_left, limits.prefill_chunk, budget)
        joined.append((s.seq_id, n))
        budget -= n
        room -= 1
    return joined
