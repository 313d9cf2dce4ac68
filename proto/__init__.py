"""Wire contract shared by node and router: protobuf/gRPC code, tensor frames, errors."""

__version__ = "0.1.0"

# How a router-side tool starts a node: as its own program (``python -m NODE_PROGRAM``), never by import.
NODE_PROGRAM = "faasmoe.node"
