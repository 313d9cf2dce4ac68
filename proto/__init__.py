"""Wire contract shared by node and router: protobuf/gRPC code, tensor frames, errors."""

__version__ = "0.1.0"
