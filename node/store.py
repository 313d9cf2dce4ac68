"""Content-addressed on-disk store of function files, within a disk budget.

    STORE_DIR/<sha256>/function.onnx  one folder per function, named by the sha256 of its content (a function
                                      is loaded from its own folder, with nothing beside it)
    STORE_DIR/<sha256>.<rand>.part    upload in progress (removed on restart)
    STORE_DIR/.lock                   flock held by the node owning the directory

Uploads stream into a temp file while hashing; the file is renamed into place only when its length and
sha256 match what the deployer announced (atomic: a reader never sees half a file). Files of deployed
functions are pinned; others form a warm disk cache that is dropped least-recently-used first when a new
upload needs room. The directory is re-indexed on start (sizes are checked, content is not re-hashed; the
atomic rename is what guarantees integrity); the LRU order survives restarts through file mtimes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import logging
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, BinaryIO

from faasmoe.node import eviction
from faasmoe.proto import function_abi as abi
from faasmoe.proto.onnx_check import check_function
from faasmoe.proto.errors import FaasmoeError, IntegrityError, InvalidRequest, NodeFull

log = logging.getLogger(__name__)
SUFFIX = ".onnx"                  # files of the flat layout before per-function folders (moved on start)
FILE_NAME = "function.onnx"
PART_SUFFIX = ".part"
_ID = re.compile(r"[0-9a-f]{64}")
MIB = 1024 * 1024


def check_function_id(function_id: str) -> None:
    if not _ID.fullmatch(function_id):
        raise InvalidRequest(f"function id {function_id!r} is not a lowercase sha256 hex digest (64 chars)")


@dataclass
class _File:
    size_bytes: int
    last_used_s: float       # wall clock, mirrored in the file's mtime


class ContentStore:
    def __init__(self, root: Path, disk_budget_bytes: int, node: str = "node"):
        self.root = Path(root)
        self.disk_budget_bytes = disk_budget_bytes
        self.node = node
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock_fd = _lock(self.root / ".lock")
        except OSError as err:
            raise FaasmoeError(f"cannot use store dir {self.root}: {err}; pick a writable --store-dir") from err
        self._files: dict[str, _File] = {}
        self._pinned: set[str] = set()
        self._reserved_bytes = 0
        self._reindex()

    def _reindex(self) -> None:
        for entry in os.scandir(self.root):
            name = entry.name
            if name.endswith(PART_SUFFIX):
                log.info("store: removing upload leftover %s", name)
                os.unlink(entry.path)
            elif name.endswith(SUFFIX) and _ID.fullmatch(name[:-len(SUFFIX)]) and entry.is_file():
                fid = name[:-len(SUFFIX)]                          # the flat layout: into its own folder
                self.path(fid).parent.mkdir(exist_ok=True)
                os.replace(entry.path, self.path(fid))
                st = os.stat(self.path(fid))
                self._files[fid] = _File(st.st_size, st.st_mtime)
            elif _ID.fullmatch(name) and entry.is_dir(follow_symlinks=False):
                path = self.path(name)
                if path.is_file() and not path.is_symlink():
                    st = path.stat()
                    self._files[name] = _File(st.st_size, st.st_mtime)
        log.info("store %s: %d files, %.1f MiB of %.1f MiB", self.root, len(self._files),
                 self.used_bytes / MIB, self.disk_budget_bytes / MIB)

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)   # releases the flock
            self._lock_fd = None

    @property
    def used_bytes(self) -> int:
        return sum(f.size_bytes for f in self._files.values())

    def has(self, function_id: str) -> bool:
        return function_id in self._files

    def path(self, function_id: str) -> Path:
        return self.root / function_id / FILE_NAME

    def size_bytes(self, function_id: str) -> int:
        return self._files[function_id].size_bytes

    def touch(self, function_id: str) -> None:
        """Mark a file as recently used (deploy, load)."""
        f = self._files.get(function_id)
        if f is not None:
            f.last_used_s = time.time()
            try:
                os.utime(self.path(function_id), (f.last_used_s, f.last_used_s))
            except OSError:
                pass

    def pin(self, function_id: str) -> None:
        self._pinned.add(function_id)
        self.touch(function_id)

    def unpin(self, function_id: str) -> None:
        self._pinned.discard(function_id)

    def make_room(self, need_bytes: int) -> list[str]:
        """Drop LRU unpinned files until ``need_bytes`` more fit the disk budget; NodeFull if they cannot."""
        files = [eviction.StoredFile(fid, f.size_bytes, f.last_used_s, fid in self._pinned)
                 for fid, f in self._files.items()]
        victims = eviction.files_to_drop(files, need_bytes, self.disk_budget_bytes, self._reserved_bytes)
        if victims is None:
            pinned_bytes = sum(f.size_bytes for f in files if f.pinned)
            raise NodeFull(f"storing {need_bytes / MIB:.1f} MiB would exceed the disk budget of node {self.node}: "
                           f"{pinned_bytes / MIB:.1f} MiB of deployed files and {self._reserved_bytes / MIB:.1f} MiB "
                           f"of uploads in progress in a {self.disk_budget_bytes / MIB:.1f} MiB budget; undeploy "
                           "functions or raise --disk-budget-mb")
        for fid in victims:
            self.remove(fid)
        return victims

    def remove(self, function_id: str) -> None:
        if function_id in self._pinned:
            raise ValueError(f"refusing to remove {function_id}: it is deployed")
        f = self._files.pop(function_id, None)
        if f is not None:
            self.path(function_id).unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                self.path(function_id).parent.rmdir()
            log.info("store: dropped %s (%.1f MiB) for the disk budget", function_id[:12], f.size_bytes / MIB)

    async def receive(self, function_id: str, size_bytes: int, chunks: AsyncIterator[bytes]) -> Path:
        """Stream ``chunks`` into the store; verify length and sha256; atomic rename. Returns the path."""
        check_function_id(function_id)
        self.make_room(size_bytes)
        self._reserved_bytes += size_bytes
        tmp = self.root / f"{function_id}.{secrets.token_hex(4)}{PART_SUFFIX}"
        try:
            digest, received = hashlib.sha256(), 0
            with open(tmp, "wb") as fh:
                async for data in chunks:
                    received += len(data)
                    if received > size_bytes:
                        raise IntegrityError(f"function {function_id}: received more than the announced "
                                             f"{size_bytes} bytes")
                    if data:
                        await asyncio.to_thread(_write, fh, digest, data)
                await asyncio.to_thread(_sync, fh)
            if received != size_bytes:
                raise IntegrityError(f"function {function_id}: received {received} bytes, announced {size_bytes}")
            if digest.hexdigest() != function_id:
                raise IntegrityError(f"function {function_id}: content sha256 is {digest.hexdigest()}; the upload "
                                     "was corrupted or the id is wrong, deploy it again")
            self.path(function_id).parent.mkdir(exist_ok=True)
            os.replace(tmp, self.path(function_id))
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):      # the disk filled before the budget did
                raise NodeFull(f"node {self.node}: the disk under {self.root} is full ({exc.strerror}) while storing "
                               f"function {function_id[:12]} ({size_bytes / MIB:.1f} MiB); free disk space or lower "
                               "--disk-budget-mb to what the disk holds", node=self.node) from None
            raise
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        finally:
            self._reserved_bytes -= size_bytes
        self._files[function_id] = _File(size_bytes, time.time())
        return self.path(function_id)


def _write(fh: BinaryIO, digest, data: bytes) -> None:
    digest.update(data)
    fh.write(data)


def _sync(fh: BinaryIO) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def _lock(path: Path) -> int:
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OSError(f"another node is using it ({path} is locked)") from None
    return fd


@dataclass(frozen=True)
class FunctionInfo:
    function_id: str
    size_bytes: int               # file size
    layer: int
    expert_ids: tuple[int, ...]
    hidden_size: int
    model_id: str
    path: Path
    intermediate_size: int = 0
    precision: abi.Precision = abi.FP32

    @functools.cached_property
    def rows_inputs(self) -> tuple[str, ...]:
        return tuple(abi.rows_input(j) for j in range(len(self.expert_ids)))

    @functools.cached_property
    def footprint_bytes(self) -> int:
        """Memory the function holds when loaded (the ABI's estimate for its size and precision)."""
        return abi.function_resident_bytes(self.size_bytes, len(self.expert_ids), self.hidden_size,
                                           self.intermediate_size, self.precision)

    @property
    def params_per_expert(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size

    @classmethod
    def from_file(cls, path: Path, function_id: str, size_bytes: int) -> FunctionInfo:
        """Validate the file against the function ABI (:mod:`faasmoe.proto.onnx_check`); InvalidRequest if not."""
        try:
            spec = check_function(path)
        except InvalidRequest as err:
            raise InvalidRequest(f"function {function_id} refused: {err}") from None
        return cls(function_id, size_bytes, spec.layer, spec.expert_ids, spec.hidden_size, spec.model_id, path,
                   spec.intermediate_size, spec.precision)
