"""``faasmoe-router serve-full``: the same HTTP API and engine over a whole transformers model in this one
process (its routed experts run by transformers' own experts module): the full-model baselines of the
resource benchmarks, measured with exactly the serving stack the mesh uses."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import torch

from faasmoe.proto.errors import CheckpointError, StepFailed
from faasmoe.router.api.app import create_app
from faasmoe.router.api.front import HttpFront, ServeOptions
from faasmoe.router.api.openai import ApiContext
from faasmoe.router.engine.engine import Engine, EngineConfig
from faasmoe.router.engine.serving import eos_ids_of, load_tokenizer
from faasmoe.router.model.experts import LocalExperts
from faasmoe.router.model.precision import ServedPrecision
from faasmoe.router.model.runner import ModelRunner
from faasmoe.router.observe.metrics import RouterMetrics
from faasmoe.router.tenancy.ledger import LedgerCollector

log = logging.getLogger(__name__)


def load_full_model(model_dir: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM
    from faasmoe.router.store.checkpoint import read_config
    read_config(model_dir)               # a supported family, or an error naming the supported ones
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{model_dir}: cannot load the model ({exc})") from None
    return model.eval()


class FullModelServer:
    def __init__(self, model_dir: str | Path, config: EngineConfig, options: ServeOptions,
                 dtype: torch.dtype = torch.float32, announce=print):
        self.model_dir, self.config, self.options, self.dtype = Path(model_dir), config, options, dtype
        self.front = HttpFront(options, announce)
        self.engine: Engine | None = None

    def stop(self) -> None:
        self.front.stop()

    async def run(self) -> None:
        front = self.front
        metrics = RouterMetrics(lambda: None, engine=lambda: self.engine)
        metrics.registry.register(LedgerCollector(front.ledger))
        front.start_tenants()
        try:
            model = await asyncio.to_thread(load_full_model, self.model_dir, self.dtype)
            tokenizer = await asyncio.to_thread(load_tokenizer, self.model_dir)
            self.engine = Engine(ModelRunner(model, LocalExperts(model)), tokenizer, config=self.config,
                                 eos_ids=eos_ids_of(self.model_dir, model.config, tokenizer), accounting=front.accounting)
            self.engine.tenant_of = front.registry.tenant
            metrics.watch(_NoMesh(), self.engine)
            await self.engine.start()
            name = self.options.model_name or self.model_dir.name
            api = ApiContext(self._engine, name, tokenizer, int(time.time()), front.registry, front.ledger,
                             ServedPrecision.of_full_model(self.dtype))
            app = create_app(api, self._health, metrics.registry)
            await front.serve(app, name, {"full_model": True}, f"the whole model in one process, {self.dtype}")
        finally:
            await front.close()
            if self.engine is not None:
                await self.engine.stop()

    def _engine(self) -> Engine:
        if self.engine is None:
            raise StepFailed("the server is starting: loading the model; retry shortly")
        return self.engine

    def _health(self) -> tuple[bool, str]:
        if self.engine is None:
            return False, "starting: loading the model"
        return (True, "model loaded") if self.engine.alive else (False, "the engine has stopped")


class _NoMesh:
    on_layer_done = None
