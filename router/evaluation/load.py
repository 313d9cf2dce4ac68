"""Replaying a workload open-loop against a deployment: every request is sent at its time, whatever the ones
before it are doing (as real tenants do), streamed, greedy, and timed on the client."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx

from faasmoe.router.evaluation.workload import WorkItem


@dataclass
class Outcome:
    request_id: str
    tenant: str
    sent_s: float                      # since the run started
    ttft_s: float | None = None
    tpot_s: float | None = None
    tokens: int = 0
    output: str = ""                   # the text, or the token ids for a model without a tokenizer
    error: str | None = None


async def _one(http: httpx.AsyncClient, url: str, key: str | None, item: WorkItem, t0: float) -> Outcome:
    await asyncio.sleep(max(0.0, item.at_s - (time.monotonic() - t0)))
    sent = time.monotonic()
    out = Outcome(item.request_id, item.tenant, sent - t0)
    body = {"model": "bench", "prompt": list(item.prompt_ids), "max_tokens": item.max_tokens, "temperature": 0,
            "stream": True, "logprobs": 0, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    marks, text, ids = [], [], []
    try:
        async with http.stream("POST", f"{url}/v1/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                out.error = f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
                return out
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out.error = chunk["error"]["message"]
                    return out
                if chunk.get("usage"):
                    out.tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices", []):
                    if choice.get("logprobs") and choice["logprobs"]["tokens"]:
                        marks.append(time.monotonic())
                        ids += choice["logprobs"]["tokens"]
                    text.append(choice.get("text") or "")
    except httpx.HTTPError as exc:
        out.error = f"{type(exc).__name__}: {exc}"
        return out
    if marks:
        out.ttft_s = marks[0] - sent
        out.tpot_s = (marks[-1] - marks[0]) / (len(marks) - 1) if len(marks) > 1 else 0.0
    out.output = "".join(text) if not all(t.startswith("token_id:") for t in ids) else " ".join(ids)
    return out


async def replay(items: list[WorkItem], urls: dict[str, str], keys: dict[str, str | None]) -> list[Outcome]:
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as http:
        t0 = time.monotonic()
        return list(await asyncio.gather(*(_one(http, urls[i.tenant], keys.get(i.tenant), i, t0) for i in items)))
