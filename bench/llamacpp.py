"""llama.cpp on the same Qwen2MoE checkpoint our project serves: time per output token, prompt time, peak RSS
and GGUF size per quantisation; optionally llama-server with N parallel slots and N concurrent clients.

    pip install --no-binary llama-cpp-python llama-cpp-python     # CMAKE_ARGS="-DGGML_NATIVE=ON", ~8 min
    python bench/llamacpp.py --checkpoint /work/scratch/qwen-dims-2L --work-dir /work/scratch/gguf
    python bench/llamacpp.py --checkpoint DIR --work-dir W --quant q4_0 --parallel 8  # + llama-server

The converter (``convert_hf_to_gguf.py``, ``gguf-py``) and the server sources come from the llama.cpp that the
installed llama-cpp-python sdist vendors: ``--llama-src``, else ``<work-dir>/llama_cpp_python-<version>``
(``pip download``-ed and unpacked there once). Q8_0 is written by the converter; Q4_0 by converting to BF16 and
``llama_model_quantize`` (the intermediate BF16 file is deleted), or with ``--requantize-from q8_0`` from the
Q8_0 file (no BF16 file; the same format and speed, weights rounded twice). GGUF files stay in the work dir and are reused.
A random checkpoint has no tokenizer: the converter gets a synthetic byte-level BPE one covering vocab_size (in
a temp dir beside symlinks of the checkpoint) and the "gpt-2" pre-tokenizer; prompts are token ids anyway.

Each quant is measured in its own process, weights loaded without mmap (so RSS counts them): one warm-up
generation, then a greedy one of --new-tokens from a fixed prompt of token ids, each llama_decode timed.
ms/token is the median decode step (token 2 on; token 1 comes from the prompt pass). Peak RSS is that
process's VmHWM. Results print as a table and go to bench/out/llamacpp-<name>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil

from report import print_flat, save

CONVERTER_TYPES = ("q8_0", "bf16", "f16")   # by the converter; others (q4_0, q4_k_m, ...) by llama_model_quantize


def prompt_ids(n: int) -> list[int]:
    return [(i * 7919) % 1000 + 10 for i in range(n)]     # bench/mesh_vs_transformers.py's fallback prompt


def _peak_rss_bytes(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- sources and conversion -------------------------------------------------------------------------------

def llama_src(args) -> Path:
    """The llama.cpp tree vendored by the installed llama-cpp-python's sdist (downloaded once if missing)."""
    if args.llama_src:
        return Path(args.llama_src)
    import llama_cpp
    root = Path(args.work_dir) / f"llama_cpp_python-{llama_cpp.__version__}"
    if not root.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={llama_cpp.__version__}",
                        "--no-binary", ":all:", "--no-deps", "-d", args.work_dir], check=True)
        with tarfile.open(Path(args.work_dir) / f"llama_cpp_python-{llama_cpp.__version__}.tar.gz") as tar:
            tar.extractall(args.work_dir, filter="data")
    return root / "vendor" / "llama.cpp"


def write_synthetic_tokenizer(directory: Path, vocab_size: int) -> None:
    """Byte-level BPE: <|endoftext|> (id 0), the 256 byte symbols, then merged pairs until vocab_size ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    eos = "<|endoftext|>"
    singles = list(bytes_to_unicode().values())
    vocab, merges, prev = {eos: 0, **{c: i + 1 for i, c in enumerate(singles)}}, [], singles
    while len(vocab) < vocab_size:
        grown = []
        for a in prev:
            for b in singles:
                if len(vocab) >= vocab_size:
                    break
                vocab[a + b] = len(vocab)
                merges.append((a, b))
                grown.append(a + b)
        prev = grown
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, bos_token=eos).save_pretrained(str(directory))


def run_converter(src: Path, argv: list[str]) -> None:
    """convert_hf_to_gguf.main() with the pre-tokenizer fixed to "gpt-2" (the synthetic tokenizer has no hash)."""
    sys.path[:0] = [str(src), str(src / "gguf-py")]
    sys.argv = ["convert_hf_to_gguf.py", *argv]
    import convert_hf_to_gguf
    from conversion.base import TextModel
    TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    convert_hf_to_gguf.main()


def convert(checkpoint: Path, outtype: str, out: Path, src: Path) -> None:
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        view = Path(tmp)
        for f in checkpoint.iterdir():
            (view / f.name).symlink_to(f.resolve())
        if not (checkpoint / "tokenizer.json").exists():
            write_synthetic_tokenizer(view, json.loads((checkpoint / "config.json").read_text())["vocab_size"])
        subprocess.run(["nice", "-n", "10", sys.executable, __file__, "--phase", "convert", "--llama-src", str(src),
                        "--", str(view), "--outtype", outtype, "--outfile", str(out), "--model-name", checkpoint.name],
                       check=True)


def quantize(inp: str, out: str, quant: str, threads: int) -> None:
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")   # Q4_0 keeps output.weight Q6_K
    params.nthread = threads
    params.allow_requantize = True             # --requantize-from: from an already quantized GGUF
    rc = llama_cpp.llama_model_quantize(inp.encode(), out.encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize -> {rc}")


def ensure_gguf(args, quant: str, src: Path) -> Path:
    work, ckpt = Path(args.work_dir), Path(args.checkpoint)
    out = work / f"{ckpt.name}-{quant}.gguf"
    if out.exists():
        return out
    tmp = out.with_suffix(".partial")
    if quant in CONVERTER_TYPES:
        convert(ckpt, quant, tmp, src)
    elif args.requantize_from:                  # no bf16 intermediate (28.6 GB at 24 layers): same format, speed
        source = ensure_gguf(args, args.requantize_from, src)
        subprocess.run(["nice", "-n", "10", sys.executable, __file__, "--phase", "quantize", str(source), str(tmp),
                        quant, str(args.threads)], check=True)
    else:
        bf16 = work / f"{ckpt.name}-bf16.gguf"
        made = not bf16.exists()
        try:
            if made:
                convert(ckpt, "bf16", bf16, src)
            subprocess.run(["nice", "-n", "10", sys.executable, __file__, "--phase", "quantize", str(bf16), str(tmp),
                            quant, str(args.threads)], check=True)
        finally:
            if made:
                bf16.unlink(missing_ok=True)    # disk: a 24-layer checkpoint is 28.6 GB in bf16
    tmp.rename(out)
    return out


# --- in-process measurement ---------------------------------------------------------------------------------

def phase_measure(args) -> dict:
    import llama_cpp
    import numpy as np
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(args.gguf, n_ctx=args.n_ctx, n_batch=args.n_ctx, n_threads=args.threads,
                          n_threads_batch=args.threads, use_mmap=False, flash_attn=False, verbose=False)
    load_s, rss_loaded = time.perf_counter() - t0, _peak_rss_bytes()
    n_vocab = llm.n_vocab()

    def generate(ids: list[int], n: int) -> tuple[list[int], float, list[float]]:
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids)
        llama_cpp.llama_synchronize(llm.ctx)
        prompt_s, out, steps = time.perf_counter() - t, [], []
        for i in range(n):
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
            out.append(int(logits.argmax()))                   # greedy: top-1
            if i + 1 < n:
                t = time.perf_counter()
                llm.eval([out[-1]])
                llama_cpp.llama_synchronize(llm.ctx)
                steps.append(time.perf_counter() - t)
        return out, prompt_s, steps

    ids = prompt_ids(args.prompt_tokens)
    warm, _, _ = generate(ids, min(8, args.new_tokens))
    tokens, prompt_s, steps = generate(ids, args.new_tokens)
    return dict(token_ids=tokens, deterministic=tokens[:len(warm)] == warm, prompt_s=prompt_s, decode_s=steps,
                load_s=load_s, rss_loaded_bytes=rss_loaded, peak_rss_bytes=_peak_rss_bytes())


# --- llama-server ---------------------------------------------------------------------------------------------

def build_server(src: Path, work: Path) -> Path:
    build = work / "llama-server-build"
    exe = build / "bin" / "llama-server"
    if not exe.exists():
        subprocess.run(["cmake", "-S", str(src), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                        "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF",
                        "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_BUILD_UI=OFF",
                        "-DLLAMA_OPENSSL=OFF"], check=True)
        subprocess.run(["nice", "-n", "10", "cmake", "--build", str(build), "--target", "llama-server",
                        "-j", str(os.cpu_count() or 2)], check=True)
    return exe


def run_server(exe: Path, gguf: Path, args, inprocess_tokens: list[int]) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    n, per_slot = args.parallel, args.prompt_tokens + args.new_tokens + 64
    cmd = [str(exe), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port), "--parallel", str(n),
           "-c", str(n * per_slot), "-t", str(args.threads), "-tb", str(args.threads), "--load-mode", "none",
           "--flash-attn", "off", "--cache-ram", "0", "--no-webui", "--fit", "off"]
    log = open(Path(args.work_dir) / "llama-server.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"llama-server did not come up, see {log.name}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.5)
        rss_loaded = _peak_rss_bytes(proc.pid)

        def one(i: int) -> dict:    # client 0 sends prompt_ids(); the others shifted ones (no shared cache)
            ids = [(t - 10 + 31 * i) % 1000 + 10 for t in prompt_ids(args.prompt_tokens)]
            body = dict(prompt=ids, n_predict=args.new_tokens, temperature=0, top_k=1, ignore_eos=True,
                        cache_prompt=False, return_tokens=True)
            t = time.perf_counter()
            with urllib.request.urlopen(urllib.request.Request(base + "/completion", json.dumps(body).encode(),
                                                               {"Content-Type": "application/json"}), timeout=600) as r:
                return dict(json.loads(r.read()), client_s=time.perf_counter() - t)
        alone = one(0)                                            # warm-up, and one request on its own
        t = time.perf_counter()
        with ThreadPoolExecutor(n) as pool:
            replies = list(pool.map(one, range(n)))
        wall = time.perf_counter() - t
        peak = _peak_rss_bytes(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    timings = [r["timings"] for r in replies]
    produced = sum(tm["predicted_n"] for tm in timings)
    return dict(server_parallel=n, server_wall_s=round(wall, 3), server_tokens=produced,
                server_tokens_per_s=round(produced / wall, 2),
                server_ms_per_token_per_request=round(statistics.median(t["predicted_per_token_ms"] for t in timings), 2),
                server_prompt_ms_median=round(statistics.median(tm["prompt_ms"] for tm in timings), 1),
                server_request_s_median=round(statistics.median(r["client_s"] for r in replies), 3),
                server_alone_ms_per_token=round(alone["timings"]["predicted_per_token_ms"], 2),
                server_tokens_alone_eq_batched=alone.get("tokens") == replies[0].get("tokens"),
                server_tokens_eq_inprocess=alone.get("tokens") == inprocess_tokens,
                server_first_tokens=replies[0].get("tokens", [])[:8],
                server_rss_loaded_mib=round(rss_loaded / 2**20, 1), server_peak_rss_mib=round(peak / 2**20, 1))


# --- driver ----------------------------------------------------------------------------------------------------

def measure(args, gguf: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--phase", "measure", "--gguf", str(gguf),
                          "--threads", str(args.threads), "--new-tokens", str(args.new_tokens),
                          "--prompt-tokens", str(args.prompt_tokens), "--n-ctx", str(args.n_ctx)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"error: measuring {gguf.name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    if sys.argv[1:3] == ["--phase", "convert"]:               # --phase convert --llama-src SRC -- CONVERTER ARGS
        run_converter(Path(sys.argv[4]), sys.argv[6:])
        return 0
    if sys.argv[1:3] == ["--phase", "quantize"]:              # --phase quantize IN OUT QUANT THREADS
        quantize(*sys.argv[3:6], int(sys.argv[6]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="Hugging Face Qwen2MoeForCausalLM directory (bf16 safetensors)")
    p.add_argument("--quant", default="q8_0,q4_0", help="comma-separated: q8_0, bf16, f16 (converter), q4_0, "
                                                         "q4_k_m, ... (llama_model_quantize)")
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "faasmoe-llamacpp"))
    p.add_argument("--llama-src", help="llama.cpp source tree (default: the installed sdist's vendored copy)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-ctx", type=int, default=512)
    p.add_argument("--parallel", type=int, default=0, help="also run llama-server with N slots and N clients "
                                                           "(on the last quant)")
    p.add_argument("--requantize-from", metavar="QUANT", help="make q4_0 etc. from this converter output (e.g. q8_0) "
                                                              "instead of a bf16 GGUF: saves the disk of a bf16 file")
    p.add_argument("--name")
    p.add_argument("--phase", choices=["measure"], help=argparse.SUPPRESS)
    p.add_argument("--gguf", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.phase:
        print(json.dumps(phase_measure(args)))
        return 0
    if not args.checkpoint:
        p.error("--checkpoint is required")
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    src = llama_src(args)
    import llama_cpp
    result = dict(name=args.name or Path(args.checkpoint).name, llama_cpp_python=llama_cpp.__version__,
                  threads=args.threads, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, mmap=False)
    for quant in args.quant.split(","):
        gguf = ensure_gguf(args, quant, src)
        busy = psutil.cpu_percent(interval=1.0)               # others on the machine skew llama.cpp's threads
        if busy > 20:
            print(f"warning: CPUs {busy:.0f}% busy before measuring {quant}: timings will suffer", file=sys.stderr)
        m = measure(args, gguf)
        result.update({
            f"{quant}_cpu_busy_pct_before": busy,
            f"{quant}_gguf_mib": round(gguf.stat().st_size / 2**20, 1),
            f"{quant}_ms_per_token": round(1000 * statistics.median(m["decode_s"]), 2),
            f"{quant}_ms_per_token_mean": round(1000 * statistics.mean(m["decode_s"]), 2),
            f"{quant}_prompt_ms": round(1000 * m["prompt_s"], 1),
            f"{quant}_load_s": round(m["load_s"], 2),
            f"{quant}_rss_loaded_mib": round(m["rss_loaded_bytes"] / 2**20, 1),
            f"{quant}_peak_rss_mib": round(m["peak_rss_bytes"] / 2**20, 1),
            f"{quant}_deterministic": m["deterministic"],
            f"{quant}_first_tokens": m["token_ids"][:8],
        })
    if args.parallel:
        result.update(run_server(build_server(src, Path(args.work_dir)), gguf, args, m["token_ids"]))
    save(f"llamacpp-{result['name']}", result)
    print_flat(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
