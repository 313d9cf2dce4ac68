from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TensorSpec(_message.Message):
    __slots__ = ("dtype", "shape")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class FunctionHeader(_message.Message):
    __slots__ = ("function_id", "size_bytes", "layer", "expert_ids", "model_id", "dtype", "owner", "footprint_bytes")
    FUNCTION_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    FOOTPRINT_BYTES_FIELD_NUMBER: _ClassVar[int]
    function_id: str
    size_bytes: int
    layer: int
    expert_ids: _containers.RepeatedScalarFieldContainer[int]
    model_id: str
    dtype: str
    owner: str
    footprint_bytes: int
    def __init__(self, function_id: _Optional[str] = ..., size_bytes: _Optional[int] = ..., layer: _Optional[int] = ..., expert_ids: _Optional[_Iterable[int]] = ..., model_id: _Optional[str] = ..., dtype: _Optional[str] = ..., owner: _Optional[str] = ..., footprint_bytes: _Optional[int] = ...) -> None: ...

class DeployChunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: FunctionHeader
    data: bytes
    def __init__(self, header: _Optional[_Union[FunctionHeader, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class DeployReply(_message.Message):
    __slots__ = ("function_id", "already_present", "deployed_bytes")
    FUNCTION_ID_FIELD_NUMBER: _ClassVar[int]
    ALREADY_PRESENT_FIELD_NUMBER: _ClassVar[int]
    DEPLOYED_BYTES_FIELD_NUMBER: _ClassVar[int]
    function_id: str
    already_present: bool
    deployed_bytes: int
    def __init__(self, function_id: _Optional[str] = ..., already_present: _Optional[bool] = ..., deployed_bytes: _Optional[int] = ...) -> None: ...

class UndeployRequest(_message.Message):
    __slots__ = ("function_id", "owner")
    FUNCTION_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    function_id: str
    owner: str
    def __init__(self, function_id: _Optional[str] = ..., owner: _Optional[str] = ...) -> None: ...

class UndeployReply(_message.Message):
    __slots__ = ("was_deployed", "deployed_bytes", "released")
    WAS_DEPLOYED_FIELD_NUMBER: _ClassVar[int]
    DEPLOYED_BYTES_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    was_deployed: bool
    deployed_bytes: int
    released: bool
    def __init__(self, was_deployed: _Optional[bool] = ..., deployed_bytes: _Optional[int] = ..., released: _Optional[bool] = ...) -> None: ...

class FunctionCall(_message.Message):
    __slots__ = ("function_id", "row_count", "expert_count")
    FUNCTION_ID_FIELD_NUMBER: _ClassVar[int]
    ROW_COUNT_FIELD_NUMBER: _ClassVar[int]
    EXPERT_COUNT_FIELD_NUMBER: _ClassVar[int]
    function_id: str
    row_count: int
    expert_count: int
    def __init__(self, function_id: _Optional[str] = ..., row_count: _Optional[int] = ..., expert_count: _Optional[int] = ...) -> None: ...

class InvokeRequest(_message.Message):
    __slots__ = ("request_id", "tenant_id", "caller", "layer", "hidden", "calls", "rows", "counts")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    tenant_id: str
    caller: str
    layer: int
    hidden: TensorSpec
    calls: _containers.RepeatedCompositeFieldContainer[FunctionCall]
    rows: TensorSpec
    counts: TensorSpec
    def __init__(self, request_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., caller: _Optional[str] = ..., layer: _Optional[int] = ..., hidden: _Optional[_Union[TensorSpec, _Mapping]] = ..., calls: _Optional[_Iterable[_Union[FunctionCall, _Mapping]]] = ..., rows: _Optional[_Union[TensorSpec, _Mapping]] = ..., counts: _Optional[_Union[TensorSpec, _Mapping]] = ...) -> None: ...

class CallResult(_message.Message):
    __slots__ = ("function_id", "output", "compute_s", "cold_start", "load_s")
    FUNCTION_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    COLD_START_FIELD_NUMBER: _ClassVar[int]
    LOAD_S_FIELD_NUMBER: _ClassVar[int]
    function_id: str
    output: TensorSpec
    compute_s: float
    cold_start: bool
    load_s: float
    def __init__(self, function_id: _Optional[str] = ..., output: _Optional[_Union[TensorSpec, _Mapping]] = ..., compute_s: _Optional[float] = ..., cold_start: _Optional[bool] = ..., load_s: _Optional[float] = ...) -> None: ...

class InvokeReply(_message.Message):
    __slots__ = ("request_id", "node_id", "results", "node_s", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    NODE_S_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    node_id: str
    results: _containers.RepeatedCompositeFieldContainer[CallResult]
    node_s: float
    error: CallError
    def __init__(self, request_id: _Optional[str] = ..., node_id: _Optional[str] = ..., results: _Optional[_Iterable[_Union[CallResult, _Mapping]]] = ..., node_s: _Optional[float] = ..., error: _Optional[_Union[CallError, _Mapping]] = ...) -> None: ...

class CallError(_message.Message):
    __slots__ = ("code", "details", "missing_functions")
    CODE_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    MISSING_FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    code: int
    details: str
    missing_functions: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, code: _Optional[int] = ..., details: _Optional[str] = ..., missing_functions: _Optional[_Iterable[str]] = ...) -> None: ...

class LoadRequest(_message.Message):
    __slots__ = ("function_ids", "wait")
    FUNCTION_IDS_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    function_ids: _containers.RepeatedScalarFieldContainer[str]
    wait: bool
    def __init__(self, function_ids: _Optional[_Iterable[str]] = ..., wait: _Optional[bool] = ...) -> None: ...

class LoadReply(_message.Message):
    __slots__ = ("loaded", "missing")
    LOADED_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    loaded: _containers.RepeatedScalarFieldContainer[str]
    missing: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, loaded: _Optional[_Iterable[str]] = ..., missing: _Optional[_Iterable[str]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class FunctionStatus(_message.Message):
    __slots__ = ("function_id", "layer", "expert_ids", "size_bytes", "loaded", "idle_s", "invocations", "in_flight", "resident_bytes", "model_id", "expert_calls_window", "owners", "rows", "compute_s", "rows_by_caller", "precision", "block_size", "footprint_bytes", "rss_delta_bytes", "wait_s", "waits")
    class RowsByCallerEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    FUNCTION_ID_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_IDS_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOADED_FIELD_NUMBER: _ClassVar[int]
    IDLE_S_FIELD_NUMBER: _ClassVar[int]
    INVOCATIONS_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERT_CALLS_WINDOW_FIELD_NUMBER: _ClassVar[int]
    OWNERS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    ROWS_BY_CALLER_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    FOOTPRINT_BYTES_FIELD_NUMBER: _ClassVar[int]
    RSS_DELTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    WAITS_FIELD_NUMBER: _ClassVar[int]
    function_id: str
    layer: int
    expert_ids: _containers.RepeatedScalarFieldContainer[int]
    size_bytes: int
    loaded: bool
    idle_s: float
    invocations: int
    in_flight: int
    resident_bytes: int
    model_id: str
    expert_calls_window: _containers.RepeatedScalarFieldContainer[int]
    owners: _containers.RepeatedScalarFieldContainer[str]
    rows: int
    compute_s: float
    rows_by_caller: _containers.ScalarMap[str, int]
    precision: str
    block_size: int
    footprint_bytes: int
    rss_delta_bytes: int
    wait_s: float
    waits: int
    def __init__(self, function_id: _Optional[str] = ..., layer: _Optional[int] = ..., expert_ids: _Optional[_Iterable[int]] = ..., size_bytes: _Optional[int] = ..., loaded: _Optional[bool] = ..., idle_s: _Optional[float] = ..., invocations: _Optional[int] = ..., in_flight: _Optional[int] = ..., resident_bytes: _Optional[int] = ..., model_id: _Optional[str] = ..., expert_calls_window: _Optional[_Iterable[int]] = ..., owners: _Optional[_Iterable[str]] = ..., rows: _Optional[int] = ..., compute_s: _Optional[float] = ..., rows_by_caller: _Optional[_Mapping[str, int]] = ..., precision: _Optional[str] = ..., block_size: _Optional[int] = ..., footprint_bytes: _Optional[int] = ..., rss_delta_bytes: _Optional[int] = ..., wait_s: _Optional[float] = ..., waits: _Optional[int] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("node_id", "version", "profile", "memory_budget_bytes", "deployed_bytes", "loaded_bytes", "disk_budget_bytes", "disk_used_bytes", "threads", "rss_bytes", "keep_alive_s", "functions", "queue_depth", "capacity_bytes", "heat_window_s", "max_message_bytes", "max_concurrent_rpcs", "max_inflight_bytes")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEPLOYED_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOADED_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    THREADS_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    KEEP_ALIVE_S_FIELD_NUMBER: _ClassVar[int]
    FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    HEAT_WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_RPCS_FIELD_NUMBER: _ClassVar[int]
    MAX_INFLIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    version: str
    profile: str
    memory_budget_bytes: int
    deployed_bytes: int
    loaded_bytes: int
    disk_budget_bytes: int
    disk_used_bytes: int
    threads: int
    rss_bytes: int
    keep_alive_s: float
    functions: _containers.RepeatedCompositeFieldContainer[FunctionStatus]
    queue_depth: int
    capacity_bytes: int
    heat_window_s: float
    max_message_bytes: int
    max_concurrent_rpcs: int
    max_inflight_bytes: int
    def __init__(self, node_id: _Optional[str] = ..., version: _Optional[str] = ..., profile: _Optional[str] = ..., memory_budget_bytes: _Optional[int] = ..., deployed_bytes: _Optional[int] = ..., loaded_bytes: _Optional[int] = ..., disk_budget_bytes: _Optional[int] = ..., disk_used_bytes: _Optional[int] = ..., threads: _Optional[int] = ..., rss_bytes: _Optional[int] = ..., keep_alive_s: _Optional[float] = ..., functions: _Optional[_Iterable[_Union[FunctionStatus, _Mapping]]] = ..., queue_depth: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., heat_window_s: _Optional[float] = ..., max_message_bytes: _Optional[int] = ..., max_concurrent_rpcs: _Optional[int] = ..., max_inflight_bytes: _Optional[int] = ...) -> None: ...
