"""Issue 20: the aoti format and the C++ runtimes (torchscript-cpp, aoti-cpp) through export, verify and
bench, on the trained MLP, with the real runner built by CMake against the installed libtorch.

Builds are expensive here (the runner ~1 min, an AOTInductor compile 1-2 min on 2 cores): the runner
is built once per session (the session's $MNIST_DEPLOY_CACHE, see conftest) and the package once per
module (``native_exported``); the other tests copy that folder. No timing assertions."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mnist_deploy.artifacts.manifest import load_manifest, verified_path
from mnist_deploy.cli import cli
from mnist_deploy.errors import RuntimeUnavailable
from mnist_deploy.formats import aoti_family, load_predictor, native

pytestmark = [pytest.mark.native, pytest.mark.integration]
NATIVE = ("torchscript", "aoti", "torchscript-cpp", "aoti-cpp")
FAST = {"warmup": 1, "min_time": 0.005, "min_calls": 3, "peak_sizes": (256,), "threads": 1}


def _data(mnist_dir, cache_dir) -> dict:
    return {"data_dir": mnist_dir, "cache_dir": cache_dir, "allow_download": False}


def _needs_toolchain():
    """Skip without g++/cmake (fail where CI demands the system tools: .ci/run installs them)."""
    reason = native.build_tools_missing() or aoti_family._aoti_available("cpu")
    if reason and native.cached_runner() is None:
        if os.environ.get("MNIST_DEPLOY_REQUIRE_SYSTEM_TOOLS"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture(scope="module")
def native_exported(trained_mlp, tmp_path_factory, mnist_dir, cache_dir) -> Path:
    """The trained MLP exported to the four formats (two AOTI compiles, one runner build); read-only."""
    from mnist_deploy.export.run import export_artifacts

    _needs_toolchain()
    folder = tmp_path_factory.mktemp("native") / "artifacts"
    shutil.copytree(trained_mlp, folder)
    report = export_artifacts(artifacts=folder, formats=list(NATIVE), **_data(mnist_dir, cache_dir))
    assert report.ok, [r.error for r in report.failures]
    return folder


@pytest.fixture
def private(native_exported, tmp_path) -> Path:
    dst = tmp_path / "artifacts"
    shutil.copytree(native_exported, dst)
    return dst


# ---------------------------------------------------------------------------------------------
# Export, verify, predict: the gate passes in C++, on the very bytes Python proved.


def test_cpp_runtimes_pass_the_gate_on_the_same_files(native_exported):
    manifest = load_manifest(native_exported)
    entries = manifest["artifacts"]
    for name in NATIVE:
        parity = entries[name]["parity"]
        assert entries[name]["status"] == "ok" and parity["passed"] is True
        assert parity["max_abs_diff"] <= 1e-4 and parity["agreement"] == 1.0
        assert set(parity["batch_sizes"]) == {"1", "10000"}
    # torchscript-cpp ran byte-for-byte the file torchscript proved; aoti-cpp is its own (latency) build
    assert entries["torchscript-cpp"]["sha256"] == entries["torchscript"]["sha256"]
    assert entries["torchscript-cpp"]["copy_of"] == "torchscript"
    assert entries["aoti-cpp"]["sha256"] != entries["aoti"]["sha256"] and "copy_of" not in entries["aoti-cpp"]
    assert entries["torchscript-cpp"]["parity"]["applied"]["timed_by"].startswith("the C++ runner")


def test_aoti_entry_records_compiler_flags_and_target(native_exported):
    entry = load_manifest(native_exported)["artifacts"]["aoti"]
    target = entry["aoti"]
    assert target["compiler"] and target["flags"] and target["target_isa"]
    # the CPU flags the package may use are this CPU's (it was compiled here), as /proc/cpuinfo says
    assert set(target["required_cpu_flags"]) <= aoti_family.cpu_flags()
    meta = aoti_family.package_metadata(native_exported / entry["path"])
    assert meta["mnist_deploy.required_cpu_flags"].split() == target["required_cpu_flags"]
    assert meta["source_state_dict_sha256"] == entry["source_state_dict_sha256"]


def test_each_package_records_its_inductor_configs(native_exported):
    """aoti is inductor's default build; aoti-cpp the latency build (C++ GEMM template, 1-thread kernels),
    said in the manifest entry and inside the package, and so in the bench row's note."""
    entries = load_manifest(native_exported)["artifacts"]
    assert entries["aoti"]["aoti"]["inductor_configs"] == aoti_family.AOTI_CONFIGS == {}
    assert entries["aoti-cpp"]["aoti"]["inductor_configs"] == aoti_family.AOTI_CPP_CONFIGS
    assert entries["aoti-cpp"]["aoti"]["inductor_configs"]["cpp.threads"] == 1
    for name in ("aoti", "aoti-cpp"):
        path = native_exported / entries[name]["path"]
        assert aoti_family.inductor_configs_of(path) == entries[name]["aoti"]["inductor_configs"]
        assert entries[name]["aoti"]["required_cpu_flags"] and entries[name]["aoti"]["flags"]


def test_cpp_predictor_matches_python_at_odd_batch_sizes(native_exported, mnist_dir, cache_dir):
    from mnist_deploy.data.mnist import load_splits

    splits, _ = load_splits(mnist_dir, cache_dir=cache_dir, allow_download=False)
    shape = tuple(load_manifest(native_exported)["model"]["input_shape"])
    x = splits["test"].images[:300].numpy().reshape(-1, *shape).astype(np.float32)
    ref = load_predictor("torchscript", verified_path(native_exported, "torchscript"))(x)
    for name in ("torchscript-cpp", "aoti-cpp"):
        predictor = load_predictor(name, verified_path(native_exported, name), threads=1)
        try:
            for n in (1, 7, 300):
                np.testing.assert_allclose(predictor(x[:n]), ref[:n], atol=1e-4, rtol=0)
        finally:
            predictor.close()


def test_verify_rechecks_the_cpp_runtimes(native_exported, mnist_dir, cache_dir):
    from mnist_deploy.export.run import verify_artifacts

    report = verify_artifacts(artifacts=native_exported, **_data(mnist_dir, cache_dir))
    assert report.ok, report.problems
    checked = {i.key: i.checks for i in report.items}
    assert "loads in torchscript-cpp" in checked["torchscript-cpp"] and "parity" in checked["aoti-cpp"]
    assert "aoti checks" in checked["aoti"]


# ---------------------------------------------------------------------------------------------
# What must fail.


def test_wrong_logits_from_the_cpp_runtime_fail_the_gate(private, monkeypatch, mnist_dir, cache_dir):
    monkeypatch.setenv("MNIST_DEPLOY_FAULT", "native:wrong-logits")  # the runner adds 1.0 to logit 0
    res = CliRunner().invoke(cli, ["export", "--artifacts", str(private), "--format", "torchscript-cpp",
                                   "--data-dir", str(mnist_dir), "--cache-dir", str(cache_dir), "--no-download"])
    assert res.exit_code == 1, res.output
    entry = load_manifest(private)["artifacts"]["torchscript-cpp"]
    assert entry["status"] == "failed" and entry["parity"]["passed"] is False
    assert entry["parity"]["max_abs_diff"] > 0.5
    assert not (private / "mnist_model_torchscript_cpp.pt").exists()  # a failed file never keeps its name
    assert load_manifest(private)["artifacts"]["torchscript"]["status"] == "ok"  # the Python row is untouched


def test_tampered_aoti_package_fails_verify(private, mnist_dir, cache_dir):
    from mnist_deploy.export.run import verify_artifacts

    path = private / load_manifest(private)["artifacts"]["aoti"]["path"]
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0x01  # one bit inside the package (the compiled library lives in the middle)
    path.write_bytes(bytes(blob))
    report = verify_artifacts(artifacts=private, **_data(mnist_dir, cache_dir))
    assert not report.ok
    problems = {i.key: i.problems for i in report.items}
    assert any("sha256" in p for p in problems["aoti"]) and not problems["aoti-cpp"]


def test_package_refused_in_one_line_on_a_cpu_without_its_isa(native_exported, monkeypatch):
    have = aoti_family.cpu_flags()
    required = load_manifest(native_exported)["artifacts"]["aoti"]["aoti"]["required_cpu_flags"]
    if not required:
        pytest.skip("this package needs no particular CPU flags")
    # the CPU of a user with less: this one's flags minus the vector ISA the package was compiled for
    monkeypatch.setattr(aoti_family, "cpu_flags", lambda: have - {required[-1], "avx512f", "avx2", "asimd"})
    for name in ("aoti", "aoti-cpp"):
        with pytest.raises(RuntimeUnavailable, match="this CPU lacks") as info:
            load_predictor(name, verified_path(native_exported, name))
        assert "\n" not in str(info.value)


def test_missing_compiler_is_a_skipped_row_with_the_reason(native_exported, tmp_path, monkeypatch,
                                                           mnist_dir, cache_dir):
    from mnist_deploy.bench.run import run_bench

    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "empty-cache"))  # no runner built yet
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    result = run_bench(artifacts=native_exported, runtimes="torchscript-cpp",
                       batch_sizes="1", device="cpu", **_data(mnist_dir, cache_dir), **FAST)
    (row,) = result["records"]
    assert row["status"] == "skipped" and "no C++ compiler" in row["reason"] and "no-such-compiler" in row["reason"]
    assert not (tmp_path / "empty-cache").exists()  # nothing was attempted


def test_failed_build_is_one_line_with_the_compilers_first_error(tmp_path, monkeypatch):
    _needs_toolchain()
    src = tmp_path / "src"
    shutil.copytree(native.source_dir(), src)
    runner = src / "runner.cpp"
    runner.write_text(runner.read_text().replace("int usage() {", "int usage() { undeclared_thing();", 1))
    monkeypatch.setenv(native.SOURCE_ENV, str(src))
    monkeypatch.setenv(native.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(native.NativeBuildError) as info:
        native.ensure_runner()
    msg = str(info.value)
    assert "\n" not in msg and "error:" in msg and "undeclared_thing" in msg
    with pytest.raises(native.NativeBuildError):  # not retried in this process
        native.ensure_runner()
    assert "undeclared_thing" in native.unavailable()
    assert not list((tmp_path / "cache").glob("runner-*"))  # nothing half-built is cached


# ---------------------------------------------------------------------------------------------
# Timing: the runner times its own loop, and the bench uses it.


def test_bench_rows_are_timed_by_the_runner(native_exported, mnist_dir, cache_dir):
    from mnist_deploy.bench.run import run_bench

    result = run_bench(artifacts=native_exported, runtimes="torchscript-cpp,aoti-cpp", batch_sizes="1,3",
                       device="cpu", **_data(mnist_dir, cache_dir), **FAST)
    rows = [r for r in result["records"] if r["status"] == "ok"]
    assert sorted((r["runtime"], r["batch_size"]) for r in rows) == [
        ("aoti-cpp", 1), ("aoti-cpp", 3), ("torchscript-cpp", 1), ("torchscript-cpp", 3)]
    for r in rows:
        assert r["n_calls"] >= FAST["min_calls"] and 0 < r["min_ms"] <= r["p50_ms"] <= r["p99_ms"]
        assert r["accuracy"] > 0.9
        # the latency build says so in its row (its kernels ignore the bench's thread count)
        assert ("cpp.threads=1" in (r["reason"] or "")) == (r["runtime"] == "aoti-cpp")


def test_runner_one_shot_modes(native_exported, tmp_path, mnist_dir, cache_dir):
    exe = native.ensure_runner()
    shape = tuple(load_manifest(native_exported)["model"]["input_shape"])
    dims = ",".join(map(str, shape))
    x = np.random.default_rng(0).random((2, *shape), dtype=np.float32)
    (tmp_path / "x.f32").write_bytes(x.tobytes())
    model = verified_path(native_exported, "aoti-cpp")
    subprocess.run([str(exe), "run", "--kind", "aoti", "--model", str(model), "--input", str(tmp_path / "x.f32"),
                    "--shape", f"2,{dims}", "--output", str(tmp_path / "y.f32")], check=True, capture_output=True)
    got = np.frombuffer((tmp_path / "y.f32").read_bytes(), dtype=np.float32).reshape(2, 10)
    ref = load_predictor("aoti", verified_path(native_exported, "aoti"))(x)
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)
    out = subprocess.run([str(exe), "bench", "--kind", "torchscript", "--model",
                          str(verified_path(native_exported, "torchscript-cpp")), "--input", str(tmp_path / "x.f32"),
                          "--shape", f"1,{dims}", "--warmup", "2", "--min-time", "0.01", "--min-calls", "5",
                          "--threads", "1"], check=True, capture_output=True, text=True).stdout
    stats = json.loads(out)
    assert stats["n_calls"] >= 5 and stats["threads"] == 1 and stats["p50_ms"] > 0 and stats["bare_loop_mean_ms"] > 0


def test_first_error_and_flag_names(monkeypatch):
    log = "[1/2] Building CXX\nFAILED: x.o\n/src/runner.cpp:12:3: error: 'foo' was not declared\n  12 | foo();\n"
    assert native.first_error(log) == "/src/runner.cpp:12:3: error: 'foo' was not declared"
    assert native.first_error("CMake Error at CMakeLists.txt:3 (find_package):\n  Could not find Torch\n") == \
        "CMake Error at CMakeLists.txt:3 (find_package): Could not find Torch"
    assert aoti_family._flag_to_cpuinfo("-mavx512vnni") == "avx512_vnni"
    assert aoti_family._flag_to_cpuinfo("-mavx2") == "avx2"
    assert aoti_family._flag_to_cpuinfo("-march=native") is None
    monkeypatch.setattr(aoti_family, "cpu_flags", lambda: frozenset({"sse2", "avx2", "fma"}))  # an AVX2-only CPU
    aoti_family.check_cpu(Path("m.pt2"), ["avx2", "fma"], "avx2")
    with pytest.raises(RuntimeUnavailable, match="compiled for avx512; this CPU lacks avx512bw, avx512f"):
        aoti_family.check_cpu(Path("m.pt2"), ["avx2", "avx512f", "avx512bw"], "avx512")
