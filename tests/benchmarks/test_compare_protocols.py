"""benchmarks/compare_protocols.py: its request encoders, decoded back by the real parsers (tritonclient's
binary request, MLServer's generated protobuf classes), a target that fails its sample request
becoming an error row, and --batch-window-us reaching both servers (the settings written, and, marked
slow, both servers run with a window). No rates here: they are the benchmark's business."""

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


# -- --batch-window-us: the same dynamic-batching window for both servers --------------------------------


def _model_settings(root: Path) -> dict:
    (path,) = root.glob("*/model-settings.json")
    return json.loads(path.read_text())


@pytest.mark.integration
def test_mlserver_batches_only_with_a_window(trained_mlp, tmp_path):
    cm = sys.modules["compare_mlserver"]
    cm.write_repository(tmp_path / "off", trained_mlp, 1, 2, **cp.mlserver_batching(0))
    off = _model_settings(tmp_path / "off")
    # MLServer's defaults (0, 0.0) leave adaptive batching off; an unchanged file for today's callers
    assert "max_batch_size" not in off and "max_batch_time" not in off
    assert cm.write_repository(tmp_path / "plain", trained_mlp, 1, 2) == cm.write_repository(tmp_path / "off",
                                                                                             trained_mlp, 1, 2)
    assert _model_settings(tmp_path / "plain") == off
    cm.write_repository(tmp_path / "on", trained_mlp, 1, 2, **cp.mlserver_batching(2000))
    on = _model_settings(tmp_path / "on")
    assert (on["max_batch_size"], on["max_batch_time"]) == (64, 0.002)  # requests; seconds
    assert {k: v for k, v in on.items() if not k.startswith("max_batch_")} == off


def _serve_params(args: list[str], artifacts: Path) -> dict:
    """What the real `mnist-deploy serve` command parses from these options (its callbacks run too)."""
    from mnist_deploy.cli import cli

    ctx = cli.commands["serve"].make_context("serve", ["--artifacts", str(artifacts), *args])
    return ctx.params


def test_our_server_gets_the_window_as_its_queue_delay(tmp_path):
    args = cp.serve_args(workers=1, grpc_port=50051, batch_window_us=2000)
    params = _serve_params(args, tmp_path)
    assert (params["max_batch_size"], params["max_queue_delay_us"]) == (64, 2000)
    assert (params["workers"], params["threads"], params["grpc_port"]) == (1, 1, 50051)
    unbatched = cp.serve_args(workers=1, grpc_port=None)
    assert "--max-queue-delay-us" not in unbatched and "--grpc-port" not in unbatched
    assert _serve_params(unbatched, tmp_path)["max_queue_delay_us"] == 0


def test_the_footer_states_the_window_for_both_servers():
    kwargs = {"connections": 64, "duration": 5, "warmup": 1, "workers": 1, "load": (1.5, 2.25)}
    on = cp.footer(batch_window_us=2000, **kwargs)
    assert "batch window 2000 us on both" in on
    assert "--max-queue-delay-us 2000" in on and "max_batch_time 0.002 s" in on and "max_batch_size 64" in on
    off = cp.footer(batch_window_us=0, **kwargs)
    assert "batch window 0" in off and "MLServer adaptive batching off" in off and "max_batch_time" not in off
    assert off.startswith("h2load, 64 connections x 1 request in flight, 5 s each after 1 s of warm-up")
    assert off.endswith("load average 1.50 before, 2.25 after")


def test_a_window_out_of_our_servers_range_is_one_line_and_exit_2(tmp_path, capsys):
    assert cp.main(["--artifacts", str(tmp_path), "--batch-window-us", "-1"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --batch-window-us must lie in 0..1000000, got -1\n"


@pytest.mark.parametrize("value", ["1,x", "0", ""])
def test_a_bad_batches_list_is_argparses_one_line_and_exit_2(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_info:
        cp.main(["--artifacts", str(tmp_path), "--batches", value])
    assert exit_info.value.code == 2
    assert "error: argument --batches:" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.slow
@pytest.mark.integration
def test_with_a_window_both_servers_batch_and_answer_each_request_its_own_rows(served, mnist_dir, tmp_path):
    """The benchmark's own set-up with a window: every target's sample check (batch 1 and 64, REST and
    gRPC), a lone request waiting out the window on both servers (so both batch), and concurrent
    requests of different digits and sizes, merged into one call, each answered with its own logits
    (MLServer concatenates the inputs along the first axis and splits the outputs back)."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import onnxruntime as ort

    if not (VENV / "bin" / "mlserver").exists():
        pytest.skip(f"no {VENV} (bash scripts/mlserver_env.sh)")
    window_us = 200_000  # long, so that requests sent together surely share a batch
    pixels, normalised = sys.modules["compare_mlserver"].digits(mnist_dir, served)
    session = ort.InferenceSession(str(served / "mnist_model.onnx"), providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0]
    expected = session.run(None, {feed.name: normalised.reshape(len(normalised), *feed.shape[1:])})[0]
    with cp.servers(served, VENV, tmp_path, 1, window_us) as (name, ours, ours_grpc, theirs, theirs_grpc):
        for batch in (1, 64):
            checks = {t.name: t.check() for t in cp.targets(batch, pixels, name, ours, ours_grpc, theirs,
                                                             theirs_grpc, VENV)}
            assert checks == dict.fromkeys(checks), f"batch {batch}: {checks}"
        infer = f"/v2/models/{name}/infer"
        for url in (ours, theirs):
            t0 = time.perf_counter()
            assert cp.check_rest(url + infer, cp.v2_json_body(pixels[:1]), {}, 1) is None
            assert time.perf_counter() - t0 >= 0.9 * window_us / 1e6, f"{url} answered before the window ran out"
            slices = [slice(i, i + 1 + i % 4) for i in range(16)]  # 1..4 digits each, all different
            with httpx.Client(timeout=10) as client, ThreadPoolExecutor(len(slices)) as pool:
                answers = list(pool.map(lambda s, url=url: client.post(url + infer, content=cp.v2_json_body(
                    pixels[s]), headers={"content-type": "application/json"}).json(), slices))
            for s, answer in zip(slices, answers, strict=True):
                (out,) = answer["outputs"]
                assert out["shape"] == [s.stop - s.start, 10], (url, s, out["shape"])
                np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(-1, 10), expected[s],
                                           atol=1e-4, err_msg=f"{url} {s}")
