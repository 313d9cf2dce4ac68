"""Tenants through the real server (``faasmoe-router serve --tenants``) over real nodes: keys (401), limits
(400 and 429 with Retry-After computed from the limit), reloading on change and on SIGHUP without dropping
running requests (a malformed file keeps the last good one), /v1/usage for the admin, the tenant label in
Prometheus, the usage log (rotatable); and the tenants CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import httpx
import openai
import pytest

import polling

from faasmoe.router.control.local_mesh import LocalMesh
from serving_fixtures import RouterProcess, tiny_model, wait_for


def tenants_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "faasmoe.router", "tenants", *args], capture_output=True, text=True,
                          timeout=60)


def add(path, name, *flags) -> str:
    proc = tenants_cli("add", name, "--file", str(path), *flags)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tenants")
    tiny = tiny_model(root, max_position_embeddings=4096)      # room for a request that outlasts any stall
    path = root / "tenants.toml"
    keys = {"alice": add(path, "alice", "--weight", "2"),
            "bob": add(path, "bob", "--max-concurrent", "1", "--max-tokens-per-request", "3000"),
            "carol": add(path, "carol", "--tokens-per-minute", "200")}
    keys["admin"] = tenants_cli("admin-key", "--file", str(path)).stdout.strip()
    log = root / "usage.jsonl"
    with LocalMesh(3, root / "nodes", memory_budget_mb=256) as mesh, \
            RouterProcess(tiny.store, mesh.addresses, "--tenants", str(path), "--usage-log", str(log),
                          "--usage-poll-s", "0.5", "--router-id", "tenants-test") as server:
        yield server, tiny, path, keys, log, root


def client(server, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def test_the_file_stores_hashes_only_and_the_cli_lists_and_removes(tmp_path):
    path = tmp_path / "t.toml"
    key = add(path, "dave", "--weight", "3", "--tokens-per-minute", "1000")
    assert key.startswith("fmk-") and len(key) > 40 and key not in path.read_text()
    listed = json.loads(tenants_cli("list", "--file", str(path), "--json").stdout)
    assert [(t["name"], t["weight"], t["tokens_per_minute"]) for t in listed["tenants"]] == [("dave", 3.0, 1000)]
    again = tenants_cli("add", "dave", "--file", str(path))
    assert again.returncode == 2 and again.stderr.startswith("error: ") and len(again.stderr.splitlines()) == 1
    assert tenants_cli("remove", "dave", "--file", str(path)).returncode == 0
    assert json.loads(tenants_cli("list", "--file", str(path), "--json").stdout)["tenants"] == []
    path.write_text("[tenants.x]\nweight = -1\n")
    bad = tenants_cli("list", "--file", str(path))
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and "tenant 'x'" in bad.stderr


def test_keys(setup):
    server, *_ , keys, _, _ = setup
    ok = client(server, keys["alice"]).completions.create(model="store", prompt="hi", max_tokens=3, temperature=0)
    assert ok.usage.completion_tokens >= 1
    for key in ("", "fmk-not-a-key"):
        reply = httpx.post(f"{server.url}/v1/completions", json={"model": "store", "prompt": "hi"},
                           headers={"Authorization": f"Bearer {key}"} if key else {})
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(server, "fmk-wrong").completions.create(model="store", prompt="hi", max_tokens=3)
    # a malformed body from someone without a key is a 401, not a 400
    assert httpx.post(f"{server.url}/v1/completions", content=b"{bad",
                      headers={"Content-Type": "application/json"}).status_code == 401


def test_limits(setup):
    server, tiny, _, keys, _, _ = setup
    bob, carol = client(server, keys["bob"]), client(server, keys["carol"])
    with pytest.raises(openai.BadRequestError, match="at most 3000"):    # (this also opens bob's connection)
        bob.completions.create(model="store", prompt="x", max_tokens=3002)
    # bob may have 1 request in flight: the running one wants 2,900 tokens (seconds of generation, more than any
    # stall of a loaded machine), so it is still generating when the second arrives on bob's open connection;
    # leaving the stream cancels it
    body = {"model": "store", "prompt": "long one", "max_tokens": 2900, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {keys['bob']}"}) as running:
        assert running.status_code == 200
        lines = running.iter_lines()
        seen = [next(line for line in lines if line.startswith("data:")) for _ in range(2)]
        assert all('"error"' not in line for line in seen), seen          # it is generating
        try:
            done = bob.completions.create(model="store", prompt="x", max_tokens=5)
        except openai.RateLimitError as busy:
            assert int(busy.response.headers["Retry-After"]) >= 1
        else:                                  # say what the running request and the router were doing
            rest = [line for line in lines if line.startswith("data:")][-3:]
            pytest.fail(f"bob's second request was not refused ({done.usage}); his first stream began {seen}, "
                        f"ended {rest}; router: {''.join(server.stderr)[-3000:]}")
    polling.wait_for(lambda: bob.completions.create(model="store", prompt="x", max_tokens=2).usage, 10,
                     "bob's slot to be free again", ignore=(openai.RateLimitError,))
    # carol: 200 tokens per minute (3.3 per second); each request reserves prompt + max_tokens
    prompt = "abcdefghij"                                        # 10 tokens
    for _ in range(2):
        carol.completions.create(model="store", prompt=prompt, max_tokens=90, temperature=0,
                                 extra_body={"ignore_eos": True})
    with pytest.raises(openai.RateLimitError) as limited:
        carol.completions.create(model="store", prompt=prompt, max_tokens=90)
    retry = int(limited.value.response.headers["Retry-After"])
    assert 1 <= retry <= 31                                     # (100 - what refilled) / 3.3 tokens per second
    with pytest.raises(openai.BadRequestError, match="per minute"):
        carol.completions.create(model="store", prompt=prompt, max_tokens=230)


def test_reload_on_change_and_on_sighup_keeps_running_requests_and_the_last_good_file(setup):
    server, tiny, path, keys, _, _ = setup
    body = {"model": "store", "prompt": "still going", "max_tokens": 120, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {keys['alice']}"}) as running:
        lines = running.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        erin = add(path, "erin")                                      # the file changes: picked up within ~1 s
        wait_for(lambda: httpx.post(f"{server.url}/v1/completions", json={"model": "store", "prompt": "x",
                                                                           "max_tokens": 2},
                                    headers={"Authorization": f"Bearer {erin}"}).status_code == 200, 10,
                 "the new tenant's key to work")
        good = path.read_text()
        path.write_text(good + "\n[tenants.broken\n")                 # malformed: refused, the last good stays
        wait_for(lambda: any("not reloaded" in line for line in server.stderr), 10, "the refusal to be logged")
        refusal = next(line for line in server.stderr if "not reloaded" in line)
        assert "tenants.toml" in refusal and refusal.count("\n") == 1
        assert client(server, erin).completions.create(model="store", prompt="x", max_tokens=2).usage
        path.write_text(good)
        rest = [line for line in lines if line.startswith("data:")]
        assert rest[-1] == "data: [DONE]" and not any('"error"' in line for line in rest)   # never dropped


def test_sighup_reloads_at_once(setup, tmp_path):
    server, tiny, _, keys, _, root = setup
    path = tmp_path / "hup.toml"
    first = add(path, "first")
    with RouterProcess(tiny.store, server.addresses, "--tenants", str(path), "--tenants-poll-s", "3600",
                       "--router-id", "hup-test") as other:
        second = add(path, "second")                            # not polled for an hour: only SIGHUP reloads
        before = httpx.post(f"{other.url}/v1/completions", json={"model": "store", "prompt": "x", "max_tokens": 2},
                            headers={"Authorization": f"Bearer {second}"})
        assert before.status_code == 401
        other.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: httpx.post(f"{other.url}/v1/completions", json={"model": "store", "prompt": "x",
                                                                          "max_tokens": 2},
                                    headers={"Authorization": f"Bearer {second}"}).status_code == 200, 10,
                 "SIGHUP to load the new tenant")
        assert other.proc.poll() is None                        # SIGHUP reloads, it does not stop the server
        assert client(other, first).completions.create(model="store", prompt="x", max_tokens=2).usage


def test_usage_for_the_admin_prometheus_and_the_rotatable_log(setup):
    server, tiny, _, keys, log, root = setup
    client(server, keys["alice"]).completions.create(model="store", prompt="usage", max_tokens=4, temperature=0)
    assert httpx.get(f"{server.url}/v1/usage").status_code == 401
    assert httpx.get(f"{server.url}/v1/usage", headers={"Authorization": f"Bearer {keys['alice']}"}).status_code == 401
    usage = httpx.get(f"{server.url}/v1/usage", params={"window_s": 600},
                      headers={"Authorization": f"Bearer {keys['admin']}"}).json()
    alice = usage["tenants"]["alice"]
    assert alice["requests"] >= 1 and alice["completion_tokens"] >= 4 and alice["expert_rows"] > 0
    assert alice["expert_compute_s"] > 0 and set(alice["rows_by_layer"]) == {"0", "1", "2", "3"}
    wait_for(lambda: httpx.get(f"{server.url}/v1/usage", headers={"Authorization": f"Bearer {keys['admin']}"}).json()
             ["tenants"]["alice"]["memory_gb_s"] > 0, 10, "memory-seconds to be attributed")
    assert httpx.get(f"{server.url}/metrics").status_code == 401            # it names every tenant: admin only
    metrics = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {keys['admin']}"}).text
    assert 'faasmoe_tenant_completion_tokens_total{tenant="alice"}' in metrics
    records = [json.loads(line) for line in log.read_text().splitlines()]
    mine = [r for r in records if r["type"] == "request" and r["tenant"] == "alice"]
    assert mine and {"request_id", "prompt_tokens", "completion_tokens", "expert_rows", "expert_compute_s",
                     "cold_starts", "finish_reason", "ts"} <= set(mine[-1])
    log.rename(root / "usage.jsonl.1")                                # rotated
    client(server, keys["alice"]).completions.create(model="store", prompt="after", max_tokens=2, temperature=0)
    wait_for(lambda: log.exists() and any(json.loads(line)["type"] == "request" for line in log.read_text().splitlines()),
             10, "a fresh log file")


def test_without_a_tenants_file_it_is_loopback_only(tmp_path, setup):
    server, tiny, *_ = setup
    proc = subprocess.run([sys.executable, "-m", "faasmoe.router", "serve", "--store", str(tiny.store), "--nodes",
                           "127.0.0.1:1", "--host", "0.0.0.0", "--port", "0"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.splitlines()) == 1
    assert "--tenants" in proc.stderr
