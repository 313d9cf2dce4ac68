"""Shared and private routers over one pool of functions: three private routers (one per tenant) and one
shared router on the same three node processes leave exactly one copy of each function on each node's disk
and in its memory, every copy leased by all four; when one private router stops, the others keep every
function they use and go on answering exactly."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from faasmoe.router.control.local_mesh import LocalMesh
from faasmoe.router.control.client import NodeClient
from faasmoe.router.store.manifest import load_manifest
from serving_fixtures import RouterProcess, tiny_model
from test_tenants import add


def statuses(mesh):
    out = {}
    for node in mesh.nodes:
        client = NodeClient(node.address)
        try:
            out[node.address] = client.status()
        finally:
            client.close()
    return out


def test_three_private_routers_and_a_shared_one_share_every_copy(tmp_path):
    tiny = tiny_model(tmp_path)
    path = tmp_path / "tenants.toml"
    keys = {t: add(path, t) for t in ("t1", "t2", "t3")}
    manifest = load_manifest(tiny.store)
    prompt = "shared pool"
    (ref,) = tiny.greedy([prompt], 10)
    expected = tiny.text(ref.token_ids)
    with LocalMesh(3, tmp_path / "nodes", memory_budget_mb=256, extra_args=["--keep-alive-s", "inf"]) as mesh:
        routers = {"shared": RouterProcess(tiny.store, mesh.addresses, "--tenants", str(path))}
        try:
            # every function is placed now: the private routers, started side by side, lease those copies
            with ThreadPoolExecutor(len(keys)) as pool:
                starting = {t: pool.submit(RouterProcess, tiny.store, mesh.addresses, "--tenants", str(path),
                                           "--tenant", t) for t in keys}
            for t, future in starting.items():
                if future.exception() is None:
                    routers[t] = future.result()
            for future in starting.values():
                future.result()                                             # a failed start-up fails the test
            for name, router in routers.items():
                for t, key in keys.items():
                    if name in ("shared", t):
                        out = openai.OpenAI(base_url=f"{router.url}/v1", api_key=key, max_retries=0).completions.create(
                            model="store", prompt=prompt, max_tokens=10, temperature=0)
                        assert out.choices[0].text == expected
            owners = set()
            for address, status in statuses(mesh).items():
                fids = [f.function_id for f in status.functions]
                assert len(fids) == len(set(fids))                            # one copy per node
                assert status.disk_used_bytes == sum(f.size_bytes for f in status.functions)
                assert status.loaded_bytes == sum(f.resident_bytes for f in status.functions if f.loaded)
                for f in status.functions:
                    owners.add(tuple(sorted(f.owners)))
            assert len(owners) == 1 and len(next(iter(owners))) == 4          # every copy leased by all four
            held = {f.function_id for s in statuses(mesh).values() for f in s.functions}
            assert held == {f.function_id for f in manifest.functions}
            # a private router stops and lets go; every function stays for the other three
            assert routers.pop("t2").stop() == 0
            after = statuses(mesh)
            assert {f.function_id for s in after.values() for f in s.functions} == held
            assert all(len(f.owners) == 3 for s in after.values() for f in s.functions)
            for name in ("shared", "t1"):
                key = keys["t1"]
                out = openai.OpenAI(base_url=f"{routers[name].url}/v1", api_key=key, max_retries=0).completions.create(
                    model="store", prompt=prompt, max_tokens=10, temperature=0)
                assert out.choices[0].text == expected
            with pytest.raises(openai.AuthenticationError):              # a private router serves its tenant only
                openai.OpenAI(base_url=f"{routers['t1'].url}/v1", api_key=keys["t3"], max_retries=0).completions.create(
                    model="store", prompt=prompt, max_tokens=2)
        finally:
            for router in routers.values():
                router.stop()
