"""Send one pre-encoded KServe v2 ``ModelInfer`` message over real gRPC and describe the answer as JSON.

Runs in MLServer's venv (it has grpcio and MLServer's generated ``dataplane_pb2``), never ours:

    .venv-mlserver/bin/python benchmarks/mlserver/grpc_check.py HOST:PORT MESSAGE_FILE

The message is sent as it is (the bytes benchmarks/compare_protocols.py hands to h2load, without the
5-byte gRPC frame), so this checks exactly what the load generator sends: h2load sees only the HTTP
status (200 for any gRPC answer), while the gRPC status travels in the trailers. Prints
``{"code": "OK", "outputs": [[name, datatype, shape], ...], "raw": N}`` or ``{"code": ..., "details": ...}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import grpc
from mlserver.grpc import dataplane_pb2

METHOD = "/inference.GRPCInferenceService/ModelInfer"


def main(target: str, message_file: str) -> int:
    message = Path(message_file).read_bytes()
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            raw = call(message, timeout=10)
        except grpc.RpcError as exc:
            print(json.dumps({"code": exc.code().name, "details": exc.details()}))
            return 0
    reply = dataplane_pb2.ModelInferResponse.FromString(raw)
    print(json.dumps({"code": "OK", "outputs": [[o.name, o.datatype, list(o.shape)] for o in reply.outputs],
                      "raw": [len(r) for r in reply.raw_output_contents]}))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
