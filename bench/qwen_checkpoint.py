"""Write a Qwen1.5-MoE-A2.7B-dimension checkpoint with random weights, tensor by tensor (never whole in memory).

    python bench/qwen_checkpoint.py --out /work/scratch/qwen-24L --layers 24            # 14.3 B parameters, 26.7 GiB
    python bench/qwen_checkpoint.py --out DIR --layers 4 --popularity-from ../shared/models/qwen2moe-tiny-code

See :mod:`faasmoe.router.evaluation.qwen_weights` for the weights and the gates that route like a trained model;
``--check-routing`` loads the written model (bfloat16; small layer counts) and records how its gates route.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def check_routing(out: Path, tokens: int = 2048, seed: int = 0) -> np.ndarray:
    """[layers, experts]: how often the written model's gates pick each expert, on random token ids (bf16)."""
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16).eval()
    counts = np.zeros((model.config.num_hidden_layers, model.config.num_experts))
    for i, layer in enumerate(model.model.layers):
        layer.mlp.gate.register_forward_hook(
            lambda m, a, output, i=i: np.add.at(counts[i], output[2].reshape(-1).numpy(), 1))
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        for lo in range(0, tokens, 256):
            model(ids[:, lo:lo + 256])
    return counts / counts.sum(axis=1, keepdims=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--shard-gb", type=float, default=2.0)
    p.add_argument("--popularity-from", type=Path, default=None, help="a trained Qwen2-MoE model to route like")
    p.add_argument("--check-routing", action="store_true",
                   help="load the written model (bf16; small layer counts) and record how its gates route")
    args = p.parse_args()
    if args.out.exists() and any(args.out.iterdir()):
        print(f"error: {args.out} exists and is not empty", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    from faasmoe.router.evaluation.qwen_weights import experts_for, write_checkpoint
    t0 = time.perf_counter()
    written = write_checkpoint(args.out, args.layers, args.seed, args.popularity_from, int(args.shard_gb * 2**30))
    total, routing = written["parameters"], written["routing"]
    if args.check_routing:
        measured = check_routing(args.out)
        routing = (routing or {}) | {"measured": measured.round(5).tolist(),
                                     "measured_experts_for_80_percent": [experts_for(m, 0.8) for m in measured]}
        (args.out / "routing.json").write_text(json.dumps(routing))
        print(f"routing: experts for 80 % of picks per layer {routing['measured_experts_for_80_percent']}"
              + (f" (trained model: {routing['experts_for_80_percent']})" if args.popularity_from else ""))
    print(f"wrote {args.out}: {args.layers} layers, {total / 1e9:.2f} B parameters, "
          f"{2 * total / 2**30:.1f} GiB bf16, {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
