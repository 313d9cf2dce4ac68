"""The one backoff schedule of faasmoe (node telemetry reconnects, router retries and re-placements).

``Backoff(first_s, max_s, factor, jitter).delay_s(attempt)`` is a pure function of the attempt number (0 =
the first retry) and, with ``jitter``, of the random draw: the delay grows by ``factor`` per attempt up to
``max_s``, and jitter scales it by a factor drawn from ``[1 - jitter, 1]`` so callers that failed together do
not retry together.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterator


@dataclass(frozen=True)
class Backoff:
    first_s: float          # delay before the first retry
    max_s: float            # cap
    factor: float = 2.0     # growth per attempt
    jitter: float = 0.0     # 0..1: fraction of the delay that is random

    def __post_init__(self):
        if not (0 < self.first_s <= self.max_s) or self.factor < 1 or not 0 <= self.jitter <= 1:
            raise ValueError(f"invalid backoff {self}")

    def delay_s(self, attempt: int, draw: float | None = None) -> float:
        """Seconds to wait before retry number ``attempt`` (0-based). ``draw`` in [0, 1) replaces the random
        draw (tests)."""
        base = self.max_s
        if self.factor == 1 or attempt < math.log(self.max_s / self.first_s) / math.log(self.factor):
            base = min(self.max_s, self.first_s * self.factor ** max(attempt, 0))
        if not self.jitter:
            return base
        u = random.random() if draw is None else draw
        return base * (1 - self.jitter * u)

    def delays_s(self) -> Iterator[float]:
        """The delays of attempts 0, 1, 2, … (endless)."""
        attempt = 0
        while True:
            yield self.delay_s(attempt)
            attempt += 1
