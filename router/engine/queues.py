"""The engine's two queues, waiting and running, and every change to them: the scheduler's side of a step.

:meth:`BatchQueues.plan` hands the queues to the pure :func:`~faasmoe.router.engine.scheduler.plan_step` as plain
views (in the fairness order given, with the urgent ones marked) and remembers whether the step was an urgent
one; :meth:`BatchQueues.admit` applies the plan: the joining sequences leave the waiting queue and take a slot
of the KV manager. Sequences leave through :meth:`leave` (finished, failed) and :meth:`take_cancelled`. Only
the engine's loop calls these; readers on other threads see plain lists.
"""

from __future__ import annotations

from typing import Callable, Iterable

from faasmoe.router.engine.scheduler import Limits, SeqView, StepPlan, plan_step
from faasmoe.router.engine.sequence import Sequence


class BatchQueues:
    def __init__(self, limits: Limits):
        self.limits = limits
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self._last_urgent = False

    def __bool__(self) -> bool:
        return bool(self.waiting or self.running)

    def arrive(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def plan(self, order: Callable[[list[Sequence]], list[Sequence]] | None, urgent: set[int]) -> StepPlan:
        """The next step's plan; ``order`` puts the waiting queue in fairness order first (None: arrival)."""
        if order is not None:
            self.waiting = order(self.waiting)
        plan = plan_step([SeqView(s.id, s.prompt_left, s.reserve) for s in self.running],
                         [SeqView(s.id, s.prompt_left, s.reserve, s.id in urgent) for s in self.waiting],
                         self.limits, self._last_urgent)
        self._last_urgent = plan.urgent
        return plan

    def admit(self, plan: StepPlan, allocate_slot: Callable[[], int]) -> dict[int, Sequence]:
        """Apply ``plan``: its joining sequences run from now on, each in a fresh KV slot. Returns every planned
        sequence by id (running and joined)."""
        by_id = {s.id: s for s in self.running}
        waiting = {s.id: s for s in self.waiting}
        for seq_id in plan.admitted:
            seq = waiting[seq_id]
            seq.slot = allocate_slot()             # first: a sequence that gets no slot stays queued
            self.waiting.remove(seq)
            self.running.append(seq)
            by_id[seq_id] = seq
        return by_id

    def leave(self, seqs: Iterable[Sequence]) -> None:
        """``seqs`` leave whichever queue holds them."""
        for seq in seqs:
            for group in (self.running, self.waiting):
                if seq in group:
                    group.remove(seq)

    def take_cancelled(self) -> list[Sequence]:
        """Remove and return the sequences whose callers went away."""
        gone = [s for s in (*self.running, *self.waiting) if s.cancelled]
        self.leave(gone)
        return gone

    def take_all(self) -> list[Sequence]:
        every = [*self.running, *self.waiting]
        self.running, self.waiting = [], []
        return every
