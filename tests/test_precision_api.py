"""An int8 store with a bfloat16 dense part, served for real: three node processes, ``faasmoe-router serve`` with
``--dense-dtype bfloat16``, the official ``openai`` client. Every response, the model list, the response headers,
``generate --json`` and ``faasmoe-router status`` name the precision that served it, and say it is not exact."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import openai
import pytest

from faasmoe.router.control.local_mesh import LocalMesh
from faasmoe.router.model.precision import HEADER
from faasmoe.router.store.quantize import parse_precision
from faasmoe.router.store.split import split_checkpoint
from serving_fixtures import RouterProcess, tiny_model

LABEL = {"experts": "int8", "block_size": 32, "dense": "bfloat16", "exact": False}
PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    tiny = tiny_model(root)
    store = root / "store-int8"
    split_checkpoint(tiny.model_dir, store, group_size=4, progress=False, precision=parse_precision("int8", 32))
    with LocalMesh(3, root / "nodes", memory_budget_mb=256) as mesh:
        with RouterProcess(store, mesh.addresses, "--dense-dtype", "bfloat16", "--replicas", "1") as router:
            yield tiny, store, mesh, router


def test_every_response_names_the_precision(served):
    tiny, store, mesh, router = served
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0)
    assert client.models.list().data[0].model_extra["faasmoe_precision"] == LABEL
    raw = client.completions.with_raw_response.create(model=router.model, prompt=PROMPT, max_tokens=12, temperature=0)
    assert raw.headers[HEADER] == "experts=int8-b32; dense=bfloat16"
    out = raw.parse()
    assert out.model_extra["faasmoe_precision"] == LABEL and out.usage.completion_tokens >= 1
    chat = client.chat.completions.create(model=router.model, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, temperature=0)
    assert chat.model_extra["faasmoe_precision"] == LABEL
    with httpx.stream("POST", f"{router.url}/v1/completions", json={"model": router.model, "prompt": PROMPT,
                                                                    "max_tokens": 6, "stream": True}) as stream:
        assert stream.headers[HEADER] == "experts=int8-b32; dense=bfloat16"
        events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and all(json.loads(e)["faasmoe_precision"] == LABEL for e in events[:-1])


def test_generate_and_status_name_the_precision(served):
    tiny, store, mesh, router = served

    def generate(dense, router_id):                       # both at once: every function is already placed
        return subprocess.Popen([sys.executable, "-m", "faasmoe.router", "generate", "--store", str(store),
                                 "--nodes", ",".join(mesh.addresses), "--prompt", PROMPT, "--max-new-tokens", "6",
                                 "--json", "--dense-dtype", dense, "--replicas", "1", "--router-id", router_id],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = [generate("bfloat16", "cli-run"), generate("int8", "cli-run-int8")]
    try:
        (cli_out, cli_err), (int8_out, int8_err) = [p.communicate(timeout=240) for p in runs]
    finally:
        for p in runs:
            p.kill()
            p.wait()
    assert runs[0].returncode == 0, cli_err
    assert json.loads(cli_out)["faasmoe_precision"] == LABEL
    assert runs[1].returncode == 0, int8_err
    assert json.loads(int8_out)["faasmoe_precision"] == LABEL | {"dense": "int8"}
    assert len(json.loads(int8_out)["token_ids"]) == 6
    status = subprocess.run([sys.executable, "-m", "faasmoe.router", "status", "--nodes", ",".join(mesh.addresses),
                             "--store", str(store), "--json"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    functions = [f for n in report["nodes"] for f in n["functions"]]
    assert functions and {f["precision"] for f in functions} == {"int8-b32"}
    assert all(f["footprint_bytes"] > f["size_bytes"] and f["copies"] == 1 for f in functions)
    assert report["replicas"] == {"functions": len(functions), "copies": len(functions), "with_replicas": 0}
    text = subprocess.run([sys.executable, "-m", "faasmoe.router", "status", "--nodes", ",".join(mesh.addresses)],
                          capture_output=True, text=True, timeout=60).stdout
    assert "int8-b32" in text and "with a second copy" in text
