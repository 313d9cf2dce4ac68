"""The content-addressed store on a real directory."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

from faasmoe.node.store import ContentStore
from faasmoe.proto.onnx_check import check_function
from faasmoe.proto.errors import FaasmoeError, IntegrityError, InvalidRequest, NodeFull
from node_fixtures import make_function


def blob(n: int, seed: int = 0) -> tuple[str, bytes]:
    data = (hashlib.sha256(str(seed).encode()).digest() * (n // 32 + 1))[:n]
    return hashlib.sha256(data).hexdigest(), data


async def agen(data: bytes, chunk: int = 1000):
    for i in range(0, len(data), chunk):
        yield data[i:i + chunk]


def receive(store: ContentStore, fid: str, size: int, data: bytes):
    return asyncio.run(store.receive(fid, size, agen(data)))


def leftovers(root) -> list[str]:
    return [n for n in os.listdir(root) if n.endswith(".part")]


def test_receive_verifies_and_renames(tmp_path):
    store = ContentStore(tmp_path, 10_000)
    fid, data = blob(2500)
    path = receive(store, fid, len(data), data)
    assert path.read_bytes() == data and store.has(fid) and store.used_bytes == 2500
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("mutate", ["content", "short", "long"])
def test_bad_upload_leaves_nothing(tmp_path, mutate):
    store = ContentStore(tmp_path, 10_000)
    fid, data = blob(2500)
    bad = {"content": data[:-1] + b"x", "short": data[:-10], "long": data + b"extra"}[mutate]
    with pytest.raises(IntegrityError):
        receive(store, fid, len(data), bad)
    assert not store.has(fid) and not leftovers(tmp_path) and store.used_bytes == 0


def test_bad_function_id(tmp_path):
    store = ContentStore(tmp_path, 10_000)
    with pytest.raises(InvalidRequest, match="sha256"):
        receive(store, "../../etc/passwd", 3, b"abc")


def test_restart_reindexes_and_removes_leftovers(tmp_path):
    store = ContentStore(tmp_path, 10_000)
    ids = []
    for seed in range(2):
        fid, data = blob(1000, seed)
        receive(store, fid, len(data), data)
        ids.append(fid)
    (tmp_path / f"{ids[0]}.dead.part").write_bytes(b"half")
    store.close()
    again = ContentStore(tmp_path, 10_000)
    assert all(again.has(fid) for fid in ids) and again.used_bytes == 2000
    assert not leftovers(tmp_path)


def test_second_store_on_same_dir_is_refused(tmp_path):
    store = ContentStore(tmp_path, 10_000)
    with pytest.raises(FaasmoeError, match="another node"):
        ContentStore(tmp_path, 10_000)
    store.close()
    ContentStore(tmp_path, 10_000).close()


def test_disk_lru_never_removes_deployed(tmp_path):
    store = ContentStore(tmp_path, 3000)
    ids = []
    for seed in range(3):
        fid, data = blob(1000, seed)
        receive(store, fid, len(data), data)
        ids.append(fid)
    store.pin(ids[0])            # the oldest file is deployed
    store.touch(ids[2])          # ids[1] is now the least recently used unpinned file
    fid, data = blob(1000, 9)
    receive(store, fid, len(data), data)
    assert store.has(ids[0]) and not store.has(ids[1]) and store.has(ids[2]) and store.has(fid)
    store.pin(ids[2])
    store.pin(fid)
    with pytest.raises(NodeFull, match="disk budget"):
        receive(store, blob(1000, 10)[0], 1000, blob(1000, 10)[1])
    assert all(store.has(f) for f in (ids[0], ids[2], fid))


def test_spec_without_onnx_package(tmp_path):
    fn = make_function(seed=3, layer=7, n_experts=3, hidden=32, inter=16)
    path = tmp_path / "f.onnx"
    path.write_bytes(fn.data)
    spec = check_function(path)
    assert (spec.layer, spec.hidden_size, spec.intermediate_size) == (7, 32, 16)
    assert spec.expert_ids == tuple(fn.expert_ids) and spec.model_id == "test"


def test_each_function_has_its_own_folder_and_the_flat_layout_moves_in(tmp_path):
    store = ContentStore(tmp_path, 10_000)
    fid, data = blob(1000)
    path = receive(store, fid, len(data), data)
    assert path == tmp_path / fid / "function.onnx" and os.listdir(tmp_path / fid) == ["function.onnx"]
    store.remove(fid)
    assert not (tmp_path / fid).exists()
    store.close()
    old, old_data = blob(500, 1)
    (tmp_path / f"{old}.onnx").write_bytes(old_data)                 # a store from before the folders
    again = ContentStore(tmp_path, 10_000)
    assert again.has(old) and again.path(old).read_bytes() == old_data and not (tmp_path / f"{old}.onnx").exists()


def test_a_full_disk_is_a_full_node(tmp_path):
    """The disk fills before the disk budget does (a 64 KiB tmpfs, a 10 MiB budget): the upload is refused as
    NodeFull, naming the disk, and leaves nothing behind."""
    import subprocess
    from conftest import skip_or_fail
    if os.geteuid() != 0:
        skip_or_fail("mounting a small tmpfs needs root")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)], check=True)
    try:
        store = ContentStore(small, 10 << 20)
        fid, data = blob(200_000, 7)
        with pytest.raises(NodeFull, match="disk under .* is full"):
            receive(store, fid, len(data), data)
        assert leftovers(small) == [] and not store.has(fid)
        store.close()
    finally:
        subprocess.run(["umount", str(small)], check=True)
