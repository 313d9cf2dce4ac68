"""The one exception tree of faasmoe, shared by node and router.

    FaasmoeError
    ├── ConfigError              bad flags, profile or environment               (CLI exit 2)
    ├── CheckpointError          malformed or unsupported checkpoint / store
    ├── PlacementError           functions do not fit the nodes' budgets
    ├── MeshError                anything that happened talking to a node
    │   ├── InvalidRequest       wrong dtype / shape / length, bad frame      INVALID_ARGUMENT
    │   ├── FunctionNotFound     function id unknown on that node               NOT_FOUND
    │   ├── IntegrityError       deployed bytes do not match their sha256       DATA_LOSS
    │   ├── NodeFull             over the memory or disk budget: it cannot hold this  RESOURCE_EXHAUSTED
    │   ├── Backpressure         bounded wait queue full: retry later, not a failure  RESOURCE_EXHAUSTED "backpressure: "
    │   ├── FrameTooLarge        a frame over a message limit: split it, the node is fine  (a stream's RESOURCE_EXHAUSTED)
    │   ├── Forbidden            the caller's identity may not do this         PERMISSION_DENIED / UNAUTHENTICATED
    │   ├── NodeUnavailable      unreachable, crashed, or a broken stream       UNAVAILABLE / CANCELLED
    │   │   └── DeadlineExceeded a call that ran past its deadline              DEADLINE_EXCEEDED
    │   └── NodeInternalError    anything else the node reports                 INTERNAL / UNKNOWN
    └── ServingError             the router's serving engine refused or failed a request
        ├── BadRequest           a request that cannot be served as asked         HTTP 400
        ├── Unauthorized         no key, a wrong key, or not the admin key         HTTP 401
        ├── RateLimited          over a tenant's limit: retry after the limit allows  HTTP 429 + Retry-After
        ├── UnknownModel         a model this server does not serve               HTTP 404
        ├── Overloaded           the admission queue is full: retry later         HTTP 503 + Retry-After
        └── StepFailed           the mesh failed the step the request was in      HTTP 503

HTTP statuses are mapped to the serving errors in ``faasmoe.router.api.errors`` and only there.
gRPC status codes are mapped to this tree here and only here: nodes raise these errors and abort with
``err.grpc_code``; routers turn a failed unary call into an error with :func:`from_grpc`, an in-band error
reply with :func:`from_code_number` and a broken invoke stream with :func:`from_stream_error`.
"""

from __future__ import annotations

import grpc


class FaasmoeError(Exception):
    """Root of every error faasmoe raises on purpose. ``str(err)`` is a one-line message."""

    grpc_code = grpc.StatusCode.INTERNAL


class ConfigError(FaasmoeError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class CheckpointError(FaasmoeError):
    pass


class PlacementError(FaasmoeError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class MeshError(FaasmoeError):
    def __init__(self, message: str, node: str | None = None):
        super().__init__(f"{node}: {message}" if node else message)
        self.node = node
        self.detail = message


class InvalidRequest(MeshError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT


class FunctionNotFound(MeshError):
    grpc_code = grpc.StatusCode.NOT_FOUND

    def __init__(self, message: str, node: str | None = None, missing: tuple[str, ...] = ()):
        super().__init__(message, node)
        self.missing = tuple(missing)       # the function ids the node does not hold, when known


class IntegrityError(MeshError):
    grpc_code = grpc.StatusCode.DATA_LOSS


class NodeFull(MeshError):
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Backpressure(MeshError):
    """The node's bounded wait queue is full. Callers back off and retry; it is not a failure."""
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FrameTooLarge(MeshError):
    """A frame exceeded the sender's or the node's message size limit. Callers split it; the node is fine."""
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED


BACKPRESSURE_PREFIX = "backpressure: "


class Forbidden(MeshError):
    grpc_code = grpc.StatusCode.PERMISSION_DENIED


class NodeUnavailable(MeshError):
    grpc_code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(NodeUnavailable):
    """A node gave up on a call that ran past its own deadline (a Deploy stream that did not arrive)."""
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED


class NodeInternalError(MeshError):
    grpc_code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[MeshError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: FunctionNotFound,
    grpc.StatusCode.DATA_LOSS: IntegrityError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: NodeFull,
    grpc.StatusCode.UNAVAILABLE: NodeUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: NodeUnavailable,
    grpc.StatusCode.PERMISSION_DENIED: Forbidden,
    grpc.StatusCode.UNAUTHENTICATED: Forbidden,
}


def grpc_details(err: FaasmoeError) -> str:
    """The details string a node sends for ``err`` (backpressure is tagged so routers can tell)."""
    detail = getattr(err, "detail", str(err))
    return BACKPRESSURE_PREFIX + detail if isinstance(err, Backpressure) else detail


_CODE_OF_NUMBER = {c.value[0]: c for c in grpc.StatusCode}


def code_number(err: FaasmoeError) -> int:
    """``err``'s gRPC status code as the number carried in an InvokeStream error reply."""
    return err.grpc_code.value[0]


def from_code_number(number: int, details: str, node: str) -> MeshError:
    """The error a router raises for an InvokeStream request that the node answered with an error."""
    return from_grpc(_CODE_OF_NUMBER.get(number, grpc.StatusCode.UNKNOWN), details, node)


def from_grpc(code: grpc.StatusCode, details: str | None, node: str) -> MeshError:
    """The error a router raises for a failed call to ``node``."""
    details = details or code.name.lower()
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and details.startswith(BACKPRESSURE_PREFIX):
        return Backpressure(details[len(BACKPRESSURE_PREFIX):], node=node)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"missed the deadline ({details})", node=node)
    cls = _BY_CODE.get(code, NodeInternalError)
    return cls(details, node=node)


def from_stream_error(exc: BaseException, node: str) -> MeshError:
    """The error a router raises when its invoke stream to ``node`` breaks. Requests fail in-band (an error
    reply), so a failed stream means the node or the link went away (a killed peer surfaces as UNAVAILABLE,
    CANCELLED or even INTERNAL "from Core"), except for gRPC's own limits: RESOURCE_EXHAUSTED is a frame over
    a message limit, or the node's concurrent-call limit (backpressure)."""
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        code, details = exc.code(), exc.details()
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "concurrent rpc" in (details or "").lower():
            return Backpressure(f"the node is at its concurrent-call limit ({details})", node=node)
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return FrameTooLarge(f"a frame exceeded a message limit ({details})", node=node)
        return NodeUnavailable(f"invoke stream failed ({code.name}: {details})", node=node)
    return NodeUnavailable(f"invoke stream broke ({type(exc).__name__}: {exc})", node=node)


def from_rpc_error(exc: BaseException, node: str) -> MeshError:
    """:func:`from_grpc` for a raised ``grpc.RpcError`` (a failed unary call)."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return from_grpc(code, details, node)


class ServingError(FaasmoeError):
    pass


class BadRequest(ServingError):
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param              # the offending request field, when there is one


class Unauthorized(ServingError):
    grpc_code = grpc.StatusCode.UNAUTHENTICATED


class RetryLater(ServingError):
    """Refused for now; the caller may retry after ``retry_after_s`` (HTTP Retry-After)."""
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RateLimited(RetryLater):
    """A tenant's limit (429)."""


class UnknownModel(ServingError):
    grpc_code = grpc.StatusCode.NOT_FOUND


class Overloaded(RetryLater):
    """The server's queue is full (503)."""


class StepFailed(ServingError):
    grpc_code = grpc.StatusCode.UNAVAILABLE
