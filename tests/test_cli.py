"""The command lines as a user runs them: the demo, split errors, router errors and place."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from faasmoe.router.control.local_mesh import LocalMesh
from faasmoe.router.store.split import split_checkpoint
from model_factory import make_checkpoint


def run(*args, timeout=240, env=None):
    import os
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def test_demo_runs_and_matches_transformers():
    proc = run("faasmoe.router.cli.umbrella", "demo", "--nodes", "3", "--max-new-tokens", "6", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["matches_transformers"] is True
    assert report["nodes"] == 3 and len(report["token_ids"]) == 6 and report["rpcs"] > 0


def test_demo_serve_prints_a_curl_line_and_an_openai_snippet_that_work_as_printed(tmp_path):
    import os
    import signal
    demo = subprocess.Popen([sys.executable, "-m", "faasmoe.router.cli.umbrella", "demo", "--serve", "--port", "0",
                             "--nodes", "2", "--max-new-tokens", "4"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        lines = []
        while not (lines and lines[-1].startswith("print(")):
            line = demo.stdout.readline()
            assert line, demo.stderr.read()
            lines.append(line.rstrip("\n"))
        curl = next(line for line in lines if line.startswith("curl "))
        snippet = "\n".join(lines[lines.index("from openai import OpenAI"):])
        by_curl = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=60)
        assert by_curl.returncode == 0, by_curl.stderr
        completion = json.loads(by_curl.stdout)
        assert completion["object"] == "text_completion" and completion["usage"]["completion_tokens"] >= 1
        by_python = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, timeout=60)
        assert by_python.returncode == 0, by_python.stderr
        assert by_python.stdout == completion["choices"][0]["text"] + "\n"      # greedy: the same text
    finally:
        demo.send_signal(signal.SIGTERM)
        code = demo.wait(60)
    assert code == 0, demo.stderr.read()


@pytest.mark.parametrize("argv,needle", [
    (["--experts", "int3"], "invalid choice"), (["--experts", "int4", "--block-size", "48"], "--block-size 48"),
    (["--block-size", "32"], "int8 or int4 only")], ids=["precision", "block-size", "block-size-fp32"])
def test_split_precision_flags_are_checked(tmp_path, argv, needle):
    model_dir = make_checkpoint(tmp_path / "model")
    proc = run("faasmoe.router.cli.umbrella", "split", str(model_dir), "--out", str(tmp_path / "store"), *argv)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert not (tmp_path / "store").exists()


def test_split_of_a_malformed_checkpoint_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    proc = run("faasmoe.router.cli.umbrella", "split", str(tmp_path), "--out", str(tmp_path / "store"))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "config.json" in lines[0]
    assert not (tmp_path / "store").exists()


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-store")
    split_checkpoint(make_checkpoint(root / "model"), root / "store", group_size=4, progress=False)
    return root / "store"


@pytest.mark.parametrize("argv,code,needle", [
    (["generate", "--store", "{store}", "--prompt", "x"], 2, "no nodes"),
    (["generate", "--store", "{store}", "--nodes", "nohost", "--prompt", "x"], 2, "host:port"),
    (["generate", "--store", "{missing}", "--nodes", "127.0.0.1:1", "--prompt", "x"], 1, "manifest"),
    (["generate", "--store", "{store}", "--nodes", "127.0.0.1:1", "--prompt", "x"], 1, "no reachable node"),
    (["serve", "--store", "{store}", "--nodes", "127.0.0.1:1", "--replica-interval-s", "0"], 2, "--replica-interval-s"),
    (["generate", "--store", "{store}", "--nodes", "127.0.0.1:1", "--prompt", "x", "--replicas", "3"], 2,
     "invalid choice"),
    (["generate", "--store", "{store}", "--nodes", "127.0.0.1:1", "--prompt", "x", "--dense-dtype", "fp8"], 2,
     "invalid choice"),
], ids=["no-nodes", "bad-address", "missing-store", "unreachable", "replica-interval", "replicas", "dense-dtype"])
def test_router_errors_are_one_line(small_store, argv, code, needle):
    argv = [a.format(store=small_store, missing=small_store.parent / "nope") for a in argv]
    proc = run("faasmoe.router", *argv)
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr


def test_router_flags_come_from_the_environment(tmp_path):
    proc = run("faasmoe.router", "status", env={"FAASMOE_ROUTER_DISCOVER_WAIT_S": "soon"})
    assert proc.returncode == 2 and "FAASMOE_ROUTER_DISCOVER_WAIT_S" in proc.stderr


def test_place_dry_run_then_apply(tmp_path):
    model_dir = make_checkpoint(tmp_path / "model", num_experts=8, top_k=2)
    store = tmp_path / "store"
    manifest = split_checkpoint(model_dir, store, group_size=2, progress=False)
    with LocalMesh(3, tmp_path / "nodes", memory_budget_mb=64) as mesh:
        nodes = ",".join(mesh.addresses)
        dry = run("faasmoe.router", "place", "--store", str(store), "--nodes", nodes, "--dry-run", "--json")
        assert dry.returncode == 0, dry.stderr
        plan = json.loads(dry.stdout)
        assert plan["applied"] is False and set(plan["placement"]) == {f.function_id for f in manifest.functions}
        for node in plan["nodes"]:
            assert node["used_bytes"] <= node["capacity_bytes"]
        table = run("faasmoe.router", "place", "--store", str(store), "--nodes", nodes)
        assert table.returncode == 0 and "used / capacity" in table.stdout
        status = run("faasmoe.router", "status", "--nodes", nodes, "--json")
        report = json.loads(status.stdout)
        held = {f["function_id"] for n in report["nodes"] for f in n["functions"]}
        assert held == {f.function_id for f in manifest.functions}
