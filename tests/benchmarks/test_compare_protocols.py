"""benchmarks/compare_protocols.py: its request encoders, decoded back by the real parsers (tritonclient's
binary request, MLServer's generated protobuf classes), and a target that fails its sample request
becoming an error row. No timing here: the rates are the benchmark's business."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _serving import REPO

VENV = Path(os.environ.get("MLSERVER_VENV") or REPO / ".venv-mlserver")


def _load(name: str):
    sys.path.insert(0, str(REPO / "benchmarks"))  # it imports its neighbours (load_test, compare_mlserver)
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


cp = _load("compare_protocols")


def _digits(n: int) -> np.ndarray:
    return np.random.default_rng(n).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


@pytest.mark.parametrize("n", [1, 64])
def test_binary_body_is_what_tritonclients_default_sends(n):
    import tritonclient.http as httpclient

    x = _digits(n)
    body, headers = cp.v2_binary_body(x)
    tensor = httpclient.InferInput("pixels", list(x.shape), "UINT8")
    tensor.set_data_from_numpy(x)  # binary_data=True: tritonclient's default
    theirs, json_size = httpclient.InferenceServerClient.generate_request_body(
        [tensor], outputs=[httpclient.InferRequestedOutput("logits", binary_data=True)])
    ours_size = int(headers["inference-header-content-length"])
    assert body[ours_size:] == theirs[json_size:] == x.tobytes()
    ours_head, their_head = json.loads(body[:ours_size]), json.loads(theirs[:json_size])
    assert ours_head["inputs"] == their_head["inputs"]
    assert ours_head["outputs"] == their_head["outputs"]


@pytest.mark.parametrize("n", [1, 64])
def test_grpc_message_decodes_with_the_protocols_generated_classes(n):
    if not (VENV / "bin" / "python").exists():
        pytest.skip(f"no {VENV} (bash scripts/mlserver_env.sh): MLServer's generated dataplane_pb2 lives there")
    x = _digits(n)
    message = cp.grpc_infer_message("mlp", x)
    frame = cp.grpc_frame(message)
    assert frame[0] == 0 and int.from_bytes(frame[1:5], "big") == len(message) and frame[5:] == message
    code = ("import sys, json\nfrom mlserver.grpc import dataplane_pb2 as pb\n"
            "m = pb.ModelInferRequest.FromString(sys.stdin.buffer.read())\n"
            "print(json.dumps({'model': m.model_name, 'inputs': [[t.name, t.datatype, list(t.shape)] for t in m.inputs],"
            " 'outputs': [o.name for o in m.outputs], 'raw': [r.hex() for r in m.raw_input_contents]}))")
    r = subprocess.run([str(VENV / "bin" / "python"), "-c", code], input=message, capture_output=True, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    decoded = json.loads(r.stdout)
    assert decoded["model"] == "mlp"
    assert decoded["inputs"] == [["pixels", "UINT8", [n, 28, 28]]]
    assert decoded["outputs"] == ["logits"]
    assert [bytes.fromhex(h) for h in decoded["raw"]] == [x.tobytes()]


def test_a_target_that_fails_its_sample_is_an_error_row_and_nothing_runs(tmp_path):
    unavailable = cp.Target("ours gRPC", 1, "http://127.0.0.1:1/x", b"", {}, grpc=True, unavailable="no --grpc-port")
    refused = cp.Target("ours v2 binary", 64, "http://127.0.0.1:1/x", b"", {},
                        check=lambda: "HTTP 400: binary tensor data extension not supported")
    rows = [cp.measure(t, tmp_path, connections=2, duration=1, warmup=0) for t in (unavailable, refused)]
    assert [(r.errors, r.req_s, r.note) for r in rows] == [
        (1, None, "not measured: no --grpc-port"),
        (1, None, "not measured: HTTP 400: binary tensor data extension not supported")]
    assert not list(tmp_path.iterdir())  # h2load never started
    table = cp.table(rows)
    assert table.count("\n") == 3 and "| ours gRPC | 1 | - | - | - | - | 0 | 1 | not measured" in table


# h2load's summary lines as it printed them (nghttp2 h2load, --warm-up-time 1, 64 connections against
# /predict): every request succeeded, but the status-code count, zeroed when the measurement began, is one
# off either way for a request answered across that moment (its --log-file line says status 0).
_H2LOAD = """finished in 4.01s, {rate} req/s, 1.2MB/s
requests: {done} total, {done} started, {done} done, {ok} succeeded, {failed} failed, {errored} errored, 0 timeout
status codes: {c2} 2xx, 0 3xx, {c4} 4xx, 0 5xx
"""


@pytest.mark.parametrize(("done", "ok", "failed", "errored", "c2", "c4", "errors"), [
    (5627, 5627, 0, 0, 5626, 0, 0),  # one 200 counted before the measurement: not an error
    (6327, 6327, 0, 0, 6328, 0, 0),  # one counted twice
    (1000, 990, 10, 3, 993, 7, 10),  # 7 answered 4xx, 3 streams reset: 10 errors
])
def test_errors_are_what_h2load_counts_as_failed(done, ok, failed, errored, c2, c4, errors):
    counts = cp.parse_h2load(_H2LOAD.format(rate=1000.0, done=done, ok=ok, failed=failed, errored=errored,
                                            c2=c2, c4=c4))
    got, rate = cp.errors_and_rate(counts)
    assert got == errors
    assert rate == pytest.approx(1000.0 * (done - errors) / done)
