"""How much the router retries, and whom it avoids: pure decisions plus two small holders of state.

- :func:`retry_allowed`: a retry is allowed while the retries of the last window stay under a floor plus a
  ratio of the frames first sent in it (the retry budget: a mesh in trouble gets at most ``ratio`` more load
  from retries, never a retry storm).
- :func:`ban_s`: a node that failed ``failures`` times in a row is avoided for a while, doubling per failure
  from the second one on, up to a cap; one success clears it.
- :func:`prefer_unbanned`: replicas without a ban, unless every replica is banned (then all of them: a ban
  steers traffic, it never makes a function unreachable).

:class:`RetryBudget` and :class:`NodeBans` keep the counts; the clock is passed in, so tests drive them
with tables.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Sequence

from faasmoe.proto.backoff import Backoff

MAX_ATTEMPTS = 3                       # per failed frame: the first send and two retries
RETRY_BACKOFF = Backoff(0.02, 0.5, factor=3.0, jitter=0.5)
BAN_BACKOFF = Backoff(1.0, 30.0, factor=2.0)


def retry_allowed(first_sends: int, retries: int, *, ratio: float, floor: int) -> bool:
    """May one more retry go out, given the window's first sends and retries so far?"""
    return retries < floor + ratio * first_sends


def ban_s(consecutive_failures: int, backoff: Backoff = BAN_BACKOFF) -> float:
    """How long a node is avoided after ``consecutive_failures`` failures in a row (0: not banned)."""
    if consecutive_failures < 2:
        return 0.0
    return backoff.delay_s(consecutive_failures - 2)


def prefer_unbanned(replicas: Sequence[str], banned: frozenset[str] | set[str]) -> list[str]:
    ok = [n for n in replicas if n not in banned]
    return ok if ok else list(replicas)


@dataclass
class RetryBudget:
    """Retries allowed per sliding window: ``floor`` + ``ratio`` × first sends (gRPC's and Finagle's idea)."""

    ratio: float = 0.2
    floor: int = 10
    window_s: float = 10.0
    _sends: collections.deque = field(default_factory=collections.deque)
    _retries: collections.deque = field(default_factory=collections.deque)
    refused: int = 0                   # retries the budget refused (for /status and tests)
    spent: int = 0                     # retries it allowed
    first_sends: int = 0               # frames counted, all time

    def _trim(self, now_s: float) -> None:
        for q in (self._sends, self._retries):
            while q and q[0] <= now_s - self.window_s:
                q.popleft()

    def sent(self, now_s: float, n: int = 1) -> None:
        """``n`` frames went out for the first time."""
        self._sends.extend([now_s] * n)
        self.first_sends += n
        self._trim(now_s)

    def try_retry(self, now_s: float, n: int = 1) -> bool:
        """Take ``n`` retries (frames to resend) from the budget if it allows them all."""
        self._trim(now_s)
        if not retry_allowed(len(self._sends), len(self._retries) + n - 1, ratio=self.ratio, floor=self.floor):
            self.refused += n
            return False
        self._retries.extend([now_s] * n)
        self.spent += n
        return True


@dataclass
class NodeBans:
    """Consecutive failures per node and the bans they earned."""

    backoff: Backoff = BAN_BACKOFF
    failures: dict[str, int] = field(default_factory=dict)
    until_s: dict[str, float] = field(default_factory=dict)

    def failed(self, node: str, now_s: float) -> float:
        """Count a failure; returns the ban it earned (seconds, 0 for none)."""
        n = self.failures[node] = self.failures.get(node, 0) + 1
        ban = ban_s(n, self.backoff)
        if ban:
            self.until_s[node] = now_s + ban
        return ban

    def succeeded(self, node: str) -> None:
        self.failures.pop(node, None)
        self.until_s.pop(node, None)

    def banned(self, now_s: float) -> frozenset[str]:
        return frozenset(n for n, t in self.until_s.items() if t > now_s)
