"""Prompts in, texts out, through a running engine (the CLI's ``generate``, the demo, tests, benchmarks).

Every prompt is its own request; they run concurrently and decode together in the engine's batched steps.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Sequence

from faasmoe.proto.errors import ConfigError
from faasmoe.router.engine.engine import Engine
from faasmoe.router.engine.sampling import SamplingParams
from faasmoe.router.engine.sequence import FinishEvent, Request


@dataclass
class Generation:
    prompt_token_ids: list[int]
    token_ids: list[int]          # generated ids only
    text: str
    finish_reason: str = ""
    step_s: list[float] = field(default_factory=list)   # first entry: time to first token; then per token
    dropped: dict = field(default_factory=dict)         # degraded mode: (layer, expert) -> token calls dropped


async def generate_one(engine: Engine, prompt_ids: Sequence[int], max_new_tokens: int,
                       params: SamplingParams = SamplingParams(), stop: Sequence[str] = ()) -> Generation:
    seq = engine.submit(Request(tuple(prompt_ids), max_new_tokens, params, tuple(stop)))
    marks, text = [seq.arrival_s], []
    async for event in engine.events(seq):
        if isinstance(event, FinishEvent):
            if event.error is not None:
                raise event.error
            text.append(event.text)
            return Generation(list(prompt_ids), list(seq.output_ids), "".join(text), event.reason,
                              [b - a for a, b in zip(marks, marks[1:])], event.dropped)
        marks.append(time.perf_counter())
        text.append(event.text)


async def generate(engine: Engine, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None) -> list[Generation]:
    """Greedy when ``temperature`` is 0. With a seed, prompt i samples with seed + i."""
    if tokenizer is None:
        raise ConfigError("this store has no tokenizer, so text prompts cannot be encoded; use the HTTP API with "
                          "token ids")
    jobs = []
    for i, prompt in enumerate(prompts):
        params = SamplingParams(temperature, top_p, None if seed is None else seed + i)
        jobs.append(generate_one(engine, tokenizer(prompt)["input_ids"], max_new_tokens, params))
    return list(await asyncio.gather(*jobs))
