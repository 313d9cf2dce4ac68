"""Every router-to-node gRPC channel is made here (:func:`make_channel`): plaintext, or mutual TLS with the
cluster's credentials; the data plane's invoke streams and the control plane's calls alike."""

from __future__ import annotations

import grpc

from faasmoe.proto import methods
from faasmoe.proto.credentials import TlsMaterial, san_of
from faasmoe.proto.frames import DEFAULT_MAX_MESSAGE_BYTES


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.enable_retries", 0),
        # reconnect quickly after a node comes back (gRPC's default backoff grows to 120 s)
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.keepalive_time_ms", methods.CLIENT_PING_MS),             # see faasmoe.proto.methods
        ("grpc.keepalive_timeout_ms", methods.CLIENT_PING_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]


def make_channel(address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, *, aio: bool = False,
                 tls: TlsMaterial | None = None) -> grpc.Channel | grpc.aio.Channel:
    """Every router-to-node channel is made here (sync, or grpc.aio for the fan-out). With cluster ``tls`` it
    is mutual TLS: the node must present a certificate of the cluster CA, and the router presents its own."""
    options = channel_options(max_message_bytes)
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options) if aio else grpc.insecure_channel(address, options)
    creds = grpc.ssl_channel_credentials(root_certificates=tls.ca_pem, private_key=tls.key_pem,
                                         certificate_chain=tls.cert_pem)
    options = options + [("grpc.ssl_target_name_override", san_of("node"))]   # only node certificates pass
    if aio:
        return grpc.aio.secure_channel(address, creds, options=options)
    return grpc.secure_channel(address, creds, options=options)
