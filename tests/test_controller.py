"""The placement controller outlives any exception in a re-placement round: it logs it, keeps the error for
/status, and retries with backoff until a round succeeds."""

from __future__ import annotations

import logging

from faasmoe.router.control.controller import PlacementController
from faasmoe.router.control.directory import NodeDirectory
from faasmoe.router.control.local_mesh import LocalMesh
from faasmoe.router.control.session import RouterSession
from faasmoe.router.store.split import split_checkpoint
from model_factory import make_checkpoint
from serving_fixtures import wait_for


def test_controller_survives_an_unexpected_exception_and_retries(tmp_path, caplog):
    model_dir = make_checkpoint(tmp_path / "model", num_layers=2)
    store = tmp_path / "store"
    split_checkpoint(model_dir, store, group_size=4, progress=False)
    victim = next(store.rglob("*.onnx"))
    aside = tmp_path / victim.name
    victim.rename(aside)                   # an operator moved a function file away: the round fails
    caplog.set_level(logging.WARNING, logger="faasmoe.router.control.controller")
    with LocalMesh(1, tmp_path / "nodes", memory_budget_mb=256) as mesh:
        session = RouterSession(store)
        directory = NodeDirectory(static=mesh.addresses, health_interval_s=0.2)
        controller = PlacementController(session, directory, settle_s=0.05)
        directory.start()
        controller.start()
        try:
            wait_for(lambda: controller.last_error is not None, 30, "a failed round")
            assert "missing from the store" in controller.last_error
            assert controller._thread.is_alive()
            assert any("re-placement" in r.getMessage() for r in caplog.records)
            aside.rename(victim)           # put back: the next round (backoff) succeeds
            wait_for(lambda: controller.replacements >= 1 and controller.last_error is None, 30, "a good round")
            assert set(session.placement) == {f.function_id for f in session.manifest.functions}
        finally:
            controller.stop()
            directory.stop()
            session.close()
