"""The one ONNX Runtime ``SessionOptions`` builder: the node's expert functions, the router's int8 dense
part and every benchmark build their sessions here, so that a measurement runs what serving runs.

- one intra-op pool of ``threads`` (or ONNX Runtime's global pool: ``global_pool=True``), sequential
  execution, no inter-op parallelism;
- no memory arena: freed tensors go back to malloc, so RSS falls when a function is released;
- no spinning: idle pools give their cores back (nodes and a router share a machine);
- warnings and errors only.
"""

from __future__ import annotations


def session_options(threads: int = 1, *, global_pool: bool = False, arena: bool = False):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.enable_cpu_mem_arena = arena
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if global_pool:                 # the global pool's spinning is not per session: stop it after each run
        opts.use_per_session_threads = False
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    else:
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return opts
