"""The Open Inference Protocol over gRPC (mnist_deploy/serve/grpc_v2.py).

Against the real `mnist-deploy serve` process (two workers on one gRPC port): Triton's own client,
tritonclient[grpc], from its own venv (.venv-tritonclient, scripts/tritonclient_env.sh: its protobuf<7
clashes with onnx's), run as a subprocess (_triton_grpc_client.py); logits compared with the PyTorch model.
In this process: grpcio's stub generated from our .proto, for what tritonclient cannot send (typed
contents, malformed requests), the batcher shared with HTTP, and the metrics. And SIGTERM with calls in
flight, on a real server process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from _serving import mnist_test_digits, serve_process

from mnist_deploy.data.mnist import normalize_pixels
from mnist_deploy.predict import load_model

REPO = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("TRITONCLIENT_VENV") or REPO / ".venv-tritonclient")
CLIENT = Path(__file__).with_name("_triton_grpc_client.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def torch_model(served):
    return load_model(artifacts=served, runtime="pytorch")


@pytest.fixture(scope="module")
def digits(mnist_dir):
    return mnist_test_digits(mnist_dir, 64)


@pytest.fixture(scope="module", autouse=True)
def _module_cache(tmp_path_factory):
    """The session's cache (conftest's ``_isolate_env``) for this module's own fixtures too, which run before
    that function-scoped one: the generated gRPC modules go there, never to ~/.cache, servers included."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MNIST_DEPLOY_CACHE", str(tmp_path_factory.getbasetemp() / "env-cache"))
        yield


@pytest.fixture(scope="module")
def protos():
    from mnist_deploy.serve.protos import load_protos

    return load_protos()


def _stub(port: int, protos):
    import grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=30)
    return channel, protos[1].GRPCInferenceServiceStub(channel)


def _pixels_request(pb2, model: str, images: np.ndarray, **fields):
    req = pb2.ModelInferRequest(model_name=model, raw_input_contents=[images.astype(np.uint8).tobytes()], **fields)
    req.inputs.add(name="pixels", datatype="UINT8", shape=[len(images), 28, 28])
    return req


def _logits(reply, index: int = 0) -> np.ndarray:
    return np.frombuffer(reply.raw_output_contents[index], "<f4").reshape(list(reply.outputs[index].shape))


# ---------------------------------------------------------------------------------------------------------
# tritonclient[grpc] against the real server, two workers.


@pytest.fixture(scope="session")  # session scope: set up before `served`, so no training when it is missing
def tritonclient_venv() -> Path:
    if not (VENV / "bin" / "python").exists():
        msg = f"tritonclient[grpc] is not installed in {VENV} (bash scripts/tritonclient_env.sh creates it)"
        if os.environ.get("MNIST_DEPLOY_REQUIRE_SYSTEM_TOOLS"):
            pytest.fail(msg)
        pytest.skip(msg)
    return VENV


@pytest.fixture(scope="module")
def triton_run(tritonclient_venv, served, torch_model, digits, tmp_path_factory):
    """One run of the client script against `serve --workers 2 --grpc-port P`: (report, logits, metrics text)."""
    tmp = tmp_path_factory.mktemp("triton-grpc")
    images = digits[0]
    np.savez(tmp / "in.npz", pixels=images, input=normalize_pixels(images))
    name = torch_model.manifest["model"]["name"]
    port = free_port()
    with serve_process(served, "--workers", "2", "--grpc-port", str(port), "--log-level", "warning") as (url, proc):
        run = subprocess.run([str(tritonclient_venv / "bin" / "python"), str(CLIENT), f"127.0.0.1:{port}", name,
                              f"{name}-pixels", str(tmp / "in.npz"), str(tmp / "out.npz")],
                             capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, f"{run.stderr}\nserver log:\n{Path(proc.log_path).read_text()}"
        metrics = httpx.get(f"{url}/metrics").text
    return json.loads(run.stdout), dict(np.load(tmp / "out.npz")), metrics


@pytest.mark.integration
def test_tritonclient_health_and_metadata(triton_run, torch_model):
    report, _, _ = triton_run
    name = torch_model.manifest["model"]["name"]
    assert report["live"] is True and report["ready"] is True and report["model_ready"] == [True, True, True]
    assert report["server"]["name"] == "mnist-deploy" and report["server"]["version"]
    meta = report["metadata"]
    assert meta[name]["inputs"] == {"input": ["FP32", [-1, 784]]} and meta[name]["versions"] == ["1"]
    assert meta[f"{name}-pixels"]["inputs"] == {"pixels": ["UINT8", [-1, 28, 28]]}
    for m in meta.values():
        assert m["outputs"] == {"logits": ["FP32", [-1, 10]], "probabilities": ["FP32", [-1, 10]]}


@pytest.mark.integration
@pytest.mark.parametrize("batch", [1, 64])
@pytest.mark.parametrize("kind", ["input", "pixels"])
def test_tritonclient_infer_matches_the_pytorch_model(triton_run, torch_model, digits, batch, kind):
    report, results, _ = triton_run
    name = torch_model.manifest["model"]["name"]
    want = torch_model.logits(normalize_pixels(digits[0][:batch]))
    logits = results[f"{kind}-{batch}"]
    assert logits.shape == (batch, 10) and logits.dtype == np.float32
    np.testing.assert_allclose(logits, want, atol=1e-4, rtol=1e-4)
    probs = results[f"{kind}-{batch}-probabilities"]
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (probs.argmax(axis=1) == want.argmax(axis=1)).all()
    assert report[f"{kind}-{batch}"] == {"id": f"{kind}-{batch}",
                                         "model_name": name if kind == "input" else f"{name}-pixels"}


@pytest.mark.integration
def test_tritonclient_errors_are_the_right_status_codes(triton_run):
    report, _, metrics = triton_run
    got = {case: r["status"] for case, r in report["errors"].items()}
    assert got == {
        "unknown model": "StatusCode.NOT_FOUND", "unknown version": "StatusCode.NOT_FOUND",
        "model ready, unknown model": "StatusCode.NOT_FOUND", "metadata, unknown model": "StatusCode.NOT_FOUND",
        "wrong datatype": "StatusCode.INVALID_ARGUMENT", "unknown input": "StatusCode.INVALID_ARGUMENT",
        "not 28x28": "StatusCode.INVALID_ARGUMENT", "FP32 out of range": "StatusCode.INVALID_ARGUMENT",
        "over the size limit": "StatusCode.RESOURCE_EXHAUSTED", "Triton-only method": "StatusCode.UNIMPLEMENTED",
        "classification (class_count)": "StatusCode.INVALID_ARGUMENT",
    }
    assert "probabilities" in report["errors"]["classification (class_count)"]["message"]
    assert "no-such-model" in report["errors"]["unknown model"]["message"]
    assert "normalised pixels" in report["errors"]["FP32 out of range"]["message"]
    # The workers' counts, summed by /metrics whichever worker answered it: 2 inputs x 2 batch sizes.
    ok = [line for line in metrics.splitlines()
          if line.startswith('mnist_deploy_grpc_requests_total{code="OK",method="ModelInfer"}')]
    assert ok and float(ok[0].split()[-1]) == 4.0, ok


# ---------------------------------------------------------------------------------------------------------
# grpcio's own stub, in this process.


@pytest.fixture
def grpc_app(model, live):
    """(app, gRPC port, HTTP url) of an app serving gRPC on a free port, with the batcher waiting 0.3 s."""
    from mnist_deploy.serve import create_app

    port = free_port()
    app = create_app(model=model, grpc_port=port, max_batch_size=64, max_queue_delay_us=300_000)
    with live(app) as url:
        yield app, port, url


def _typed_request(pb2, model: str, name: str, values: np.ndarray):
    req = pb2.ModelInferRequest(model_name=model)
    t = req.inputs.add(name=name, datatype="FP32" if name == "input" else "UINT8", shape=list(values.shape))
    field = t.contents.fp32_contents if name == "input" else t.contents.uint_contents
    field.extend(values.ravel().tolist())
    return req


@pytest.mark.integration
def test_typed_contents_match_the_pytorch_model(grpc_app, protos, torch_model, digits):
    app, port, _ = grpc_app
    pb2 = protos[0]
    name = torch_model.manifest["model"]["name"]
    images = digits[0][:64]
    want = torch_model.logits(normalize_pixels(images))
    channel, stub = _stub(port, protos)
    with channel:
        by_pixels = stub.ModelInfer(_typed_request(pb2, f"{name}-pixels", "pixels", images.reshape(64, 784)))
        by_input = stub.ModelInfer(_typed_request(pb2, name, "input", normalize_pixels(images)))
    for reply in (by_pixels, by_input):
        assert [o.name for o in reply.outputs] == ["logits"] and len(reply.raw_output_contents) == 1
        np.testing.assert_allclose(_logits(reply), want, atol=1e-4, rtol=1e-4)


def _bad_requests(pb2, name: str, image: np.ndarray) -> dict:
    """Requests tritonclient cannot make, each with the status it must get and a word of its message."""
    ok = _pixels_request(pb2, f"{name}-pixels", image)
    both = _pixels_request(pb2, f"{name}-pixels", image)
    both.inputs[0].contents.uint_contents.extend([0] * 784)
    short = _pixels_request(pb2, f"{name}-pixels", image)
    short.raw_input_contents[0] = image.tobytes()[:-1]
    two_raw = _pixels_request(pb2, f"{name}-pixels", image)
    two_raw.raw_input_contents.append(image.tobytes())
    two_inputs = _pixels_request(pb2, f"{name}-pixels", image)
    two_inputs.inputs.add(name="pixels", datatype="UINT8", shape=[1, 28, 28])
    no_data = _pixels_request(pb2, f"{name}-pixels", image)
    del no_data.raw_input_contents[:]
    too_bright = _typed_request(pb2, f"{name}-pixels", "pixels", np.full((1, 784), 300))
    nan = _typed_request(pb2, name, "input", np.full((1, 784), np.nan, np.float32))
    repeated = _pixels_request(pb2, f"{name}-pixels", image)
    repeated.outputs.add(name="logits")
    repeated.outputs.add(name="logits")
    unknown_output = _pixels_request(pb2, f"{name}-pixels", image)
    unknown_output.outputs.add(name="nope")
    over_batch = _pixels_request(pb2, f"{name}-pixels", np.zeros((257, 28, 28), np.uint8))
    wrong_form = _typed_request(pb2, f"{name}-pixels", "input", np.zeros((1, 784), np.float32))
    version = _pixels_request(pb2, f"{name}-pixels", image, model_version="2")
    return {
        "both contents and raw": (both, "INVALID_ARGUMENT", "both"),
        "one byte short": (short, "INVALID_ARGUMENT", "bytes"),
        "two raw entries": (two_raw, "INVALID_ARGUMENT", "one entry per input"),
        "two inputs": (two_inputs, "INVALID_ARGUMENT", "one input"),
        "no data": (no_data, "INVALID_ARGUMENT", "no data"),
        "pixel 300": (too_bright, "INVALID_ARGUMENT", "0..255"),
        "NaN": (nan, "INVALID_ARGUMENT", "finite"),
        "an output twice": (repeated, "INVALID_ARGUMENT", "at most once"),
        "unknown output": (unknown_output, "INVALID_ARGUMENT", "outputs"),
        "257 images": (over_batch, "INVALID_ARGUMENT", "at most 256"),
        "input to the pixels model": (wrong_form, "INVALID_ARGUMENT", f"model '{name}'"),
        "unknown version": (version, "NOT_FOUND", "version"),
        "fine": (ok, "OK", ""),
    }


@pytest.mark.integration
def test_malformed_requests_get_invalid_argument_and_are_counted(grpc_app, protos, torch_model, digits):
    import grpc

    app, port, _ = grpc_app
    name = torch_model.manifest["model"]["name"]
    cases = _bad_requests(protos[0], name, digits[0][:1])
    channel, stub = _stub(port, protos)
    got = {}
    with channel:
        for case, (req, _, _) in cases.items():
            try:
                stub.ModelInfer(req, timeout=30)
                got[case] = ("OK", "")
            except grpc.RpcError as exc:
                got[case] = (exc.code().name, exc.details())
        try:  # a method of Triton's .proto that this service does not have
            channel.unary_unary("/inference.GRPCInferenceService/ModelStatistics")(b"", timeout=30)
        except grpc.RpcError as exc:
            got["Triton-only method"] = (exc.code().name, "")
    for case, (_, code, word) in cases.items():
        assert got[case][0] == code and word in got[case][1], (case, got[case])
    assert got["Triton-only method"][0] == "UNIMPLEMENTED"
    text = app.service.render_metrics()
    assert 'mnist_deploy_grpc_requests_total{code="INVALID_ARGUMENT",method="ModelInfer"} 11.0' in text
    assert 'mnist_deploy_grpc_requests_total{code="NOT_FOUND",method="ModelInfer"} 1.0' in text
    assert 'mnist_deploy_grpc_requests_total{code="OK",method="ModelInfer"} 1.0' in text


@pytest.mark.integration
def test_a_grpc_and_an_http_request_share_one_batch(grpc_app, protos, torch_model, digits):
    """The batcher waits 0.3 s for company: a gRPC call and an HTTP v2 call sent together are one model call."""
    app, port, url = grpc_app
    name = torch_model.manifest["model"]["name"]
    images = digits[0][:2]
    channel, stub = _stub(port, protos)
    with channel:
        stub.ServerLive(protos[0].ServerLiveRequest())  # connected before the clock starts
        future = stub.ModelInfer.future(_pixels_request(protos[0], f"{name}-pixels", images[:1]))
        http = httpx.post(f"{url}/v2/models/{name}-pixels/infer", timeout=30, json={"inputs": [
            {"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28], "data": images[1].ravel().tolist()}]})
        reply = future.result(timeout=30)
    want = torch_model.logits(normalize_pixels(images))
    np.testing.assert_allclose(_logits(reply), want[:1], atol=1e-4, rtol=1e-4)
    assert http.status_code == 200, http.text
    np.testing.assert_allclose(np.array(http.json()["outputs"][0]["data"]).reshape(1, 10), want[1:], atol=1e-4)
    text = app.service.render_metrics()
    assert "mnist_deploy_batch_size_count 1.0" in text and "mnist_deploy_batch_size_sum 2.0" in text, text


@pytest.mark.integration
def test_readiness_follows_the_drain(grpc_app, protos, torch_model):
    import grpc

    app, port, _ = grpc_app
    pb2 = protos[0]
    name = torch_model.manifest["model"]["name"]
    channel, stub = _stub(port, protos)
    with channel:
        assert stub.ServerReady(pb2.ServerReadyRequest()).ready
        assert stub.ModelReady(pb2.ModelReadyRequest(name=f"{name}-pixels")).ready
        with pytest.raises(grpc.RpcError) as exc:
            stub.ModelReady(pb2.ModelReadyRequest(name="nope"))
        assert exc.value.code() == grpc.StatusCode.NOT_FOUND
        app.service.begin_drain()  # what SIGTERM does: not ready at once, then no new calls after a grace
        assert not stub.ServerReady(pb2.ServerReadyRequest()).ready
        assert not stub.ModelReady(pb2.ModelReadyRequest(name=f"{name}-pixels")).ready
        assert _refused_within(port, protos, 10.0), "the gRPC server still takes calls 10 s after the drain began"


@pytest.mark.integration
def test_a_call_the_drain_holds_is_answered_unavailable_once_released_and_counted(grpc_app, protos):
    """The drain's gate (DrainGate), closed by hand: a call is held, unanswered, until the gate is released,
    then answered UNAVAILABLE with DRAIN_REFUSAL (not run: safe to send again) and counted in /metrics."""
    import grpc

    from mnist_deploy.serve.grpc_v2 import DRAIN_REFUSAL, GrpcServer

    app, port, _ = grpc_app
    server = next(hook.__self__ for hook in app.service.on_drain if isinstance(getattr(hook, "__self__", None),
                                                                               GrpcServer))
    channel, stub = _stub(port, protos)
    with channel:
        server.gate.closing = True  # what the drain does after its one second of answers
        held = stub.ServerLive.future(protos[0].ServerLiveRequest(), timeout=10)
        time.sleep(0.5)
        assert not held.done(), "a call was answered while the gate held it"
        server._loop.call_soon_threadsafe(server.gate.released.set)  # what the drain does once grpc stopped
        exc = held.exception(timeout=10)
    assert exc is not None and exc.code() == grpc.StatusCode.UNAVAILABLE and exc.details() == DRAIN_REFUSAL, exc
    text = app.service.render_metrics()
    assert 'mnist_deploy_grpc_requests_total{code="UNAVAILABLE",method="ServerLive"} 1.0' in text, text


def test_every_typed_error_has_its_status_code():
    import grpc

    from mnist_deploy import errors
    from mnist_deploy.serve.grpc_v2 import status_code

    code = grpc.StatusCode
    assert status_code(errors.InputError("x")) == code.INVALID_ARGUMENT
    assert status_code(errors.BadRequest("x")) == code.INVALID_ARGUMENT
    assert status_code(errors.UnsupportedMedia("x")) == code.INVALID_ARGUMENT
    assert status_code(errors.NotFound("x")) == code.NOT_FOUND
    assert status_code(errors.PayloadTooLarge("x")) == code.RESOURCE_EXHAUSTED
    assert status_code(errors.NotReady("x")) == code.UNAVAILABLE
    assert status_code(errors.BatcherClosed("x")) == code.UNAVAILABLE
    assert status_code(errors.RuntimeUnavailable("x")) == code.UNAVAILABLE
    assert status_code(errors.IntegrityError("x")) == code.INTERNAL
    assert status_code(ValueError("a bug")) == code.INTERNAL


# ---------------------------------------------------------------------------------------------------------
# SIGTERM with calls in flight, on the real server.


@pytest.mark.integration
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_answers_the_calls_in_flight_and_refuses_new_ones(served, protos, torch_model, digits, workers):
    """The batcher holds each call up to 1 s, so four calls are in flight when SIGTERM comes: they are
    answered, a new call is refused (UNAVAILABLE), and the server exits 0 well within the drain timeout."""

    pb2 = protos[0]
    name = torch_model.manifest["model"]["name"]
    images = digits[0][:4]
    port = free_port()
    args = ("--workers", str(workers), "--grpc-port", str(port), "--max-queue-delay-us", "1000000",
            "--drain-timeout", "8", "--log-level", "warning")
    with serve_process(served, *args) as (_url, proc):
        channel, stub = _stub(port, protos)
        with channel:
            stub.ServerLive(pb2.ServerLiveRequest())
            futures = [stub.ModelInfer.future(_pixels_request(pb2, f"{name}-pixels", images[i:i + 1], id=str(i)))
                       for i in range(4)]
            time.sleep(0.3)  # received, and waiting in the batcher
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            refused = _refused_within(port, protos, 5.0)
            replies = [f.result(timeout=15) for f in futures]
            code = proc.wait(timeout=15)
            took = time.monotonic() - t0
    assert refused, "a new call was still accepted 5 s after SIGTERM"
    assert [r.id for r in replies] == ["0", "1", "2", "3"]
    want = torch_model.logits(normalize_pixels(images))
    np.testing.assert_allclose(np.concatenate([_logits(r) for r in replies]), want, atol=1e-4, rtol=1e-4)
    assert code == 0, Path(proc.log_path).read_text()
    assert took < 8, f"stopped {took:.1f} s after SIGTERM; the drain timeout is 8 s"


def _listeners(port: int) -> int:
    """How many sockets listen on 127.0.0.1:``port``, IPv4 or v4-mapped IPv6 (grpc's): /proc/net/tcp and
    tcp6 rows, local address ``...0100007F:PORT`` in hex, state 0A (LISTEN)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for row in Path(table).read_text().splitlines()[1:]:
                address, state = row.split()[1], row.split()[3]
                host, _, hex_port = address.rpartition(":")
                count += host.endswith("0100007F") and int(hex_port, 16) == port and state == "0A"
    return count


@pytest.mark.integration
@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="counts listening sockets in /proc/net/tcp")
def test_every_acceptor_listens_and_answers(served, protos, torch_model, digits):
    """--grpc-acceptors 3 with one worker: three grpcio servers listen on the one port, and calls spread
    over connections (the kernel hands each connection to one of them) are all answered, right."""
    pb2, _ = protos
    port = free_port()
    with serve_process(served, "--workers", "1", "--grpc-port", str(port), "--grpc-acceptors", "3",
                       "--log-level", "warning"):
        assert _listeners(port) == 3
        images = digits[0][:4]
        want = torch_model.logits(normalize_pixels(images))
        name = torch_model.manifest["model"]["name"] + "-pixels"
        channels = [_stub(port, protos) for _ in range(12)]  # 12 connections: some reach every listener
        try:
            for _channel, stub in channels:
                request = pb2.ModelInferRequest(model_name=name, raw_input_contents=[images.tobytes()])
                request.inputs.add(name="pixels", datatype="UINT8", shape=[4, 28, 28])
                reply = stub.ModelInfer(request, timeout=30)
                got = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(4, 10)
                np.testing.assert_allclose(got, want, atol=1e-4)
        finally:
            for channel, _ in channels:
                channel.close()


@pytest.mark.integration
def test_calls_over_the_workers_limit_are_refused_whichever_acceptor_took_them(model, live, protos, digits):
    """--max-connections 2 with 3 acceptors and the batcher waiting 0.3 s: of six calls sent at once on six
    connections (spread over the acceptors by the kernel), two wait for their batch and are answered, the
    other four are answered RESOURCE_EXHAUSTED at once, not run, and counted; the limit is the worker's."""
    import grpc

    from mnist_deploy.serve import create_app

    pb2 = protos[0]
    port = free_port()
    app = create_app(model=model, grpc_port=port, grpc_acceptors=3, max_connections=2, max_batch_size=64,
                     max_queue_delay_us=300_000)
    name = model.manifest["model"]["name"] + "-pixels"
    with live(app):
        channels = [_stub(port, protos) for _ in range(6)]
        try:
            futures = [stub.ModelInfer.future(_pixels_request(pb2, name, digits[0][:1]), timeout=30)
                       for _, stub in channels]
            codes = sorted((f.exception().code() if f.exception() else grpc.StatusCode.OK).name for f in futures)
        finally:
            for channel, _ in channels:
                channel.close()
    assert codes == ["OK"] * 2 + ["RESOURCE_EXHAUSTED"] * 4, codes
    text = app.service.render_metrics()
    assert 'mnist_deploy_grpc_requests_total{code="RESOURCE_EXHAUSTED",method="ModelInfer"} 4.0' in text, text


def test_acceptors_must_be_at_least_one():
    from mnist_deploy.errors import InputError
    from mnist_deploy.serve import ServeConfig

    with pytest.raises(InputError, match="grpc_acceptors"):
        ServeConfig(grpc_acceptors=0)


@pytest.mark.integration
def test_sigterm_under_load_cancels_no_call(served, protos, torch_model):
    """Eight clients, each on a connection of its own, send ModelInfer back to back and never look at
    readiness; after a refusal (UNAVAILABLE, DRAIN_REFUSAL) they send again at once, and they stop only when
    the connection fails. SIGTERM under that load: every call is answered OK or UNAVAILABLE, none is
    CANCELLED (grpc cancels the calls it has received but not handed to the application when it stops, so
    the server must stop when none is on its way), and the server exits 0 within the drain timeout."""
    import grpc

    from mnist_deploy.serve.grpc_v2 import DRAIN_REFUSAL

    pb2, pb2_grpc = protos
    request = _pixels_request(pb2, f"{torch_model.manifest['model']['name']}-pixels", np.zeros((1, 28, 28)))
    port, drain, clients = free_port(), 8.0, 8
    codes: list[list[str]] = [[] for _ in range(clients)]

    def client(seen: list[str]) -> None:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)])
        stub, stop_at = pb2_grpc.GRPCInferenceServiceStub(channel), time.monotonic() + 60
        with channel:
            while time.monotonic() < stop_at:  # bounded, should the server never stop
                try:
                    stub.ModelInfer(request, timeout=10)
                    seen.append("OK")
                except grpc.RpcError as exc:
                    refused = exc.code() == grpc.StatusCode.UNAVAILABLE and exc.details() == DRAIN_REFUSAL
                    seen.append("refused" if refused else exc.code().name)
                    if not refused:
                        return

    args = ("--workers", "2", "--grpc-port", str(port), "--drain-timeout", str(drain), "--log-level", "warning")
    with serve_process(served, *args) as (_url, proc):
        threads = [threading.Thread(target=client, args=(seen,)) for seen in codes]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while sum(c.count("OK") for c in codes) < 20 * clients and time.monotonic() < deadline:
            time.sleep(0.05)  # every client connected and under way
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=drain + 10)
        took = time.monotonic() - t0
        for t in threads:
            t.join(timeout=30)
    tally = {code: sum(c.count(code) for c in codes) for code in {code for c in codes for code in c}}
    assert set(tally) <= {"OK", "refused", "UNAVAILABLE"}, tally
    assert all(c and c[-1] == "UNAVAILABLE" for c in codes), tally  # each stopped: its connection failed
    assert rc == 0, Path(proc.log_path).read_text()
    assert took < drain, f"exited {took:.1f} s after SIGTERM; the drain timeout is {drain} s"


def _refused_within(port: int, protos, seconds: float) -> bool:
    """Whether a new call on a new connection is refused (UNAVAILABLE) within ``seconds``."""
    import grpc

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = protos[1].GRPCInferenceServiceStub(channel)
            try:
                stub.ServerLive(protos[0].ServerLiveRequest(), timeout=1)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    return True
        time.sleep(0.05)
    return False


# ---------------------------------------------------------------------------------------------------------
# The CLI's checks, before anything starts.


@pytest.fixture
def taken_port():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        yield taken.getsockname()[1]


@pytest.mark.integration
def test_cli_refuses_a_taken_grpc_port_in_one_line(served, taken_port, monkeypatch):
    from click.testing import CliRunner

    import mnist_deploy.serve
    from mnist_deploy.cli import cli

    def _must_not_start(*_a, **_k):
        raise AssertionError("serve started on a taken gRPC port")

    monkeypatch.setattr(mnist_deploy.serve, "run_server", _must_not_start)
    res = CliRunner().invoke(cli, ["serve", "--artifacts", str(served), "--port", "0", "--grpc-port",
                                   str(taken_port)])
    assert res.exit_code == 2, res.output
    assert f"cannot listen for gRPC on 127.0.0.1:{taken_port}" in res.output and "--grpc-port" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


def test_a_bad_artifact_is_reported_before_the_grpc_port(tmp_path, taken_port):
    """The artifact is the first thing checked, whatever holds port 8001 on this machine."""
    from click.testing import CliRunner

    from mnist_deploy.cli import cli

    res = CliRunner().invoke(cli, ["serve", "--artifacts", str(tmp_path / "none"), "--grpc-port", str(taken_port)])
    assert res.exit_code == 2 and "no such artifacts folder" in res.output and "gRPC" not in res.output, res.output


_NO_GRPC = """
import importlib.metadata as md, sys
sys.modules["grpc"] = sys.modules["grpc_tools"] = None  # import grpc: ImportError, as where it is not installed
real = md.version
def version(name):
    if name in ("grpcio", "grpcio-tools"):
        raise md.PackageNotFoundError(name)
    return real(name)
md.version = version
from mnist_deploy.cli import main
sys.argv = ["mnist-deploy", "serve", "--artifacts", sys.argv[1], "--port", "0", "--grpc-port", sys.argv[2]]
main()
"""


@pytest.mark.integration
def test_serve_without_grpcio_says_what_to_do_in_one_line(served):
    import sys

    res = subprocess.run([sys.executable, "-c", _NO_GRPC, str(served), str(free_port())], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "gRPC needs the grpcio package" in res.stderr and "--grpc-port 0" in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


@pytest.mark.parametrize("args", [["--port", "8123", "--grpc-port", "8123"], ["--grpc-port", "70000"],
                                  ["--grpc-port", "-1"]])
def test_cli_refuses_bad_grpc_ports(tmp_path, args):
    from click.testing import CliRunner

    from mnist_deploy.cli import cli

    res = CliRunner().invoke(cli, ["serve", "--artifacts", str(tmp_path), *args])
    assert res.exit_code == 2 and "--grpc-port" in res.output and "Traceback" not in res.output, res.output


def test_grpc_is_off_unless_asked_in_python_and_on_8001_in_the_cli():
    from click.testing import CliRunner

    from mnist_deploy.cli import cli
    from mnist_deploy.serve import ServeConfig

    assert ServeConfig().grpc_port == 0
    assert "[default: 8001;" in CliRunner().invoke(cli, ["serve", "--help"]).output


def test_two_threads_loading_the_protos_get_one_module(protos):
    from mnist_deploy.serve.protos import load_protos

    got = []
    threads = [threading.Thread(target=lambda: got.append(load_protos())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(g[0] is protos[0] and g[1] is protos[1] for g in got)
