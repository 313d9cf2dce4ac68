"""Text generation through the mesh with transformers' own ``generate()``, timed per step."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers.generation.streamers import BaseStreamer

from faasmoe.router.mesh.dispatch import current_request_id


class StepClock(BaseStreamer):
    """Records when generate() emits the prompt and each new token (per-step timings)."""

    def __init__(self):
        self.marks_s: list[float] = []

    def put(self, value):
        self.marks_s.append(time.perf_counter())

    def end(self):
        pass

    def step_times_s(self) -> list[float]:
        return [b - a for a, b in zip(self.marks_s, self.marks_s[1:])]


@dataclass
class Generation:
    prompt_token_ids: list[int]
    token_ids: list[int]          # generated ids only
    text: str
    step_s: list[float] = field(default_factory=list)   # first entry is the prefill (time to first token)


def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, request_id: str | None = None) -> list[Generation]:
    """Greedy when ``temperature`` is 0. Prompts of unequal length are left-padded into one batch; every
    expert call of this generation carries ``request_id`` (a fresh one by default)."""
    if seed is not None:
        torch.manual_seed(seed)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    clock = StepClock() if len(prompts) == 1 else None
    token = current_request_id.set(request_id or uuid.uuid4().hex)
    try:
        with torch.inference_mode():
            out = model.generate(**enc, **kwargs, streamer=clock)
    finally:
        current_request_id.reset(token)
    width = enc["input_ids"].shape[1]
    results = []
    for row, mask, ids in zip(enc["input_ids"], enc["attention_mask"], out):
        prompt_ids = row[mask.bool()].tolist()
        new_ids = ids[width:].tolist()
        if tokenizer.pad_token_id is not None and tokenizer.pad_token_id == tokenizer.eos_token_id:
            if tokenizer.eos_token_id in new_ids:        # generate() pads finished rows with eos
                new_ids = new_ids[:new_ids.index(tokenizer.eos_token_id) + 1]
        results.append(Generation(prompt_ids, new_ids, tokenizer.decode(new_ids, skip_special_tokens=True),
                                  clock.step_times_s() if clock else []))
    return results
