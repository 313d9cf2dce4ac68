"""Keep a store placed on the live mesh: when the directory reports a node joining, leaving, dying or
coming back, wait for the mesh to settle, re-place (moving little) and deploy the difference. With the
``auto`` replica policy it also surveys the nodes' slot waits every interval and re-places when the set of
functions that warrant a second copy changes (:mod:`faasmoe.router.control.replicas`)."""

from __future__ import annotations

import logging
import threading
import time

from faasmoe.proto.backoff import Backoff
from faasmoe.proto.errors import FaasmoeError
from faasmoe.router.control.directory import DirectoryEvent, NodeDirectory
from faasmoe.router.control.session import RouterSession

log = logging.getLogger(__name__)
RETRY = Backoff(0.5, 30.0, jitter=0.2)     # a failed re-placement is retried after these delays


class PlacementController:
    def __init__(self, session: RouterSession, directory: NodeDirectory, settle_s: float = 1.0):
        self.session = session
        self.directory = directory
        self.settle_s = settle_s
        self.replacements = 0              # successful re-placements since start
        self.last_error: str | None = None
        self.last_replace_s: float | None = None   # duration of the last re-place + deploy
        self._changed = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._unsubscribe = None

    def start(self) -> None:
        self.session.on_mark_down = self.directory.mark_down
        self.session.eligible = lambda: [s.address for s in self.directory.up_nodes()]
        self._unsubscribe = self.directory.subscribe(self._on_event)
        self._changed.set()                # place once at start
        self._thread = threading.Thread(target=self._run, name="faasmoe-placement", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._changed.set()
        if self._unsubscribe:
            self._unsubscribe()
        if self._thread:
            self._thread.join(30)

    def _on_event(self, event: DirectoryEvent) -> None:
        if event.kind == "up":
            self.session.revive(event.node.address)
        if event.kind in ("down", "removed"):
            self.session.node_down(event.node.address)
        if event.kind in ("up", "down", "added", "removed"):
            self._changed.set()

    def _survey_interval_s(self) -> float | None:
        policy = self.session.replica_policy
        return policy.interval_s if policy is not None and policy.mode == "auto" else None

    def _run(self) -> None:
        failures = 0
        interval_s = self._survey_interval_s()
        next_survey_s = time.monotonic() + (interval_s or 0.0)
        while not self._stop.is_set():
            timeout_s = None if interval_s is None else max(0.0, next_survey_s - time.monotonic())
            if not self._changed.wait(timeout_s):          # the auto replica policy's survey is due
                next_survey_s = time.monotonic() + interval_s
                if not self._contention_changed():
                    continue
            if self._stop.is_set():
                return
            # settle: let a burst of events (several nodes starting) land before planning
            while self._changed.is_set() and not self._stop.is_set():
                self._changed.clear()
                self._stop.wait(self.settle_s)
            if self.reconcile():
                failures = 0
                continue
            # a failed re-place is retried with backoff even if the mesh says nothing new
            failures += 1
            if not self._stop.wait(RETRY.delay_s(failures - 1)):
                self._changed.set()

    def _contention_changed(self) -> bool:
        try:
            return self.session.contention_round([s.address for s in self.directory.up_nodes()])
        except Exception:  # noqa: BLE001 - a failed survey changes nothing; the next one retries
            log.exception("the replica survey failed")
            return False

    def reconcile(self) -> bool:
        addresses = [s.address for s in self.directory.up_nodes()]
        start = time.perf_counter()
        try:
            plan, views = self.session.place_and_deploy(addresses)
        except FaasmoeError as exc:
            self.last_error = str(exc)
            log.error("re-placement failed: %s", exc)
            return False
        except Exception as exc:  # noqa: BLE001 - the controller outlives any round; the next one retries
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.exception("re-placement round failed unexpectedly; retrying with backoff")
            return False
        self.last_error = None
        self.last_replace_s = time.perf_counter() - start
        log.info("placed %d functions on %d nodes in %.2f s", len(plan), len(views), self.last_replace_s)
        self.replacements += 1
        return True
