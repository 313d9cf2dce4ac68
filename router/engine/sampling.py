"""Per-sequence sampling: greedy (temperature 0: ``argmax``, as transformers' greedy search), or temperature +
nucleus (top-p) sampling from the sequence's own seeded generator, so a request with a seed gets the same
tokens whatever else runs beside it. Log-probabilities are of the model's distribution (before temperature
and top-p), as OpenAI reports them."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch


MIN_TEMPERATURE = 1e-5       # below this, dividing the logits overflows: it is greedy decoding


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0        # 0 (or < 1e-5) = greedy
    top_p: float = 1.0              # (0, 1]
    seed: int | None = None         # same seed, same prompt, same parameters: same tokens
    logprobs: int | None = None     # report the chosen token's log-probability and this many alternatives

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def generator(self) -> torch.Generator | None:
        if self.greedy:
            return None
        return torch.Generator().manual_seed(self.seed if self.seed is not None else secrets.randbits(63))


@dataclass(frozen=True)
class Choice:
    token_id: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()     # (token id, log-probability), best first


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> Choice:
    """Pick the next token from one row of float32 logits ``[vocab]``."""
    if params.greedy:
        token = int(torch.argmax(logits))
    else:
        probs = torch.softmax(logits / params.temperature, dim=-1)
        if params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs     # mass of the better tokens
            sorted_probs[before >= params.top_p] = 0.0                     # keep the smallest set reaching top_p
            token = int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
        else:
            token = int(torch.multinomial(probs, 1, generator=generator))
    if params.logprobs is None:
        return Choice(token)
    logp = torch.log_softmax(logits, dim=-1)
    top = ()
    if params.logprobs > 0:
        values, ids = torch.topk(logp, min(params.logprobs, logp.shape[-1]))
        top = tuple(zip(ids.tolist(), values.tolist()))
    return Choice(token, float(logp[token]), top)
