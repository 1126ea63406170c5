"""benchmarks/gpu_suite.sh: the CPU dry run end to end (so the GPU suite cannot rot), its step runner
(skipped, failed and timed-out steps), its roofline annotation against a hand computation, and its
fallback load generator on a loopback server. A ``gpu``-marked run of the real suite skips without CUDA.
Nothing here asserts a speed."""

from __future__ import annotations

import http.server
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import pytest
import torch
from _serving import REPO

SUITE_SH = REPO / "benchmarks" / "gpu_suite.sh"


def _load_suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gs = _load_suite()


def _run_suite(out: Path, work: Path, mnist_dir: Path, cache_dir: Path, *args: str, timeout: float = 1800):
    env = {**os.environ, "MNIST_DEPLOY_DATA": str(mnist_dir), "MNIST_DEPLOY_CACHE": str(cache_dir),
           "PYTHON": sys.executable}
    env.pop("OUT", None)
    env.pop("MNIST_DEPLOY_FAULT", None)
    return subprocess.run(["bash", str(SUITE_SH), *args, "--out", str(out), "--work", str(work)], env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------
# The dry run: every step on the CPU, tiny settings, and what the folder holds afterwards.


@pytest.mark.integration
def test_the_cpu_dry_run_runs_every_step_and_fills_the_folder(tmp_path, mnist_dir, cache_dir):
    out, work = tmp_path / "out", tmp_path / "work"
    # a generous budget: on a busy 2-core machine the dry run takes minutes, and a step left out
    # for time would be a skipped line, which this test counts as a failure
    r = _run_suite(out, work, mnist_dir, cache_dir, "--device", "cpu", "--tiny", "--budget-s", "1500")
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == sorted(gs.OUTPUT_FILES)
    assert len(gs.OUTPUT_FILES) <= 8  # what a device run brings back

    suite = json.loads((out / "suite.json").read_text())
    statuses = {s["name"]: s["status"] for s in suite["steps"]}
    assert statuses == {"data": "ok", "train mlp": "ok", "train mlp torchrun": "ok", "export mlp": "ok",
                        "parity mlp": "ok", "bench mlp cpu": "ok", "serve mlp cpu": "ok"}, suite["steps"]
    assert suite["environment"]["modules"]["torch"] == torch.__version__.split("+")[0] or \
        suite["environment"]["modules"]["torch"] == torch.__version__

    # torchrun with one process joined a real process group (gloo on the CPU, NCCL on CUDA)
    assert suite["train"]["mlp-torchrun"]["distributed"] == {"world_size": 1, "backend": "gloo", "per_rank_batch": 64}
    assert suite["train"]["mlp"]["distributed"]["backend"] is None
    assert suite["train"]["mlp"]["exports"] == {"torchscript": "ok", "pt2": "ok", "onnx": "ok"}

    # the parity gate on the device: every format that runs there, judged, the rest skipped with why
    parity = {r["format"]: r for r in suite["parity"]["mlp"]["results"]}
    for name in ("torchscript", "pt2", "onnx", "pytorch-bf16"):
        assert parity[name]["status"] == "pass", parity[name]
    assert parity["pytorch-bf16"]["parity"]["criteria"]["kind"] == "predictions"
    assert parity["onnx"]["parity"]["criteria"]["kind"] == "logits"
    assert "--tiny leaves it out" in parity["torch.compile-cudagraphs"]["reason"]
    assert parity["onnx-int8"]["status"] == "skipped" and "not exported" in parity["onnx-int8"]["reason"]
    assert suite["parity"]["mlp"]["numerics"]["cudnn_allow_tf32"] is False

    # bench: every runtime measured at every batch size, rows annotated with the roofline
    bench = json.loads((out / "bench.json").read_text())
    run = bench["runs"]["mlp-cpu"]
    ok = [r for r in run["records"] if r["status"] == "ok"]
    assert {(r["runtime"], r["batch_size"]) for r in ok} == {
        (rt, bs) for rt in gs.TINY_RUNTIMES for bs in gs.TINY_BATCH_SIZES}
    assert run["bandwidth"]["gb_per_s"] > 0 and run["peak"]["cpu"]["gflops"] > 0
    assert all(r["bound"] in ("memory", "compute") and r["bytes_per_call"] > 0 for r in ok)
    assert all(r["pct_bandwidth"] > 0 for r in ok if r["bound"] == "memory")
    bf16 = next(r for r in ok if r["runtime"] == "pytorch-bf16")
    assert bf16["precision"] == "bf16" and bf16["variant_of"] == "pytorch"

    # serve under load, batching on and off, every request answered
    serve = suite["serve"]["mlp"]
    assert [r["label"] for r in serve["runs"]] == ["batching", "no batching"]
    assert all(r["errors"] == 0 and r["requests"] == 200 for r in serve["runs"]), serve

    summary = (out / "summary.md").read_text()
    for heading in ("## Steps", "## Parity on cpu: mlp", "## Bench mlp-cpu", "## Serve mlp on cpu"):
        assert heading in summary
    assert "==== train mlp torchrun: ok" in (out / "suite.log").read_text()
    assert "not found" in (out / "nvidia-smi.txt").read_text() or "GPU" in (out / "nvidia-smi.txt").read_text()
    with tarfile.open(out / "work.tar.gz") as tar:
        names = tar.getnames()
    assert "mlp/manifest.json" in names and "bench-mlp-cpu/bench.md" in names
    assert any(n.startswith("logs/") and n.endswith("train_mlp_torchrun.log") for n in names)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_suite_on_cuda_tiny(tmp_path, mnist_dir, cache_dir):
    out, work = tmp_path / "out", tmp_path / "work"
    r = _run_suite(out, work, mnist_dir, cache_dir, "--device", "cuda", "--tiny", "--budget-s", "900")
    suite = json.loads((out / "suite.json").read_text())
    assert r.returncode == 0, gs.steps_table(suite["steps"])
    assert suite["train"]["mlp-torchrun"]["distributed"]["backend"] == "nccl"
    assert suite["train"]["mlp"]["device"] == "cuda"


# ---------------------------------------------------------------------------------------------
# The parts, without the whole run.


def test_settings_cover_batch_1_to_65536_and_every_runtime_on_cuda():
    full = gs.settings("cuda", tiny=False)
    from mnist_deploy.bench.config import parse_runtimes
    from mnist_deploy.formats import EXTRA_FORMATS, FORMATS

    assert full["bench"]["batch_sizes"][0] == 1 and full["bench"]["batch_sizes"][-1] == 65536
    assert full["models"] == ["mlp", "cnn"] and full["cpu_compare"] is not None
    tiny = gs.settings("cpu", tiny=True)
    assert tiny["cpu_compare"] is None
    gs._register_extras()
    try:
        names, explicit = parse_runtimes(",".join(full["bench"]["runtimes"]))
        assert not explicit and {"pytorch", "pytorch-bf16", "torch.compile", "torch.compile-cudagraphs", "torchscript",
                                 "torch.export", "onnxruntime"} <= set(names)
        parse_runtimes(",".join(tiny["bench"]["runtimes"] + gs.settings("cuda", tiny=False)["cpu_compare"]["runtimes"]))
    finally:
        for fmt in EXTRA_FORMATS:
            FORMATS.pop(fmt.name, None)


def _suite(tmp_path, modules=None, budget=60.0):
    env = {"modules": {m: "1" for needs in gs.NEEDS.values() for m in needs}}
    env["modules"].update(modules or {})
    return gs.Suite(tmp_path / "out", tmp_path / "work", budget, env)


def test_a_step_whose_modules_are_missing_is_a_skipped_line_naming_them(tmp_path):
    suite = _suite(tmp_path, {"fastapi": None, "orjson": None})
    rec = suite.run("serve mlp cuda", [sys.executable, "-c", "raise SystemExit(3)"], timeout=30, needs="serve")
    assert rec["status"] == "skipped" and "fastapi, orjson" in rec["reason"] and rec["log"] is None


def test_a_failed_step_says_its_last_line_and_the_next_that_needs_it_is_skipped(tmp_path):
    suite = _suite(tmp_path)
    rec = suite.run("train mlp", [sys.executable, "-c", "print('error: out of memory'); raise SystemExit(2)"],
                    timeout=30)
    assert rec["status"] == "failed" and rec["rc"] == 2 and "error: out of memory" in rec["reason"]
    assert "error: out of memory" in (suite.work / rec["log"]).read_text()
    nxt = suite.run("export mlp", [sys.executable, "-c", "pass"], timeout=30, requires=["train mlp"])
    assert nxt["status"] == "skipped" and "'train mlp', which failed" in nxt["reason"]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie waiting for init is gone too


def test_a_step_past_its_limit_is_stopped_with_its_children_and_a_spent_budget_skips_the_rest(tmp_path):
    suite = _suite(tmp_path, budget=60)
    pidfile = tmp_path / "child.pid"
    # a step that starts a child of its own (torchrun's workers, a server) and then hangs
    script = ("import subprocess, sys, time; "
              "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
              f"open({str(pidfile)!r}, 'w').write(str(c.pid)); time.sleep(120)")
    rec = suite.run("slow", [sys.executable, "-c", script], timeout=5)
    assert rec["status"] == "timeout" and rec["seconds"] < 60
    child = int(pidfile.read_text())
    time.sleep(0.5)  # init reaps the orphan
    assert not _alive(child)
    suite.deadline = 0.0
    assert suite.run("late", [sys.executable, "-c", "pass"], timeout=30)["status"] == "skipped"


def test_roofline_annotation_against_a_hand_computation():
    from mnist_deploy.models import build_model, flops_per_example

    model = build_model("mlp", {})
    params = sum(p.numel() for p in model.parameters())
    flops = flops_per_example(model, (784,))
    manifest = {"model": {"name": "mlp", "hparams": {}, "input_shape": [784]}}
    rows = [{"status": "ok", "format": "pytorch", "runtime": "pytorch", "device": "cuda", "batch_size": bs,
             "precision": "f32", "p50_ms": ms} for bs, ms in ((1, 0.01), (65536, 2.0))]
    rows.append({"status": "skipped", "format": "onnx", "runtime": "onnxruntime", "device": "cuda",
                 "batch_size": None})
    result = {"model": {"flops_per_example": flops}, "peak": {"cuda": {"gflops": 50_000.0}}, "records": rows}
    bandwidth = {"gb_per_s": 4000.0}
    gs.annotate_roofline(result, manifest, bandwidth)
    small, large = rows[0], rows[1]
    assert small["bytes_per_call"] == params * 4 + 1 * (784 + 10) * 4
    assert large["bytes_per_call"] == params * 4 + 65536 * (784 + 10) * 4
    assert bandwidth["balance_flop_per_byte"] == pytest.approx(50_000 / 4000)
    assert small["bound"] == "memory"  # ~0.5 FLOP/byte against a balance of 12.5
    assert small["pct_bandwidth"] == pytest.approx(100 * small["bytes_per_call"] / 0.01e-3 / 4000e9)
    assert "bound" not in rows[2]
    # 0.44 MB in 10 us is 44 GB/s: over a 4 GB/s "bandwidth", so it was served from cache
    gs.annotate_roofline(result, manifest, {"gb_per_s": 4.0})
    assert small["pct_bandwidth"] > 100 and "cache" in small["bandwidth_note"]


def test_bandwidth_is_measured_on_random_data():
    bw = gs.measure_bandwidth("cpu", nbytes=1 << 22, repeats=3)
    assert bw["gb_per_s"] > 0 and bw["bytes_copied"] == (1 << 20) and bw["calls"] >= 3


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    count = 0
    lock = threading.Lock()

    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers["Content-Length"]))
        with self.lock:
            type(self).count += 1
            n = type(self).count
        status = 500 if n % 5 == 0 else 200
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


def test_the_fallback_load_generator_counts_requests_and_errors():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        r = gs._thread_load(f"http://127.0.0.1:{server.server_port}", b'{"pixels": []}', requests=50, concurrency=4)
    finally:
        server.shutdown()
        server.server_close()
    assert r["requests"] == 50 and r["errors"] == 10 and _Handler.count == 50
    assert r["p99_ms"] >= r["p50_ms"] > 0
