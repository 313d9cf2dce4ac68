"""The tests' one poller: wait on a condition with a deadline (never a sleep that orders a test)."""

from __future__ import annotations

import time
from typing import Callable


def wait_for(predicate: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.02,
             ignore: tuple[type[BaseException], ...] = ()):
    """Poll ``predicate`` until it returns something truthy, and return that; AssertionError naming ``what``
    after ``timeout_s``. Exceptions of the ``ignore`` types count as not yet (a server still starting)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = predicate()
        except ignore:
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout_s:.1f} s waiting for {what}")
        time.sleep(interval_s)
