"""Fidelity of each expert precision and dense dtype against float32, on the shared trained model.

    python bench/fidelity.py --model ../shared/models/qwen2moe-tiny-code

Every configuration runs the store's own expert functions (the ONNX files ``faasmoe split --experts P`` wrote,
through ONNX Runtime exactly as a node runs them) inside transformers' model of the checkpoint, whose dense part
is float32, the router's bfloat16 (weights of the attention and shared-expert projections and the embedding
table in bfloat16, activations and ``lm_head`` float32: router/model/bf16.py) or the router's int8 (those
projections and ``lm_head`` through MatMulNBits int8: router/model/int8.py); rows and outputs cross as float32,
as on the mesh. The reference is fp32 experts with a
float32 dense part, which is token-identical to transformers (checked here too: its row must read 100 % / 0).

- Teacher-forced, on held-out Python source (windows of CPython's standard library, which this interpreter
  ships): top-1 agreement of the next-token prediction with the reference, mean KL(reference || config) of the
  next-token distributions, and perplexity on the text itself.
- Greedy: ``--prompts`` prompts (the first ``--prompt-tokens`` tokens of other held-out windows), ``--new-tokens``
  tokens each: how many continuations are identical to the reference's, and the mean position of the first
  difference among those that differ.

Prints a table; writes bench/out/<name>.json.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from report import save

REPO = Path(__file__).resolve().parents[1]
DEFAULT_EXPERTS = "fp32,int8-b128,int8-b32,int4-b128,int4-b32"


class OnnxExperts(torch.nn.Module):
    """A layer's routed experts run by the store's ONNX functions (``Qwen2MoeExperts``' interface and order)."""

    def __init__(self, sessions):
        super().__init__()
        self.sessions = sessions              # [(session, expert_ids)]

    def forward(self, hidden_states, top_k_index, top_k_weights):
        from faasmoe.proto import function_abi as abi
        from faasmoe.router.mesh.dispatch import ExpertResult
        from faasmoe.router.model.experts import combine

        x = hidden_states.float().contiguous().numpy()
        index = top_k_index.numpy()
        results = {}
        for session, experts in self.sessions:
            feeds, picked = {abi.HIDDEN_INPUT: x}, []
            for j, expert in enumerate(experts):
                slots, tokens = np.nonzero(index.T == expert)          # (slot, token) order
                feeds[abi.rows_input(j)] = tokens.astype(np.int64)
                picked.append((expert, tokens, slots))
            if not any(len(t) for _, t, _ in picked):
                continue
            out, start = session.run([abi.OUTPUT], feeds)[0], 0
            for expert, tokens, slots in picked:
                if len(tokens):
                    results[expert] = [ExpertResult(tokens, slots, out[start:start + len(tokens)])]
                start += len(tokens)
        final = combine(results, top_k_weights.float().numpy(), x.shape)
        return torch.from_numpy(final).to(hidden_states.dtype)


def load_model(model_dir: Path, store: Path, dtype: torch.dtype, threads: int):
    import onnxruntime as ort
    from transformers import AutoModelForCausalLM

    from faasmoe.router.model.bf16 import store_in_bfloat16
    from faasmoe.router.model.int8 import store_in_int8
    from faasmoe.router.store.manifest import load_manifest
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa").eval()
    if dtype == torch.bfloat16:
        store_in_bfloat16(model)                      # the router's bfloat16 dense part (router/model/bf16.py)
    elif dtype == torch.int8:
        store_in_int8(model)                          # the router's int8 dense part (router/model/int8.py)
    manifest = load_manifest(store)
    from faasmoe.proto.ort_session import session_options
    opts = session_options(threads)
    for layer in manifest.moe_layers:
        sessions = [(ort.InferenceSession(str(store / f.file), opts, providers=["CPUExecutionProvider"]), f.expert_ids)
                    for f in manifest.layer_functions(layer)]
        model.model.layers[layer].mlp.experts = OnnxExperts(sessions)
    return model


def held_out(tokenizer, n: int, tokens: int, seed: int) -> list[list[int]]:
    """``n`` windows of ``tokens`` tokens from distinct files of the standard library (seeded choice)."""
    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).glob("*.py") if p.stat().st_size > 20_000)
    rng, windows = random.Random(seed), []
    for path in rng.sample(files, len(files)):
        ids = tokenizer(path.read_text(errors="replace"))["input_ids"]
        if len(ids) >= 2 * tokens:
            start = rng.randrange(len(ids) - tokens)
            windows.append(ids[start:start + tokens])
        if len(windows) == n:
            return windows
    raise SystemExit(f"error: only {len(windows)} stdlib files long enough for {n} windows of {tokens} tokens")


def teacher_forced(model, windows) -> list[torch.Tensor]:
    """Log-probabilities [T - 1, vocab] (float32) of every next token, per window."""
    out = []
    with torch.inference_mode():
        for ids in windows:
            logits = model(torch.tensor([ids])).logits[0, :-1].float()
            out.append(torch.log_softmax(logits, dim=-1))
    return out


def greedy(model, prompts, new_tokens: int) -> list[list[int]]:
    out = []
    with torch.inference_mode():
        for ids in prompts:
            gen = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=0)
            out.append(gen[0, len(ids):].tolist())
    return out


def compare(ref_lp, lp, windows, ref_greedy, got_greedy) -> dict:
    agree = kl = nll = ref_nll = 0.0
    positions = 0
    for r, c, ids in zip(ref_lp, lp, windows):
        target = torch.tensor(ids[1:])
        agree += (r.argmax(-1) == c.argmax(-1)).sum().item()
        kl += (r.exp() * (r - c)).sum(-1).sum().item()
        nll -= c.gather(1, target[:, None]).sum().item()
        ref_nll -= r.gather(1, target[:, None]).sum().item()
        positions += len(target)
    firsts = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), None) for x, y in zip(ref_greedy, got_greedy)]
    differing = [f for f in firsts if f is not None]
    return {"top1_agreement": agree / positions, "mean_kl": kl / positions, "perplexity": math.exp(nll / positions),
            "perplexity_increase": math.exp(nll / positions) / math.exp(ref_nll / positions) - 1,
            "greedy_identical": len(firsts) - len(differing), "greedy_total": len(firsts),
            "mean_first_difference": sum(differing) / len(differing) if differing else None, "positions": positions}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(REPO.parent / "shared" / "models" / "qwen2moe-tiny-code"))
    p.add_argument("--experts", default=DEFAULT_EXPERTS, help=f"comma-separated (default {DEFAULT_EXPERTS})")
    p.add_argument("--dense", default="float32,bfloat16,int8", help="dense dtypes (default float32,bfloat16,int8)")
    p.add_argument("--accuracy-levels", default="4",
                   help="MatMulNBits accuracy levels to measure for quantized experts (default 4, what the split "
                        "writes; 1 = float32 activations, written here for the measurement only: nodes refuse it)")
    p.add_argument("--windows", type=int, default=32, help="held-out windows, teacher-forced (default 32)")
    p.add_argument("--window-tokens", type=int, default=256)
    p.add_argument("--prompts", type=int, default=32, help="greedy prompts (default 32)")
    p.add_argument("--prompt-tokens", type=int, default=48)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime and torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "faasmoe-bench"))
    p.add_argument("--name", default="fidelity")
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    from transformers import AutoTokenizer

    from faasmoe.proto import function_abi as abi
    from faasmoe.router.store.quantize import parse_precision
    from faasmoe.router.store.split import ensure_split

    torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    texts = held_out(tokenizer, args.windows + args.prompts, args.window_tokens, args.seed)
    windows, prompts = texts[:args.windows], [t[:args.prompt_tokens] for t in texts[args.windows:]]
    configs = []
    for label in args.experts.split(","):
        name, _, block = label.partition("-b")
        precision = parse_precision(name, int(block) if block else None)
        for level in ([int(a) for a in args.accuracy_levels.split(",")] if precision.quantized else [0]):
            tag = precision.label + (f"-acc{level}" if level not in (0, abi.ACCURACY_LEVEL) else "")
            written, abi.ACCURACY_LEVEL = abi.ACCURACY_LEVEL, level or abi.ACCURACY_LEVEL
            try:
                store = ensure_split(model_dir, Path(args.work_dir) / f"fidelity-{model_dir.name}-{tag}-G60", 60,
                                     precision)
            finally:
                abi.ACCURACY_LEVEL = written
            configs += [(tag, dense, store) for dense in args.dense.split(",")]
    if ("fp32", "float32") not in [(e, d) for e, d, _ in configs]:        # the reference is always measured
        configs.append(("fp32", "float32", ensure_split(model_dir, Path(args.work_dir) /
                                                        f"fidelity-{model_dir.name}-fp32-G60", 60, parse_precision("fp32"))))
    rows, ref = [], None
    for experts, dense, store in sorted(configs, key=lambda c: (c[0] != "fp32" or c[1] != "float32")):
        t0 = time.perf_counter()
        model = load_model(model_dir, store, getattr(torch, dense), args.threads)
        lp, gen = teacher_forced(model, windows), greedy(model, prompts, args.new_tokens)
        if ref is None:
            ref = (lp, gen)
        row = {"experts": experts, "dense": dense, **compare(ref[0], lp, windows, ref[1], gen),
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(f"{experts:<15} {dense:<9} top-1 {100 * row['top1_agreement']:6.2f} %  KL {row['mean_kl']:.5f}  "
              f"ppl {row['perplexity']:.4f} ({100 * row['perplexity_increase']:+.2f} %)  greedy identical "
              f"{row['greedy_identical']}/{row['greedy_total']}  first diff "
              f"{'-' if row['mean_first_difference'] is None else round(row['mean_first_difference'], 1)}",
              flush=True)
        del model
    result = {"model": str(model_dir), "windows": args.windows, "window_tokens": args.window_tokens,
              "prompts": args.prompts, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
              "seed": args.seed, "rows": rows}
    print(f"wrote {save(args.name, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
