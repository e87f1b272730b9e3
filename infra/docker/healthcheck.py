#!/usr/bin/env python
"""Container health check of the retrieval service: grpc.health.v1 Check on the local port.

Exit 0 when the service answers SERVING, 1 otherwise (NOT_SERVING, unreachable, timeout). The
port and TLS come from the same settings the service uses (FRIENDREC_CONFIG, FRIENDREC_*), so
the check follows any port change. Health is exempt from the bearer token (serving/auth.py).
With TLS the server certificate must be valid for HEALTHCHECK_TLS_NAME (default
"localhost"); the CA is serving.tls_ca_file, or the server's own certificate when self-signed.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from friendrec.config import load_settings


def main() -> int:
    cfg = load_settings().serving
    target = f"127.0.0.1:{cfg.port}"
    if cfg.tls_cert_file is not None:
        root = (cfg.tls_ca_file or cfg.tls_cert_file).read_bytes()
        name = os.environ.get("HEALTHCHECK_TLS_NAME", "localhost")
        channel = grpc.secure_channel(
            target,
            grpc.ssl_channel_credentials(root_certificates=root),
            options=(("grpc.ssl_target_name_override", name),),
        )
    else:
        channel = grpc.insecure_channel(target)
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=3.0
        )
    except grpc.RpcError as exc:
        print(f"unhealthy: {exc.code().name}", file=sys.stderr)
        return 1
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
