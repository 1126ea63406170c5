"""Faults around exported artifacts (issue 9): a full disk during export or bench, a truncated or
malformed file whose sha256 the manifest vouches for, ONNX external data, temp files of killed exports.

A full disk is simulated with RLIMIT_FSIZE in a child process (no root, no tmpfs needed): a write past
the limit fails with EFBIG exactly where a full disk fails with ENOSPC."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_deploy.artifacts.files import sha256_file
from mnist_deploy.artifacts.manifest import load_manifest, save_manifest
from mnist_deploy.errors import IntegrityError, MnistDeployError
from mnist_deploy.formats import FORMATS, LoadError

pytestmark = pytest.mark.integration
LOADABLE = ("torchscript", "pt2", "onnx", "openvino")


@pytest.fixture(scope="module")
def exported(exported_mlp):
    """Conftest's MLP with every format exported (LOADABLE among them); read-only: copy it first."""
    folder, report = exported_mlp
    assert report.ok, [r.error for r in report.failures]
    return folder


def _cli_limited(args: list[str], limit_bytes: int, cwd: Path) -> subprocess.CompletedProcess:
    """``mnist-deploy ARGS`` in a child whose files cannot grow past ``limit_bytes`` (a full disk)."""
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes}))\n"
            "from mnist_deploy.cli import main\n"
            f"sys.argv = ['mnist-deploy', *{args!r}]\n"
            "main()\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=600)


def _data_args(mnist_dir, cache_dir):
    return ["--data-dir", str(mnist_dir), "--cache-dir", str(cache_dir), "--no-download"]


@pytest.mark.parametrize("fmt", ["torchscript", "pt2", "onnx"])
def test_export_on_a_full_disk_keeps_the_previous_artifact(exported, tmp_path, mnist_dir, cache_dir, fmt):
    folder = tmp_path / "artifacts"
    shutil.copytree(exported, folder)
    before = load_manifest(folder)["artifacts"][fmt]
    main_file = folder / FORMATS[fmt].files[0]
    sha = sha256_file(main_file)
    result = _cli_limited(["export", "--out", str(folder), "--format", fmt, *_data_args(mnist_dir, cache_dir)],
                          limit_bytes=64 * 1024, cwd=tmp_path)
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])  # not -6 (SIGABRT)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors and "Traceback" not in result.stderr
    assert "previous artifact kept" in result.stderr or "File too large" in result.stderr
    after = load_manifest(folder)["artifacts"][fmt]
    assert after["status"] == "ok" and after["sha256"] == before["sha256"] == sha256_file(main_file) == sha
    assert not [p.name for p in folder.iterdir() if ".tmp" in p.name]


def test_bench_on_a_full_disk_is_one_line(exported, tmp_path, mnist_dir, cache_dir):
    out = tmp_path / "bench"
    result = _cli_limited(["bench", "--artifacts", str(exported), "--runtimes", "onnx", "--batch-sizes", "1",
                           "--device", "cpu", "--threads", "1", "--warmup", "1", "--min-time", "0.01", "-q",
                           "--out", str(out), *_data_args(mnist_dir, cache_dir)], limit_bytes=1024, cwd=tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")][0].startswith(f"error: {out}")


@pytest.mark.parametrize("fmt", LOADABLE)
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_file_the_manifest_vouches_for_is_one_typed_error(exported, tmp_path, fmt, damage):
    from mnist_deploy.predict import load_model

    if reason := FORMATS[fmt].unavailable("cpu"):
        pytest.skip(f"{fmt}: {reason}")
    folder = tmp_path / "artifacts"
    shutil.copytree(exported, folder)
    manifest = load_manifest(folder)
    entry = manifest["artifacts"][fmt]
    victim = folder / FORMATS[fmt].files[-1]  # OpenVINO: the .bin; the others: their one file
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00garbage" * 64)
    for f in entry.get("files") or [entry]:
        f["sha256"] = sha256_file(folder / f["path"])
    if entry.get("files"):
        entry["sha256"] = entry["files"][0]["sha256"]
    else:
        entry["sha256"] = sha256_file(victim)
    save_manifest(folder, manifest)
    with pytest.raises(MnistDeployError) as info:
        load_model(artifacts=folder, runtime=fmt)
    assert isinstance(info.value, LoadError | IntegrityError)
    assert str(victim.parent) in str(info.value)


def test_onnx_external_data_is_refused(exported, tmp_path):
    import onnx

    from mnist_deploy.predict import load_model

    folder = tmp_path / "artifacts"
    shutil.copytree(exported, folder)
    path = folder / "mnist_model.onnx"
    proto = onnx.load(str(path))
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="mnist_model.onnx.data", size_threshold=0)
    data = folder / "mnist_model.onnx.data"
    data.write_bytes(b"\x00" * data.stat().st_size)  # zeroed weights: every answer would be 0.1
    manifest = load_manifest(folder)
    manifest["artifacts"]["onnx"]["sha256"] = sha256_file(path)
    save_manifest(folder, manifest)
    with pytest.raises(IntegrityError, match="external data"):
        load_model(artifacts=folder, runtime="onnx")


def test_temp_files_of_killed_exports_are_cleaned_up(exported, tmp_path, mnist_dir, cache_dir):
    from mnist_deploy.export.run import export_artifacts

    folder = tmp_path / "artifacts"
    shutil.copytree(exported, folder)
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    stale = [folder / f".export-onnx-{dead}.tmp", folder / f".mnist_model.onnx.{dead}.tmp.onnx"]
    stale[0].mkdir()
    (stale[0] / "mnist_model.onnx").write_bytes(b"half")
    stale[1].write_bytes(b"half")
    live = folder / f".export-pt2-{os.getppid()}.tmp"  # a running process's: kept
    live.mkdir()
    report = export_artifacts(artifacts=folder, formats=["torchscript"], parity_images=1000, data_dir=mnist_dir,
                              cache_dir=cache_dir, allow_download=False)
    assert report.ok
    assert not any(p.exists() for p in stale) and live.exists()
    assert json.loads((folder / "manifest.json").read_text())["artifacts"]["torchscript"]["status"] == "ok"
