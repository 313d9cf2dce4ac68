"""Helpers for the serving tests: a tiny model split into a store, transformers' reference answers, and
``faasmoe-router serve`` as a real process on 127.0.0.1 port 0 (read its ready line for the URL)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM, AutoTokenizer

from faasmoe.proto.errors import FaasmoeError
from faasmoe.proto.ready import ROUTER_READY, ReadyLines
from faasmoe.router.engine.reference import reference_generate
from faasmoe.router.store.split import split_checkpoint
from model_factory import make_checkpoint
from polling import wait_for as poll

TINY = dict(num_layers=4, hidden_size=64, num_experts=16, top_k=4, moe_intermediate_size=32,
            shared_expert_intermediate_size=96, vocab_size=97, seed=3)     # one printable character per token


@dataclass
class TinyModel:
    model_dir: Path
    store: Path
    tokenizer: object
    reference: object            # transformers' own model

    def greedy(self, prompts, max_new_tokens: int):
        return reference_generate(self.reference, self.tokenizer, prompts, max_new_tokens)

    def text(self, token_ids) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


def tiny_model(root: Path, group_size: int = 4, **overrides) -> TinyModel:
    model_dir = make_checkpoint(root / "model", **{**TINY, **overrides})
    store = root / "store"
    split_checkpoint(model_dir, store, group_size=group_size, progress=False)
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return TinyModel(model_dir, store, AutoTokenizer.from_pretrained(str(store)), reference)


class RouterProcess:
    """``faasmoe-router serve`` on 127.0.0.1 port 0 over static nodes; stopped with SIGTERM on exit."""

    def __init__(self, store: Path, addresses, *extra: str, ready_timeout_s: float = 120.0):
        self.addresses = list(addresses)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FAASMOE_")}
        self.proc = subprocess.Popen([sys.executable, "-m", "faasmoe.router", "serve", "--store", str(store),
                                      "--nodes", ",".join(addresses), "--port", "0", *extra],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env | {"PYTHONUNBUFFERED": "1"})
        self.stderr: list[str] = []
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        try:
            info = ReadyLines(self.proc.stdout, self.proc).wait(ROUTER_READY, ready_timeout_s, "the router")
        except FaasmoeError as exc:
            self.stop()
            raise AssertionError(f"{exc}: {''.join(self.stderr)[-2000:]}") from None
        self.url, self.model = info["url"], info["model"]
        wait_for(lambda: httpx.get(f"{self.url}/health").status_code == 200, 60, "the router to be healthy")

    def _drain_stderr(self):
        for line in self.proc.stderr:
            self.stderr.append(line)

    def metrics(self) -> dict[tuple, float]:
        text = httpx.get(f"{self.url}/metrics").text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def engine_gauge(self, state: str) -> float:
        return self.metrics()[("faasmoe_router_engine_sequences", (("state", state),))]

    def counter(self, name: str) -> float:
        return self.metrics()[(name, ())]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> RouterProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_for(predicate, timeout_s: float, what: str):
    """:func:`polling.wait_for`, an HTTP error or a missing key counting as not yet."""
    return poll(predicate, timeout_s, what, ignore=(httpx.HTTPError, KeyError))