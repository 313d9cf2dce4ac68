"""The OpenAI-compatible API through the real server (``faasmoe-router serve``, a process) over three real
node processes, driven by the official ``openai`` client: greedy text equals transformers' and the CLI's,
streaming or not, for completions and chat; stop strings and max_tokens cut exactly; usage, logprobs,
seeds; every error comes with its status; a client that goes away frees its sequence."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import openai
import pytest

from faasmoe.router.api.chat import plain_template
from faasmoe.router.control.local_mesh import LocalMesh
from serving_fixtures import RouterProcess, tiny_model, wait_for

PROMPT = "def fibonacci(n):"
N = 24


@pytest.fixture(scope="module")
def mesh_and_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    tiny = tiny_model(root)
    with LocalMesh(3, root / "nodes", memory_budget_mb=256) as mesh:
        yield mesh, tiny


@pytest.fixture(scope="module")
def server(mesh_and_model):
    mesh, tiny = mesh_and_model
    with RouterProcess(tiny.store, mesh.addresses, "--prefill-chunk", "8", "--max-batch", "16") as router:
        yield router


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


FP32_LABEL = {"experts": "fp32", "block_size": 0, "dense": "float32", "exact": True}


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [server.model] == ["store"]
    assert client.models.list().data[0].model_extra["faasmoe_precision"] == FP32_LABEL
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    metrics = httpx.get(f"{server.url}/metrics")
    assert metrics.status_code == 200 and "faasmoe_router_engine_sequences" in metrics.text


def test_greedy_text_equals_transformers_and_the_cli(mesh_and_model, server, client):
    mesh, tiny = mesh_and_model
    (ref,) = tiny.greedy([PROMPT], N)
    expected = tiny.text(ref.token_ids)
    out = client.completions.create(model="store", prompt=PROMPT, max_tokens=N, temperature=0)
    assert out.choices[0].text == expected
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids) and out.usage.completion_tokens == len(ref.token_ids)
    assert out.choices[0].finish_reason == ("stop" if ref.token_ids[-1] == 0 else "length")
    assert out.model_extra["faasmoe_precision"] == FP32_LABEL
    chunks = list(client.completions.create(model="store", prompt=PROMPT, max_tokens=N, temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert all(c.model_extra["faasmoe_precision"] == FP32_LABEL for c in chunks)
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason
    cli = subprocess.run([sys.executable, "-m", "faasmoe.router", "generate", "--store", str(tiny.store),
                          "--nodes", ",".join(mesh.addresses), "--prompt", PROMPT, "--max-new-tokens", str(N),
                          "--json"], capture_output=True, text=True, timeout=240)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout)["text"] == expected and json.loads(cli.stdout)["faasmoe_precision"] == FP32_LABEL


def test_chat_uses_the_plain_template_and_equals_transformers(mesh_and_model, client):
    _, tiny = mesh_and_model
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]
    ids = tiny.tokenizer(plain_template([(m["role"], m["content"]) for m in messages]))["input_ids"]
    (ref,) = tiny.greedy([ids], 16)
    out = client.chat.completions.create(model="store", messages=messages, max_tokens=16, temperature=0)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == tiny.text(ref.token_ids)
    assert out.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model="store", messages=messages, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == tiny.text(ref.token_ids)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(ref.token_ids)
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_stop_strings_spanning_tokens_cut_exactly_and_never_leak(mesh_and_model, client, stream):
    _, tiny = mesh_and_model
    (ref,) = tiny.greedy([PROMPT], 40)
    text = tiny.text(ref.token_ids)
    stop = text[9:12]                                   # three characters: three tokens
    assert len(stop) == 3 and stop not in text[:9]
    expected = text[:text.index(stop)]
    for stops in (stop, ["never-there", stop]):
        out = client.completions.create(model="store", prompt=PROMPT, max_tokens=40, temperature=0, stop=stops,
                                        stream=stream)
        if stream:
            pieces = [c.choices[0].text for c in out]
            assert all(stop not in p for p in pieces)
            got, finish = "".join(pieces), "stop"
        else:
            got, finish = out.choices[0].text, out.choices[0].finish_reason
            assert out.usage.completion_tokens == 12       # generated up to the token that completed the stop
        assert got == expected and finish == "stop"


def test_max_tokens_cuts_exactly_and_usage_is_reported(mesh_and_model, client):
    _, tiny = mesh_and_model
    (ref,) = tiny.greedy(["x = "], 5)
    assert 0 not in ref.token_ids                       # no end of sequence inside: the cut is max_tokens'
    out = client.completions.create(model="store", prompt="x = ", max_tokens=5, temperature=0)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 5
    assert out.choices[0].text == tiny.text(ref.token_ids)
    assert out.usage.total_tokens == out.usage.prompt_tokens + 5
    chunks = list(client.completions.create(model="store", prompt="x = ", max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].choices == []


def test_logprobs_on_completions(mesh_and_model, client):
    out = client.completions.create(model="store", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 3 and chosen <= 0
        assert chosen == pytest.approx(max(top.values()))          # greedy picks the most likely token
    assert "".join(lp.tokens) == out.choices[0].text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(6)]


def test_seeded_sampling_is_reproducible_under_load(client):
    def sample(seed):
        return client.completions.create(model="store", prompt=PROMPT, max_tokens=12, temperature=0.9, top_p=0.9,
                                         seed=seed).choices[0].text

    first = sample(7)

    async def with_neighbours():
        aclient = openai.AsyncOpenAI(base_url=client.base_url, api_key="unused", max_retries=0)
        others = [aclient.completions.create(model="store", prompt="noise " * k, max_tokens=20, temperature=1.0)
                  for k in range(1, 6)]
        mine = aclient.completions.create(model="store", prompt=PROMPT, max_tokens=12, temperature=0.9, top_p=0.9,
                                          seed=7)
        results = await asyncio.gather(mine, *others)
        return results[0].choices[0].text

    assert asyncio.run(with_neighbours()) == first
    assert sample(7) == first
    assert any(sample(seed) != first for seed in (8, 9, 10))


@pytest.mark.parametrize("body, status, param", [
    ({"model": "store", "max_tokens": 4}, 400, "prompt"),
    ({"model": "store", "prompt": "x", "max_tokens": "four"}, 400, "max_tokens"),
    ({"model": "store", "prompt": "x", "n": 2}, 400, "n"),
    ({"model": "store", "prompt": "x", "temperature": 3}, 400, "temperature"),
    ({"model": "store", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"model": "store", "prompt": "x", "max_tokens": 1000}, 400, "max_tokens"),
    ({"model": "store", "prompt": "x", "logprobs": 9}, 400, "logprobs"),
    ({"model": "nope", "prompt": "x"}, 404, "model"),
    ({"model": "store", "messages": []}, 400, "messages"),
    ({"model": "store", "prompt": "x", "seed": 2 ** 64}, 400, "seed"),
    ({"model": "store", "messages": [{"role": "user", "content": "hi"}],
      "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    ({"model": "store", "prompt": "x", "echo": True}, 400, "echo"),
], ids=["missing-prompt", "bad-type", "n", "temperature", "too-many-stops", "context", "logprobs", "model",
        "empty-messages", "seed", "tools", "echo"])
def test_errors_come_in_openai_shape_with_their_status(server, body, status, param):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    reply = httpx.post(f"{server.url}{path}", json=body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_a_vanishing_temperature_is_greedy_and_unknown_paths_answer_in_openai_shape(server, client):
    greedy = client.completions.create(model="store", prompt=PROMPT, max_tokens=8, temperature=0)
    tiny_t = client.completions.create(model="store", prompt=PROMPT, max_tokens=8, temperature=1e-40)
    assert tiny_t.choices[0].text == greedy.choices[0].text
    reply = httpx.get(f"{server.url}/v1/nothing-here")
    assert reply.status_code == 404 and reply.json()["error"]["type"] == "not_found_error"


def test_malformed_json_and_the_official_client_errors(server, client):
    reply = httpx.post(f"{server.url}/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="store", prompt="x" * 250, max_tokens=50)


def _long_prompt(tiny, n: int) -> str:
    """A prompt whose greedy answer runs the whole ``n`` tokens (no end of sequence on the way)."""
    return next(p for p in (f"go on {k}" for k in range(50)) if 0 not in tiny.greedy([p], n)[0].token_ids)


def test_a_client_that_disconnects_frees_its_sequence(mesh_and_model, server):
    _, tiny = mesh_and_model
    before = server.counter("faasmoe_router_engine_completion_tokens_total")
    body = {"model": "store", "prompt": _long_prompt(tiny, 200), "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        assert server.engine_gauge("running") == 1
    # the connection is closed: the sequence leaves the batch long before its 200 tokens
    wait_for(lambda: server.engine_gauge("running") == 0, 10, "the stream's sequence to leave the batch")
    assert server.counter("faasmoe_router_engine_completion_tokens_total") - before < 150
    # a plain (not streamed) request whose client gives up
    before = server.counter("faasmoe_router_engine_completion_tokens_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False}, timeout=0.2)
    wait_for(lambda: server.engine_gauge("running") == 0, 10, "the plain request's sequence to leave the batch")
    assert server.counter("faasmoe_router_engine_completion_tokens_total") - before < 150


def test_forty_interleaved_concurrent_requests_each_get_their_own_answer(mesh_and_model, server):
    _, tiny = mesh_and_model
    prompts = [f"request {i}: " + "abcdefghij"[: i % 10] * (1 + i % 3) for i in range(40)]
    max_new = [4 + (i * 7) % 20 for i in range(40)]
    refs = [tiny.greedy([p], n)[0] for p, n in zip(prompts, max_new)]

    async def one(aclient, i):
        kw = dict(model="store", prompt=prompts[i], max_tokens=max_new[i], temperature=0)
        if i % 2:
            chunks = await aclient.completions.create(**kw, stream=True)
            return "".join([c.choices[0].text async for c in chunks])
        return (await aclient.completions.create(**kw)).choices[0].text

    async def all_at_once():
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        return await asyncio.gather(*(one(aclient, i) for i in range(40)))

    texts = asyncio.run(all_at_once())
    assert texts == [tiny.text(r.token_ids) for r in refs]


def test_a_full_server_answers_503_with_retry_after(mesh_and_model):
    """One running and one waiting request fill this server; of four sent at once (each runs 60 steps), the
    ones that find it full are refused at once with Retry-After, the others are served."""
    mesh, tiny = mesh_and_model
    with RouterProcess(tiny.store, mesh.addresses, "--max-batch", "1", "--max-waiting", "1",
                       "--router-id", "small-router") as small:
        body = {"model": "store", "prompt": _long_prompt(tiny, 60), "max_tokens": 60, "temperature": 0}

        async def four_at_once():
            async with httpx.AsyncClient(timeout=60) as http:
                return await asyncio.gather(*(http.post(f"{small.url}/v1/completions", json=body)
                                              for _ in range(4)))

        replies = asyncio.run(four_at_once())
    codes = sorted(r.status_code for r in replies)
    assert set(codes) == {200, 503} and codes.count(503) >= 2, codes       # capacity 2: at least 2 refused
    for refused in (r for r in replies if r.status_code == 503):
        assert int(refused.headers["Retry-After"]) >= 1
        assert refused.json()["error"]["code"] == "server_full"
