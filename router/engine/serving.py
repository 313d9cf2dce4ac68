"""The serving stack over one store, on the running event loop: the dense model, the mesh transport and
dispatch, the runner and the engine, wired to a :class:`~faasmoe.router.control.session.RouterSession` (which
places and routes the functions; its recoveries run in worker threads).

    serving = await start_serving(session, EngineConfig())
    result = await serving.engine.generate(Request(prompt_ids, max_tokens=32))
    await serving.close()
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, GenerationConfig

from faasmoe.router.control.session import RouterSession, SessionControl
from faasmoe.router.engine.engine import Engine, EngineConfig
from faasmoe.router.mesh.dispatch import ExpertMesh
from faasmoe.router.mesh.transport import Transport
from faasmoe.router.model.build import build_mesh_model
from faasmoe.router.model.experts import MeshExperts
from faasmoe.router.model.precision import ServedPrecision
from faasmoe.router.model.runner import ModelRunner

log = logging.getLogger(__name__)


def load_tokenizer(store):
    """The store's tokenizer, or None for a store without one (the engine then works on token ids only)."""
    if not any((Path(store) / name).exists() for name in ("tokenizer.json", "tokenizer_config.json",
                                                           "tokenizer.model", "vocab.json")):
        log.warning("%s has no tokenizer: requests must give token ids", store)
        return None
    return AutoTokenizer.from_pretrained(str(store))


def eos_ids_of(store, config, tokenizer) -> frozenset[int]:
    """The tokens that end a sequence, as transformers' ``generate`` takes them (generation config first)."""
    try:
        eos = GenerationConfig.from_pretrained(str(store)).eos_token_id
    except OSError:
        eos = None
    if eos is None:
        eos = config.eos_token_id if config.eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


@dataclass
class Serving:
    session: RouterSession
    tokenizer: object
    model: torch.nn.Module
    transport: Transport
    mesh: ExpertMesh
    engine: Engine
    dense_dtype: torch.dtype = torch.float32

    @property
    def precision(self) -> ServedPrecision:
        return ServedPrecision.of_mesh(self.session.manifest, self.dense_dtype)

    async def close(self) -> None:
        if self._on_down in self.session.down_listeners:
            self.session.down_listeners.remove(self._on_down)
        await self.engine.stop()
        await self.transport.close()

    def __post_init__(self):
        loop = asyncio.get_running_loop()

        def on_down(address: str) -> None:      # from the directory's thread
            loop.call_soon_threadsafe(self.transport.fail_node, address, "its health checks say it is down")
        self._on_down = on_down
        self.session.down_listeners.append(on_down)


async def start_serving(session: RouterSession, config: EngineConfig = EngineConfig(),
                        dtype: torch.dtype = torch.float32, accounting=None) -> Serving:
    model = await asyncio.to_thread(build_mesh_model, session.store, session.manifest, dtype)
    tokenizer = await asyncio.to_thread(load_tokenizer, session.store)
    transport = Transport(tls=session.tls)
    mesh = ExpertMesh(session.layers, transport, session.routing, control=SessionControl(session),
                      step_timeout_s=config.step_timeout_s, frame_timeout_s=config.frame_timeout_s,
                      degraded=config.degraded)
    mesh.caller = session.router_id
    mesh.node_max_message_bytes = session.max_message_bytes     # frames are cut to the smallest node's limit
    engine = Engine(ModelRunner(model, MeshExperts(mesh)), tokenizer, mesh=mesh, config=config,
                    eos_ids=eos_ids_of(session.store, model.config, tokenizer), accounting=accounting)
    await engine.start()
    return Serving(session, tokenizer, model, transport, mesh, engine, dtype)


@contextlib.asynccontextmanager
async def local_serving(store, addresses, config: EngineConfig = EngineConfig(), *, router_id: str | None = None,
                        warm: bool = False, accounting=None, dtype: torch.dtype = torch.float32, replica_policy=None):
    """Place ``store`` on the nodes at ``addresses`` and serve it on the running loop (tests, benchmarks, the
    demo): ``async with local_serving(store, mesh.addresses) as serving: ...``."""
    session = RouterSession(store, router_id=router_id, replica_policy=replica_policy)
    try:
        await asyncio.to_thread(session.place_and_deploy, list(addresses))
        if warm:
            await asyncio.to_thread(session.warm)
        serving = await start_serving(session, config, dtype, accounting=accounting)
        try:
            yield serving
        finally:
            await serving.close()
    finally:
        session.close()
