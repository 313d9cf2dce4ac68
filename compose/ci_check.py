"""compose/ci-up's checks against the running compose mesh (run on the host, with the dev install).

    python compose/ci_check.py completions --url URL --key KEY --model-dir DIR [--tag T]
    python compose/ci_check.py limits --project P

``completions``: one streamed and one plain completion with the official ``openai`` client, greedy; both must
equal transformers' own greedy generation on the same checkpoint (text and token count). ``limits``: every node
container's memory and CPU limits, as docker applied them (``docker inspect``), equal its edge profile's.
Exit 1 with the difference on failure.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from functools import lru_cache

PROMPTS = ("def fibonacci(n):", "import numpy as np\n")
MAX_TOKENS = 24


@lru_cache(maxsize=None)
def reference(model_dir: str, prompt: str) -> tuple[str, int | None]:
    """transformers' greedy continuation of ``prompt``: (text, generated token count; None when it stopped at
    end-of-sequence, where servers differ in counting that token)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    new = out[0, ids.shape[1]:].tolist()
    stopped = tokenizer.eos_token_id in new
    return tokenizer.decode(new, skip_special_tokens=True), None if stopped else len(new)


def completions(args) -> int:
    from openai import OpenAI
    client = OpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=args.key, max_retries=0, timeout=300)
    model = client.models.list().data[0].id
    failures = []
    for prompt in PROMPTS:
        want_text, want_n = reference(args.model_dir, prompt)
        t0 = time.monotonic()
        plain = client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
        t1 = time.monotonic()
        pieces, usage = [], None
        for chunk in client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                               stream=True, stream_options={"include_usage": True}):
            pieces.extend(choice.text for choice in chunk.choices)
            usage = chunk.usage or usage
        t2 = time.monotonic()
        got = {"plain": (plain.choices[0].text, plain.usage.completion_tokens),
               "stream": ("".join(pieces), usage.completion_tokens if usage else None)}
        for kind, value in got.items():
            if value[0] != want_text or (want_n is not None and value[1] != want_n):
                failures.append(f"{args.tag} {kind} {prompt!r}: router {value!r} != transformers {(want_text, want_n)!r}")
        print(f"ci-check {args.tag}: {prompt!r} -> {want_text!r} ({want_n} tokens): plain {t1 - t0:.2f} s, "
              f"stream {t2 - t1:.2f} s, {'identical' if not failures else 'DIFFERENT'}")
    for line in failures:
        print(f"error: {line}", file=sys.stderr)
    return 1 if failures else 0


def limits(args) -> int:
    from faasmoe.node.profiles import load_profile
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    ids = subprocess.run(["docker", "ps", "-q", "--filter", f"label=com.docker.compose.project={args.project}"],
                         capture_output=True, text=True, check=True).stdout.split()
    info = json.loads(subprocess.run(["docker", "inspect", *ids], capture_output=True, text=True, check=True).stdout)
    failures, checked = [], 0
    for container in info:
        argv = container["Args"]
        if container["Config"]["Image"] != "faasmoe-node:latest" or "--profile" not in argv:
            continue
        profile = load_profile(argv[argv.index("--profile") + 1])
        host = container["HostConfig"]
        want_mem = int(profile.container_mem_limit[:-1]) * units[profile.container_mem_limit[-1].lower()]
        got_cpus = (host["NanoCpus"] / 1e9) if host.get("NanoCpus") else host["CpuQuota"] / host["CpuPeriod"]
        name = container["Name"].lstrip("/")
        if host["Memory"] != want_mem or abs(got_cpus - profile.container_cpus) > 1e-9:
            failures.append(f"{name}: memory {host['Memory']} cpus {got_cpus} != profile {profile.name} "
                            f"{want_mem} / {profile.container_cpus}")
        print(f"ci-check limits: {name}: memory {host['Memory'] >> 20} MiB, {got_cpus:g} CPUs "
              f"(quota {host['CpuQuota']} per {host['CpuPeriod']} us) = profile {profile.name}")
        checked += 1
    if checked < 4:
        failures.append(f"only {checked} node containers running, expected 4")
    for line in failures:
        print(f"error: {line}", file=sys.stderr)
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    c = sub.add_parser("completions")
    c.add_argument("--url", required=True)
    c.add_argument("--key", required=True)
    c.add_argument("--model-dir", required=True)
    c.add_argument("--tag", default="mesh")
    lim = sub.add_parser("limits")
    lim.add_argument("--project", required=True)
    args = parser.parse_args()
    return completions(args) if args.what == "completions" else limits(args)


if __name__ == "__main__":
    sys.exit(main())
