"""`mnist-deploy bench`: real runs on the trained MLP and its real exports (tiny --min-time), the
record and file contract, skipped and failed rows, and bad input refused before any timing.
No timing assertions: speed targets live in benchmarks/."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mnist_deploy.artifacts.manifest import load_manifest, record_artifact
from mnist_deploy.bench import report as bench_report
from mnist_deploy.bench import run as bench
from mnist_deploy.cli import cli
from mnist_deploy.errors import InputError, IntegrityError, ManifestError
from mnist_deploy.formats import FORMATS, available, exportable

FAST = {"warmup": 1, "min_time": 0.005, "min_calls": 3, "peak_sizes": (256,), "threads": 1}
FAST_CLI = ["--warmup", "1", "--min-time", "0.005", "--threads", "1", "--no-download", "-q"]
NO_GPU = not torch.cuda.is_available()


def _cannot(runtime: str) -> str | None:
    """Why a runtime cannot run on this CPU (the registry's own check), or None: the expected rows
    follow the machine (no bf16 in OpenVINO on an AVX2 CPU, $MNIST_DEPLOY_UNAVAILABLE)."""
    return bench.unavailable_reason(runtime, "cpu")


@pytest.fixture(scope="module")
def exported(exported_mlp):
    """The trained MLP with every format exported (conftest's; read-only: copy it before changing anything)."""
    folder, report = exported_mlp
    manifest = load_manifest(folder)
    here = available("cpu", exportable())
    assert all(manifest["artifacts"][f]["status"] == "ok" for f in here), report
    assert not set(exportable()) - set(here) & set(manifest["artifacts"])  # skipped ones are not recorded
    return folder


@pytest.fixture
def private(exported, tmp_path):
    dst = tmp_path / "artifacts"
    shutil.copytree(exported, dst)
    return dst


def _data_args(mnist_dir, cache_dir):
    return ["--data-dir", str(mnist_dir), "--cache-dir", str(cache_dir)]


def _ok(result, runtime, batch=None):
    return [r for r in result["records"] if r["runtime"] == runtime and r["status"] == "ok"
            and (batch is None or r["batch_size"] == batch)]


# ---------------------------------------------------------------------------------------------
# Real runs.


def test_every_file_runtime_measured_and_outputs_written(exported, tmp_path, mnist_dir, cache_dir):
    names = ("pytorch", "torchscript", "torch.export", "onnxruntime", "onnxruntime-int8", "openvino", "openvino-bf16")
    messages = []
    result = bench.run_bench(artifacts=exported, runtimes=",".join(names), batch_sizes="8,1", device="all",
                             data_dir=mnist_dir, cache_dir=cache_dir, allow_download=False,
                             progress=messages.append, **FAST)
    assert result["settings"]["batch_sizes"] == [1, 8] and result["settings"]["threads"] == 1
    here = [n for n in names if not _cannot(n)]
    cpu = [r for r in result["records"] if r["device"] == "cpu" and r["runtime"] in here]
    assert {(r["runtime"], r["batch_size"]) for r in cpu} == {(n, b) for n in here for b in (1, 8)}
    missing = [r for r in result["records"] if r["device"] == "cpu" and r["runtime"] not in here]
    assert {(r["runtime"], r["status"], r["reason"]) for r in missing} == {
        (n, "skipped", _cannot(n)) for n in names if n not in here}  # one row each, the check's reason
    manifest = load_manifest(exported)
    eager_acc = _ok(result, "pytorch", 1)[0]["accuracy"]
    assert eager_acc == pytest.approx(manifest["metrics"]["accuracy"], abs=1e-9)
    for r in cpu:
        assert set(r) == set(bench_report.RECORD_KEYS)
        assert r["status"] == "ok", r
        assert r["n_calls"] >= 3 and r["threads"] == 1
        assert 0 < r["min_ms"] <= r["p50_ms"] <= r["p90_ms"] <= r["p99_ms"] <= r["max_ms"]
        assert r["throughput_per_s"] == pytest.approx(r["batch_size"] / (r["mean_ms"] / 1e3), rel=1e-6)
        flops = result["model"]["flops_per_example"]
        assert r["gflops"] == pytest.approx(flops * r["throughput_per_s"] / 1e9, rel=1e-6)
        assert r["cold_start_ms"] == pytest.approx(r["load_ms"] + r["first_call_ms"])
        key = "state_dict" if r["runtime"] == "pytorch" else r["format"]
        assert r["size_bytes"] == manifest["artifacts"][key]["size_bytes"]
        if r["variant_of"]:  # INT8, bf16
            assert r["pct_peak"] is None  # an fp32 peak says nothing of INT8 or bf16 arithmetic
            assert abs(r["accuracy"] - eager_acc) < 0.005
        else:
            assert r["pct_peak"] == pytest.approx(100 * r["gflops"] / result["peak"]["cpu"]["gflops"])
            assert r["accuracy"] == pytest.approx(eager_acc, abs=2e-4)  # fp32 runtimes: same answers
    assert result["model"]["flops_per_example"] == 2 * (784 * 128 + 128 * 64 + 64 * 10)
    peak = result["peak"]["cpu"]
    assert peak["n"] == 256 and peak["gflops"] == peak["candidates"][f"{peak['method']} 256"]["gflops"] > 0
    assert len(peak["measurements_gflops"]) == 2 and peak["gflops"] == max(peak["measurements_gflops"])
    assert any("before the rows" in m for m in messages) and any("after the rows" in m for m in messages)
    ov = {r["runtime"]: r for r in cpu if r["runtime"].startswith("openvino")}
    for runtime, precision in (("openvino", "f32"), ("openvino-bf16", "bf16")):
        assert runtime not in here or ov[runtime]["precision"] == precision
    assert {r["performance_mode"] for r in ov.values()} <= {"LATENCY"}
    assert all(r["shapes"].startswith("static per batch size") for r in ov.values())  # recorded per row
    assert {r["shapes"] for r in cpu if not r["runtime"].startswith("openvino")} == {None}
    assert "openvino-bf16" not in here or ov["openvino-bf16"]["variant_of"] == "openvino"
    from mnist_deploy.bench.timing import cpu_gemm_library

    assert set(peak["candidates"]) == {f"torch.mm ({cpu_gemm_library()}) 256", "onnxruntime MatMul (MLAS) 256"}
    env = result["environment"]
    for key in ("cpu", "cores", "threads", "os", "python", "torch", "onnx", "onnxruntime",
                "execution_providers", "gpu", "git_commit", "load_average_before"):
        assert key in env
    assert "CPUExecutionProvider" in env["execution_providers"]
    if NO_GPU:
        cuda = [r for r in result["records"] if r["device"] == "cuda"]
        assert {r["runtime"] for r in cuda} == set(names)
        assert all(r["status"] == "skipped" and "CUDA" in r["reason"] and r["p50_ms"] is None for r in cuda)
    assert "fastest at batch 1" in result["verdict"] and "INT8" in result["verdict"]
    assert any("batch 8: p50" in m for m in messages)

    paths = bench_report.write_outputs(result, tmp_path / "out")
    assert sorted(p.name for p in paths.values()) == sorted(bench_report.OUTPUT_NAMES)
    assert json.loads(paths["bench.json"].read_text()) == json.loads(json.dumps(result))
    with open(paths["bench.csv"], newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(result["records"]) and tuple(rows[0]) == bench_report.RECORD_KEYS
    md = paths["bench.md"].read_text()
    assert "| runtime | device | batch | p50 ms |" in md and "**best**" in md
    assert paths["bench.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = bench_report.best_rows(result["records"])
    assert best[("cpu", 1)]["p50_ms"] == min(r["p50_ms"] for r in cpu if r["batch_size"] == 1)


def test_a_device_that_is_missing_is_one_progress_line_and_one_table_row(served, monkeypatch, mnist_dir,
                                                                          cache_dir):
    """No CUDA (here: ruled out, so the test runs on GPU machines too): one line, one row, one note;
    bench.json keeps a record per runtime."""
    monkeypatch.setenv("MNIST_DEPLOY_UNAVAILABLE", "cuda")
    messages = []
    result = bench.run_bench(artifacts=served, runtimes="eager,onnx", batch_sizes="1", device="all",
                             data_dir=mnist_dir, cache_dir=cache_dir, allow_download=False,
                             progress=messages.append, **FAST)
    why = "ruled out by MNIST_DEPLOY_UNAVAILABLE=cuda"
    assert [m for m in messages if "cuda" in m] == [f"cuda: skipped every runtime: {why}"]
    cuda = [r for r in result["records"] if r["device"] == "cuda"]
    assert sorted(r["runtime"] for r in cuda) == ["onnxruntime", "pytorch"]
    assert all(r["status"] == "skipped" and r["reason"] == why for r in cuda)
    for text in (bench_report.format_table(result), bench_report.format_markdown(result)):
        rows = [line for line in text.splitlines() if "cuda" in line and line != result["verdict"]]
        assert len(rows) == 2, rows  # the row group and its note
        assert "every runtime" in rows[0] and "skipped" in rows[0]
        assert "skipped on cuda: " in rows[1] and rows[1].endswith(why)
    assert result["verdict"].count("Skipped on cuda: every runtime") == 1


def test_one_size_unit_in_the_export_and_bench_tables():
    from mnist_deploy.artifacts.files import size_text
    from mnist_deploy.export.parity import ExportReport, FormatResult

    assert [size_text(n) for n in (None, 999, 1000, 438_123, 999_999, 1_000_000, 2_345_678)] == [
        "-", "999 B", "1.0 kB", "438.1 kB", "1000.0 kB", "1.00 MB", "2.35 MB"]
    export_table = ExportReport("a", "0" * 64, "mlp", 0.98, results=[
        FormatResult("onnx", "mnist_model.onnx", "ok", size_bytes=438_123)]).table()
    row = dict.fromkeys(bench_report.RECORD_KEYS)
    row.update(runtime="onnxruntime", format="onnx", device="cpu", batch_size=None, status="skipped",
               reason="x", size_bytes=438_123)
    bench_cells = bench_report.table_rows([row])[0]
    assert "438.1 kB" in export_table and "438.1 kB" in bench_cells
    assert "KB" not in export_table + " ".join(bench_cells)


def test_best_marking_and_sorting():
    rows = [
        {"runtime": "a", "device": "cpu", "batch_size": 1, "status": "ok", "p50_ms": 2.0},
        {"runtime": "b", "device": "cpu", "batch_size": None, "status": "skipped", "p50_ms": None},
        {"runtime": "c", "device": "cpu", "batch_size": 1, "status": "ok", "p50_ms": 1.0},
        {"runtime": "a", "device": "cpu", "batch_size": 32, "status": "ok", "p50_ms": 3.0},
    ]
    ordered = bench.sort_records(rows)
    assert [(r["runtime"], r["batch_size"]) for r in ordered] == [("c", 1), ("a", 1), ("a", 32), ("b", None)]
    assert bench_report.best_rows(rows)[("cpu", 1)]["runtime"] == "c"


@pytest.mark.slow
def test_cli_default_runtimes_with_torch_compile(exported, tmp_path, mnist_dir, cache_dir):
    out = tmp_path / "bench"
    res = CliRunner().invoke(cli, ["bench", "--artifacts", str(exported), "--batch-sizes", "1,4", "--device",
                                   "cpu", "--out", str(out), *FAST_CLI, *_data_args(mnist_dir, cache_dir)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "bench.json").read_text())
    assert {r["runtime"] for r in data["records"] if r["status"] == "ok"} == {
        n for n in bench.runtime_names() if not _cannot(n)}
    compiled = [r for r in data["records"] if r["runtime"] == "torch.compile"]
    assert all("compilation" in r["reason"] for r in compiled)
    marked = [line.split("  ")[0] for line in res.stdout.splitlines() if line.split("  ")[0].endswith(" *")]
    assert len(marked) == 2  # one best row per batch size
    assert f"wrote bench.json, bench.csv, bench.md, bench.png to {out}/" in res.output


def test_cli_json_to_stdout(exported, tmp_path, mnist_dir, cache_dir):
    out = tmp_path / "b"
    res = CliRunner().invoke(cli, ["bench", "--artifacts", str(exported), "--runtimes", "onnx,eager",
                                   "--batch-sizes", "2", "--device", "cpu", "--out", str(out), "--json",
                                   *FAST_CLI, *_data_args(mnist_dir, cache_dir)])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [(r["runtime"], r["batch_size"], r["status"]) for r in data["records"]] in (
        [("onnxruntime", 2, "ok"), ("pytorch", 2, "ok")], [("pytorch", 2, "ok"), ("onnxruntime", 2, "ok")])
    assert (out / "bench.json").is_file()


# ---------------------------------------------------------------------------------------------
# Skipped and failed rows.


def test_a_runtime_that_fails_is_a_failed_row_and_the_rest_go_on(private, tmp_path, mnist_dir, cache_dir):
    # A file the manifest vouches for (sha256 re-recorded) that ONNX Runtime cannot load.
    entry = load_manifest(private)["artifacts"]["onnx"]
    (private / entry["path"]).write_bytes(b"not an onnx model")
    record_artifact(private, "onnx", private / entry["path"],
                    **{k: v for k, v in entry.items() if k not in ("path", "sha256", "size_bytes")})
    out = tmp_path / "b"
    res = CliRunner().invoke(cli, ["bench", "--artifacts", str(private), "--runtimes", "onnxruntime,pytorch",
                                   "--batch-sizes", "1", "--device", "cpu", "--out", str(out), *FAST_CLI,
                                   *_data_args(mnist_dir, cache_dir)])
    assert res.exit_code == 1
    assert "1 runtime(s) failed: onnxruntime (cpu)" in res.stderr
    data = json.loads((out / "bench.json").read_text())
    failed = [r for r in data["records"] if r["runtime"] == "onnxruntime"]
    assert len(failed) == 1 and failed[0]["status"] == "failed" and "cannot load" in failed[0]["reason"]
    assert [r["status"] for r in data["records"] if r["runtime"] == "pytorch"] == ["ok"]
    assert "failed on cpu: onnxruntime" in (out / "bench.md").read_text()


def test_cuda_rows_are_skipped_without_a_gpu(exported, tmp_path, mnist_dir, cache_dir):
    if not NO_GPU:
        pytest.skip("this machine has a GPU")
    out = tmp_path / "b"
    res = CliRunner().invoke(cli, ["bench", "--artifacts", str(exported), "--runtimes", "pytorch,onnx",
                                   "--device", "cuda", "--out", str(out), *FAST_CLI,
                                   *_data_args(mnist_dir, cache_dir)])
    assert res.exit_code == 2
    assert "nothing was measured" in res.stderr
    data = json.loads((out / "bench.json").read_text())
    assert [(r["runtime"], r["device"], r["status"]) for r in data["records"]] == [
        ("pytorch", "cuda", "skipped"), ("onnxruntime", "cuda", "skipped")]
    assert data["peak"] == {} and data["environment"]["gpu"] is None


def test_unexported_formats_skipped_under_all_but_an_error_when_named(trained_mlp):
    manifest = load_manifest(trained_mlp)
    skip = bench.check_artifacts(trained_mlp, manifest, bench.runtime_names(), explicit=False)
    assert set(skip) == {FORMATS[name].runtime for name in exportable()}
    assert "never exported" in skip["onnxruntime"]
    with pytest.raises(ManifestError, match="'onnx' .*never exported"):
        bench.check_artifacts(trained_mlp, manifest, ("pytorch", "onnxruntime"), explicit=True)


def test_failed_export_is_skipped_under_all(private):
    manifest = load_manifest(private)
    manifest["artifacts"]["pt2"].update(status="failed", error="parity: max |diff| 3.1 > 1e-4")
    skip = bench.check_artifacts(private, manifest, bench.runtime_names(), explicit=False)
    # the reason export recorded, not advice to run the export that just failed again
    assert skip == {"torch.export": "artifact 'pt2' export failed (parity: max |diff| 3.1 > 1e-4)",
                    **{n: f"not exported: {_cannot(n)}" for n in bench.runtime_names()
                       if bench.by_runtime(n).exportable and _cannot(n)}}


def test_a_format_export_skipped_carries_the_availability_reason(trained_mlp, monkeypatch, tmp_path, mnist_dir,
                                                                 cache_dir):
    """Export skips a format that cannot run here; bench says why, not "never exported; run export"."""
    monkeypatch.setenv("MNIST_DEPLOY_UNAVAILABLE", "onnx-int8")
    manifest = load_manifest(trained_mlp)
    why = "ruled out by MNIST_DEPLOY_UNAVAILABLE=onnx-int8"
    for explicit in (False, True):  # named or under all: a skipped row with the reason, not an error
        skip = bench.check_artifacts(trained_mlp, manifest, ("pytorch", "onnxruntime-int8"), explicit=explicit)
        assert skip == {"onnxruntime-int8": f"not exported: {why}"}
    messages = []
    result = bench.run_bench(artifacts=trained_mlp, runtimes="eager,onnx-int8", batch_sizes="1", device="cpu",
                             data_dir=mnist_dir, cache_dir=cache_dir, allow_download=False,
                             progress=messages.append, **FAST)
    row, = [r for r in result["records"] if r["runtime"] == "onnxruntime-int8"]
    assert row["status"] == "skipped" and row["reason"] == why
    assert f"onnxruntime-int8 (cpu): skipped: {why}" in messages
    assert not any("never exported" in m for m in messages)


# ---------------------------------------------------------------------------------------------
# Bad input: an error and a non-zero exit before anything is timed.


def test_tampered_artifact_refused_before_timing(private, tmp_path, mnist_dir, cache_dir):
    path = private / load_manifest(private)["artifacts"]["onnx-int8"]["path"]
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    messages = []
    with pytest.raises(IntegrityError, match="sha256"):
        bench.run_bench(artifacts=private, data_dir=mnist_dir, cache_dir=cache_dir, progress=messages.append, **FAST)
    assert messages == []  # nothing was measured, not even the peak
    out = tmp_path / "b"
    res = CliRunner().invoke(cli, ["bench", "--artifacts", str(private), "--out", str(out), *FAST_CLI,
                                   *_data_args(mnist_dir, cache_dir)])
    assert res.exit_code == 1
    assert "sha256" in res.stderr and "refusing to load it" in res.stderr and "Traceback" not in res.output
    assert not out.exists()


def test_missing_artifact_file_refused(private, mnist_dir, cache_dir):
    (private / load_manifest(private)["artifacts"]["pt2"]["path"]).unlink()
    res = CliRunner().invoke(cli, ["bench", "--artifacts", str(private), "--runtimes", "pytorch",
                                   *FAST_CLI, *_data_args(mnist_dir, cache_dir)])
    assert res.exit_code == 0, res.output  # pt2 not asked for: not loaded, not checked
    res = CliRunner().invoke(cli, ["bench", "--artifacts", str(private), *FAST_CLI, *_data_args(mnist_dir, cache_dir)])
    assert res.exit_code == 1 and "listed in the manifest as 'pt2' but missing" in res.stderr


def test_no_manifest(tmp_path):
    res = CliRunner().invoke(cli, ["bench", "--artifacts", str(tmp_path / "nothing"), "-q"])
    assert res.exit_code == 2 and "no manifest" in res.stderr


def test_no_manifest_refused_before_the_runtimes_are_imported(tmp_path):
    """The folder is checked first: no torch, ONNX Runtime or OpenVINO import (seconds) before the error."""
    import subprocess
    import sys

    code = ("import sys\nfrom click.testing import CliRunner\nfrom mnist_deploy.cli import cli\n"
            f"res = CliRunner().invoke(cli, ['bench', '--artifacts', {str(tmp_path / 'nothing')!r}, '-q'])\n"
            "heavy = sorted(m for m in ('torch', 'onnxruntime', 'openvino', 'onnx') if m in sys.modules)\n"
            "print(res.exit_code, heavy, res.stderr.strip())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.startswith("2 [] error: ") and "no manifest" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--runtimes", "tensorrt"], "unknown runtime 'tensorrt'"),
    (["--runtimes", "onnx,tensorrt"], "unknown runtime 'tensorrt'"),
    (["--batch-sizes", "0"], "batch size '0' is not a positive integer"),
    (["--batch-sizes", "1,-4"], "batch size '-4' is not a positive integer"),
    (["--batch-sizes", "1.5"], "batch size '1.5' is not a positive integer"),
    (["--batch-sizes", "eight"], "batch size 'eight' is not a positive integer"),
    (["--batch-sizes", ","], "--batch-sizes is empty"),
    (["--batch-sizes", str(2 ** 21)], "larger than 1048576"),
    (["--device", "tpu"], "Invalid value for '--device'"),
    (["--threads", "0"], "must be at least 1"),
    (["--warmup", "-1"], "Invalid value for '--warmup'"),
    (["--min-time", "0"], "Invalid value for '--min-time'"),
])
def test_bad_options(exported, tmp_path, args, message):
    out = tmp_path / "b"
    res = CliRunner().invoke(cli, ["bench", "--artifacts", str(exported), "--out", str(out), "-q", *args])
    assert res.exit_code == 2, res.output
    assert message in res.stderr and "Traceback" not in res.output
    assert not out.exists()


def test_parse_helpers():
    assert bench.parse_batch_sizes("256, 1,32,1") == (1, 32, 256)
    assert bench.parse_batch_sizes([4, 2]) == (2, 4)
    assert bench.parse_batch_sizes(None) == bench.DEFAULT_BATCH_SIZES
    assert bench.parse_runtimes("all") == (bench.runtime_names(), False)
    assert bench.parse_runtimes(None) == (bench.runtime_names(), False)
    assert bench.parse_runtimes("onnx-int8,eager,pt2,ONNX") == (
        ("pytorch", "onnxruntime", "torch.export", "onnxruntime-int8"), True)
    for bad in (True, 0):
        with pytest.raises(InputError):
            bench.parse_batch_sizes([bad])
    with pytest.raises(InputError):
        bench.BenchConfig(min_time=float("nan")).validate()


# ---------------------------------------------------------------------------------------------
# Device selection, on this CPU machine.


def test_device_plan_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plan = bench.plan_devices("all")
    assert plan[0] == ("cpu", None) and plan[1][0] == "cuda" and "CUDA" in plan[1][1]
    assert bench.plan_devices("cpu") == [("cpu", None)]
    assert bench.plan_devices("cuda")[0][1]
    with pytest.raises(InputError, match="unknown device 'tpu'"):
        bench.plan_devices("tpu")


def test_device_plan_with_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert bench.plan_devices("all") == [("cpu", None), ("cuda", None)]
    assert bench.plan_devices("cuda") == [("cuda", None)]
    assert "only 1 CUDA device" in bench.plan_devices("cuda:2")[0][1]


def test_runtime_availability_checks():
    import onnxruntime as ort

    assert bench.unavailable_reason("onnxruntime", "cpu") is None
    assert bench.unavailable_reason("pytorch", "cuda") is None  # torch's own device check decides
    reason = bench.unavailable_reason("onnxruntime-int8", "cuda")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert reason is None
    else:
        assert "CUDAExecutionProvider" in reason and "onnxruntime-gpu" in reason
    if shutil.which("g++") or shutil.which("c++"):
        assert bench.unavailable_reason("torch.compile", "cpu") is None


# ---------------------------------------------------------------------------------------------
# The timing primitives.


def test_peak_highest_kept_and_rows_over_100_percent_flagged():
    slow = {"gflops": 50.0, "method": "torch.mm (MKL)", "n": 256}
    fast = {"gflops": 80.0, "method": "torch.mm (MKL)", "n": 256}
    best = bench.best_peak(slow, fast)
    assert best["gflops"] == 80.0 and best["measurements_gflops"] == [50.0, 80.0]
    assert bench.best_peak({"gflops": None, "error": "x"}, slow)["gflops"] == 50.0
    rows = [dict.fromkeys(bench_report.RECORD_KEYS) for _ in range(3)]
    for r, (fmt, gflops) in zip(rows, (("onnx", 90.0), ("pt2", 40.0), ("onnx-int8", 200.0)), strict=True):
        r.update(format=fmt, runtime=fmt, device="cpu", batch_size=1, status="ok", reason="", gflops=gflops)
    warnings = bench._apply_peaks(rows, {"cpu": best})
    assert rows[0]["pct_peak"] == pytest.approx(112.5) and "measurement warning" in rows[0]["reason"]
    assert rows[1]["pct_peak"] == pytest.approx(50.0) and rows[1]["reason"] == ""
    assert rows[2]["pct_peak"] is None  # INT8 is not held to an fp32 roofline
    assert len(warnings) == 1 and "112% of the measured matmul peak" in warnings[0]


def test_time_calls_counts_and_syncs():
    calls, syncs = [], []
    times = bench.time_calls(calls.append, "x", warmup=4, min_time=1e-6, min_calls=7, sync=lambda: syncs.append(1))
    assert len(times) == 7 and times.dtype == np.int64 and (times >= 0).all()
    assert len(calls) == 4 + 7 and set(calls) == {"x"}
    assert len(syncs) == 1 + 7  # once after warm-up, then after every timed call


def test_latency_stats_against_numpy():
    ns = np.array([1_000_000, 2_000_000, 3_000_000, 10_000_000], dtype=np.int64)
    s = bench.latency_stats(ns, batch_size=8, flops_per_example=1000)
    ms = ns / 1e6
    for key, q in (("p50_ms", 50), ("p90_ms", 90), ("p99_ms", 99)):
        assert s[key] == pytest.approx(np.percentile(ms, q))
    assert s["mean_ms"] == 4.0 and s["min_ms"] == 1.0 and s["max_ms"] == 10.0 and s["n_calls"] == 4
    assert s["throughput_per_s"] == pytest.approx(8 * 4 / 0.016)
    assert s["gflops"] == pytest.approx(1000 * 8 * 4 / 0.016 / 1e9)


def test_torch_compile_without_a_compiler_is_skipped():
    import torch._inductor.config as inductor_config

    # torch's own patch(): monkeypatch.setattr on inductor's config deletes the option on undo, and every
    # later compile in the session then fails with "torch._inductor.config.cpp.cxx does not exist".
    before = bench.unavailable_reason("torch.compile", "cpu")
    with inductor_config.patch({"cpp.cxx": (None, "/nonexistent/g++")}):
        reason = bench.unavailable_reason("torch.compile", "cpu")
    assert reason and reason.startswith("torch.compile on CPU needs a C++ compiler")
    assert bench.unavailable_reason("torch.compile", "cpu") == before  # the option is back as it was
