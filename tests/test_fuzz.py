"""A fuzz run of more than 10,000 malformed messages against real processes: Invoke frames (unary and on a
stream), deployments whose sha256 matches their mutated content, and HTTP bodies. Every one is refused with
INVALID_ARGUMENT / RESOURCE_EXHAUSTED (gRPC) or 400 in OpenAI's error shape (HTTP), unless a local oracle says
the mutation left a valid message (then it must be served). The processes stay up and answer a valid request
afterwards, and their memory grows by less than a bound.

A seeded generator: a failure names the case number, and the same seed replays it."""

from __future__ import annotations

import hashlib
import json
import random

import grpc
import httpx
import numpy as np
import psutil
import pytest

from faasmoe.proto import faasmoe_pb2 as pb
from faasmoe.proto import frames
from faasmoe.proto.errors import InvalidRequest
from faasmoe.proto.onnx_check import check_function
from faasmoe.router.control.local_mesh import LocalMesh, start_node
from node_fixtures import Stub, chunks_of, make_function
from serving_fixtures import RouterProcess, tiny_model

SEED = 20261130
N_FRAMES, N_STREAM_FRAMES, N_DEPLOYS, N_HTTP = 4500, 1500, 1000, 3200      # 10,200 in all
RSS_GROWTH_BOUND_BYTES = 96 << 20
REFUSED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


# -- frames ----------------------------------------------------------------------------------------------

def _frame_variants(fn, rng: random.Random) -> bytes:
    hidden = np.random.default_rng(rng.randrange(1 << 30)).standard_normal((3, fn.hidden_size)).astype(np.float32)
    valid = frames.encode_request("fz", "t", fn.layer, hidden, [fn.call([0, 1, 2], [2, 1])])
    head_len = int.from_bytes(valid[:4], "little")
    kind = rng.randrange(9)
    data = bytearray(valid)
    if kind == 0:                                                   # bit flips in the header
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(4 + head_len)
            data[i] ^= 1 << rng.randrange(8)
    elif kind == 1:                                                 # truncated
        del data[rng.randrange(len(data)):]
    elif kind == 2:                                                 # trailing junk
        data += rng.randbytes(rng.randint(1, 64))
    elif kind == 3:                                                 # garbage
        data = bytearray(rng.randbytes(rng.randint(0, 512)))
    elif kind == 4:                                                 # a length prefix that lies
        data[:4] = rng.choice([0, 1, head_len + 1, 0xFFFFFFFF, rng.randrange(1 << 32)]).to_bytes(4, "little")
    else:                                                           # a well-formed header with a bad value
        header = frames.decode_header(valid, pb.InvokeRequest)
        payload = bytes(valid[4 + head_len:])
        if kind == 5:
            header.layer = rng.choice([-1, fn.layer + 1, 1 << 30])
        elif kind == 6:
            header.hidden.shape[:] = rng.choice([[3, fn.hidden_size - 1], [3], [3, fn.hidden_size, 1],
                                                 [1 << 40, fn.hidden_size], [0, fn.hidden_size]])
        elif kind == 7:
            header.hidden.dtype = rng.choice(["float64", "int8", "", "complex64", "bfloat17"])
        else:
            hidden[rng.randrange(3), rng.randrange(fn.hidden_size)] = rng.choice([np.nan, np.inf, -np.inf])
            bad_rows = rng.choice([[0, 1, 3], [0, -1, 2], [0, 1, 2]])
            bad_counts = rng.choice([[2, 2], [3, 0, 0], [2, 1]]) if bad_rows == [0, 1, 2] else [2, 1]
            return frames.encode_request("fz", "t", fn.layer, hidden, [fn.call(bad_rows, bad_counts)])
        head = header.SerializeToString()
        data = bytearray(len(head).to_bytes(4, "little") + head + payload)
    return bytes(data)


def _frame_is_valid(frame: bytes, fn) -> bool:
    """The oracle: would a correct node serve this frame?"""
    try:
        header, hidden, calls = frames.decode_request(frame)
    except InvalidRequest:
        return False
    return (header.layer == fn.layer and hidden.shape[1] == fn.hidden_size and header.hidden.dtype == "float32"
            and all(c.function_id == fn.function_id and len(c.expert_row_counts) == len(fn.expert_ids)
                    for c in calls))


def _names_another_function(frame: bytes, fn) -> bool:
    """A well-formed frame for a well-formed function id that is not deployed (a bit flip in the id): the
    node's precise answer is NOT_FOUND (the router re-places on it), not INVALID_ARGUMENT."""
    try:
        _, _, calls = frames.decode_request(frame)
    except InvalidRequest:
        return False
    return any(c.function_id != fn.function_id and len(c.function_id) == 64
               and all(ch in "0123456789abcdef" for ch in c.function_id) for c in calls)


# -- deployments ------------------------------------------------------------------------------------------

def _deploy_variant(fn, rng: random.Random) -> bytes:
    data = bytearray(fn.data)
    kind = rng.randrange(5)
    if kind == 0:
        del data[rng.randrange(1, len(data)):]
    elif kind == 1:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(min(len(data), 4096))                 # the model's and graph's structure
            data[i] ^= 1 << rng.randrange(8)
    elif kind == 2:
        i = rng.randrange(len(data))
        data[i:i] = rng.randbytes(rng.randint(1, 32))
    elif kind == 3:
        data = bytearray(rng.randbytes(rng.randint(1, 4096)))
    else:
        data = bytearray(data[:64]) + rng.randbytes(rng.randint(0, 256)) + data[64:]
    return bytes(data)


def _function_is_valid(data: bytes, tmp_path) -> bool:
    path = tmp_path / "candidate.onnx"
    path.write_bytes(data)
    try:
        check_function(path)
        return True
    except InvalidRequest:
        return False


def test_fuzz_frames_and_deployments_on_a_node(tmp_path):
    rng = random.Random(SEED)
    fn = make_function(seed=5)
    node = start_node(tmp_path / "node", memory_budget_mb=256)
    try:
        with grpc.insecure_channel(node.address) as channel:
            stub = Stub(channel)
            stub.deploy(chunks_of(fn), timeout=30)
            good = frames.encode_request("ok", "t", fn.layer, np.ones((3, fn.hidden_size), np.float32),
                                         [fn.call([0, 1, 2], [2, 1])])
            for _ in range(50):                                     # warm: sessions, buffers, caches
                stub.invoke(good, timeout=10)
            before = rss(node.process.pid)
            served = refused = 0
            for case in range(N_FRAMES):
                frame = _frame_variants(fn, rng)
                try:
                    reply = stub.invoke(frame, timeout=10)
                    assert _frame_is_valid(frame, fn), f"frame case {case} was served but is malformed"
                    header, outputs = frames.decode_reply(reply)
                    assert not header.HasField("error") and len(outputs) == 1
                    served += 1
                except grpc.RpcError as exc:
                    expected = REFUSED | ({grpc.StatusCode.NOT_FOUND} if _names_another_function(frame, fn) else set())
                    assert exc.code() in expected, f"frame case {case}: {exc.code()} {exc.details()}"
                    assert exc.details(), f"frame case {case}: no reason given"
                    refused += 1
            stream_codes = _fuzz_stream(stub, fn, rng)
            deploys = _fuzz_deploys(stub, fn, rng, tmp_path)
            assert stub.invoke(good, timeout=10)                   # still serving
            growth = rss(node.process.pid) - before
        assert node.process.poll() is None
        assert refused > N_FRAMES * 0.8 and served + refused == N_FRAMES
        assert stream_codes <= {grpc.StatusCode.INVALID_ARGUMENT.value[0], grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]}
        assert deploys["refused"] > N_DEPLOYS * 0.8
        assert growth < RSS_GROWTH_BOUND_BYTES, f"node RSS grew by {growth / 2**20:.0f} MiB"
    finally:
        node.stop()


def _fuzz_stream(stub, fn, rng) -> set[int]:
    """Malformed frames on one InvokeStream: each gets an in-band error reply; the stream stays usable."""
    batch = [_frame_variants(fn, rng) for _ in range(N_STREAM_FRAMES)]
    codes, replies = set(), list(stub.invoke_stream(iter(batch), timeout=120))
    assert len(replies) == len(batch)
    for case, (frame, reply) in enumerate(zip(batch, replies)):
        header, _ = frames.decode_reply(reply)
        if header.HasField("error"):
            if not (header.error.code == grpc.StatusCode.NOT_FOUND.value[0] and _names_another_function(frame, fn)):
                codes.add(header.error.code)
            assert header.error.details, f"stream case {case}: no reason"
        else:
            assert _frame_is_valid(frame, fn), f"stream case {case} was served but is malformed"
    return codes


def _fuzz_deploys(stub, fn, rng, tmp_path) -> dict:
    out = {"served": 0, "refused": 0}
    for case in range(N_DEPLOYS):
        data = _deploy_variant(fn, rng)
        fid = hashlib.sha256(data).hexdigest()                      # the id matches the (mutated) content
        header = pb.FunctionHeader(function_id=fid, size_bytes=len(data), layer=0, expert_ids=[0, 1],
                                   model_id="fuzz", dtype="float32", owner="fuzz")
        try:
            stub.deploy(chunks_of(fn, data=data, header=header), timeout=30)
            assert _function_is_valid(data, tmp_path), f"deploy case {case} was accepted but is malformed"
            stub.undeploy(pb.UndeployRequest(function_id=fid, owner="fuzz"), timeout=10)
            out["served"] += 1
        except grpc.RpcError as exc:
            assert exc.code() in REFUSED, f"deploy case {case}: {exc.code()} {exc.details()}"
            out["refused"] += 1
    return out


# -- HTTP bodies -------------------------------------------------------------------------------------------

_BAD_VALUES = {
    "prompt": [None, 5, {}, [], [[1]], True, 1.5],
    "max_tokens": [0, -3, "x", 1.5, 10 ** 6, [], None],
    "temperature": [-1, 3, "hot", [], {}],
    "top_p": [-0.1, 2, "x", []],
    "n": [0, 2, "x"],
    "stop": [5, [1, 2], ["a", "b", "c", "d", "e"], {}],
    "seed": [2 ** 64, "x", 1.5, []],
    "logprobs": [-1, 6, "x"],
    "stream": [5, [], {}],
    "model": [5, None, [], {}],
}
_BAD_MESSAGES = [[], "hi", [{"role": "wizard", "content": "x"}], [{"content": 5}], [{"role": "user"}],
                 [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], [5], None]


def _http_variant(rng: random.Random, model: str) -> tuple[str, bytes]:
    chat = rng.random() < 0.4
    body = ({"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4} if chat
            else {"model": model, "prompt": "hello", "max_tokens": 4})
    kind = rng.randrange(6)
    if kind == 0:
        return ("chat/completions" if chat else "completions"), rng.randbytes(rng.randint(0, 300))
    if kind == 1:
        text = json.dumps(body)
        return ("chat/completions" if chat else "completions"), text[:rng.randrange(len(text))].encode()
    if kind == 2:
        return ("chat/completions" if chat else "completions"), json.dumps(rng.choice([[], 5, "x", None, [body]])).encode()
    if chat and rng.random() < 0.5:
        body["messages"] = rng.choice(_BAD_MESSAGES)
    else:
        key = rng.choice([k for k in _BAD_VALUES if not (chat and k in ("prompt", "logprobs"))])
        body[key] = rng.choice(_BAD_VALUES[key])
        if key == "model" and body[key] is None:
            body.pop("model")
        if chat and key == "max_tokens" and body[key] is None:     # chat allows null max_tokens
            body[key] = 0
    for _ in range(rng.randrange(2)):                               # sometimes a second bad field
        key = rng.choice(["temperature", "n", "top_p"])
        body[key] = rng.choice(_BAD_VALUES[key])
    return ("chat/completions" if chat else "completions"), json.dumps(body).encode()


def test_fuzz_http_bodies_on_a_router(tmp_path):
    rng = random.Random(SEED + 1)
    tiny = tiny_model(tmp_path)
    with LocalMesh(2, tmp_path / "nodes", memory_budget_mb=256) as mesh:
        with RouterProcess(tiny.store, mesh.addresses) as router, httpx.Client(timeout=30) as http:
            good = {"model": router.model, "prompt": "hello", "max_tokens": 2}
            for _ in range(20):
                assert http.post(f"{router.url}/v1/completions", json=good).status_code == 200
            before = rss(router.proc.pid)
            for case in range(N_HTTP):
                path, body = _http_variant(rng, router.model)
                reply = http.post(f"{router.url}/v1/{path}", content=body, headers={"Content-Type": "application/json"})
                assert reply.status_code == 400, f"http case {case}: {reply.status_code} {body[:200]!r} {reply.text[:300]}"
                error = reply.json()["error"]
                assert error["message"] and error["type"] == "invalid_request_error", f"http case {case}: {error}"
            assert http.post(f"{router.url}/v1/completions", json=good).status_code == 200
            growth = rss(router.proc.pid) - before
            assert router.proc.poll() is None
    assert growth < RSS_GROWTH_BOUND_BYTES, f"router RSS grew by {growth / 2**20:.0f} MiB"


@pytest.mark.parametrize("seed", range(3))
def test_the_generators_make_malformed_messages(seed):
    """The fuzzers' own check: most frames they make are malformed by the oracle."""
    rng, fn = random.Random(seed), make_function(seed=5)
    bad = sum(not _frame_is_valid(_frame_variants(fn, rng), fn) for _ in range(300))
    assert bad > 240
