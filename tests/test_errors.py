"""The one gRPC-to-error mapping (proto/errors.py), as a table: unary calls, in-band error replies and broken
invoke streams."""

from __future__ import annotations

import grpc
import pytest

from faasmoe.proto import errors as e

S = grpc.StatusCode


@pytest.mark.parametrize("code, details, cls", [
    (S.INVALID_ARGUMENT, "bad shape", e.InvalidRequest),
    (S.NOT_FOUND, "no such function", e.FunctionNotFound),
    (S.DATA_LOSS, "sha256 mismatch", e.IntegrityError),
    (S.RESOURCE_EXHAUSTED, "over the memory budget", e.NodeFull),
    (S.RESOURCE_EXHAUSTED, "backpressure: 8 calls wait", e.Backpressure),
    (S.UNAVAILABLE, "connection refused", e.NodeUnavailable),
    (S.CANCELLED, "cancelled", e.NodeUnavailable),
    (S.DEADLINE_EXCEEDED, "deadline", e.DeadlineExceeded),
    (S.PERMISSION_DENIED, "not this caller", e.Forbidden),
    (S.UNAUTHENTICATED, "no certificate", e.Forbidden),
    (S.INTERNAL, "boom", e.NodeInternalError),
    (S.UNKNOWN, None, e.NodeInternalError),
])
def test_from_grpc(code, details, cls):
    err = e.from_grpc(code, details, "n1")
    assert type(err) is cls and err.node == "n1" and str(err).startswith("n1: ")
    assert e.from_code_number(code.value[0], details or "", "n1").__class__ is cls     # the in-band reply


def test_backpressure_and_frame_too_large_are_not_a_full_node():
    for cls in (e.Backpressure, e.FrameTooLarge):
        assert not issubclass(cls, e.NodeFull) and issubclass(cls, e.MeshError)
        assert cls.grpc_code == S.RESOURCE_EXHAUSTED
    assert issubclass(e.DeadlineExceeded, e.NodeUnavailable)     # handled as unavailable where not told apart


def test_what_a_node_sends_comes_back_as_the_same_class():
    for err in (e.Backpressure("queue full"), e.NodeFull("no room"), e.InvalidRequest("bad"),
                e.DeadlineExceeded("late")):
        back = e.from_grpc(err.grpc_code, e.grpc_details(err), "n")
        assert type(back) is type(err) and err.detail in back.detail


class _Broken(grpc.RpcError):
    def __init__(self, code, details):
        self._code, self._details = code, details

    def code(self):
        return self._code

    def details(self):
        return self._details


@pytest.mark.parametrize("exc, cls", [
    (_Broken(S.RESOURCE_EXHAUSTED, "Received message larger than max (5 vs. 4)"), e.FrameTooLarge),
    (_Broken(S.RESOURCE_EXHAUSTED, "Too many concurrent RPCs"), e.Backpressure),
    (_Broken(S.UNAVAILABLE, "Socket closed"), e.NodeUnavailable),
    (_Broken(S.INTERNAL, "from Core"), e.NodeUnavailable),           # a killed peer
    (ConnectionResetError("reset"), e.NodeUnavailable),
])
def test_a_broken_stream(exc, cls):
    err = e.from_stream_error(exc, "n2")
    assert type(err) is cls and err.node == "n2"
