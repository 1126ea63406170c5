"""A train run replaces its outputs as one unit: killed at any named point, or on a full disk, the
artifacts folder holds the previous set or the new one, whole (issue 9, items 5 and 6(c))."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_deploy.artifacts.commit import JOURNAL, finish_pending_commit
from mnist_deploy.artifacts.files import sha256_file

pytestmark = pytest.mark.integration

# The named fault points of the write path, in the order a run reaches them.
STAGED_POINTS = ["train:after-state-dict", "train:after-metrics", "train:after-plots", "train:before-manifest",
                 "train:before-commit"]


def _run(out: Path, mnist_dir: Path, cache_dir: Path, *, seed: int, fault: str | None = None,
         env_extra: dict | None = None, preexec=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "MNIST_DEPLOY_CACHE": str(cache_dir), **(env_extra or {})}
    env.pop("MNIST_DEPLOY_FAULT", None)
    if fault:
        env["MNIST_DEPLOY_FAULT"] = fault
    cmd = [sys.executable, "-m", "mnist_deploy", "train", "--epochs", "1", "--subset", "1000", "--seed", str(seed),
           "--plots", "--quiet", "--no-download", "--data-dir", str(mnist_dir), "--out", str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, preexec_fn=preexec)


def _set_state(out: Path) -> tuple[int, dict]:
    """(seed, {file: sha256}) of a whole set; fails the test when the set is not whole."""
    manifest = json.loads((out / "manifest.json").read_text())
    files = {}
    for key, entry in manifest["artifacts"].items():
        path = out / entry["path"]
        assert path.is_file(), f"{key}: {path} missing"
        assert sha256_file(path) == entry["sha256"], f"{key}: {path} does not match the manifest"
        files[entry["path"]] = entry["sha256"]
    return manifest["seed"], files


def _no_leftovers(out: Path) -> None:
    names = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.train-")]
    names += [p.name for p in out.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert not names, f"temporary files left behind: {names}"


@pytest.fixture(scope="module")
def previous_set(tmp_path_factory, mnist_dir, cache_dir) -> Path:
    out = tmp_path_factory.mktemp("previous") / "artifacts"
    r = _run(out, mnist_dir, cache_dir, seed=0)
    assert r.returncode == 0, r.stderr
    (out / "notes.txt").write_text("a user's file the new set must keep\n")
    return out


@pytest.mark.parametrize("point", STAGED_POINTS)
def test_sigkill_before_the_commit_leaves_the_previous_set(point, previous_set, tmp_path, mnist_dir, cache_dir):
    out = tmp_path / "artifacts"
    shutil.copytree(previous_set, out)
    before = _set_state(out)
    r = _run(out, mnist_dir, cache_dir, seed=1, fault=point)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert _set_state(out) == before
    # The next run removes what the killed one left and commits the new set.
    r = _run(out, mnist_dir, cache_dir, seed=1)
    assert r.returncode == 0, r.stderr
    assert _set_state(out)[0] == 1 and (out / "notes.txt").is_file()
    _no_leftovers(out)


def test_sigkill_after_the_commit_leaves_the_new_set(previous_set, tmp_path, mnist_dir, cache_dir):
    out = tmp_path / "artifacts"
    shutil.copytree(previous_set, out)
    r = _run(out, mnist_dir, cache_dir, seed=1, fault="train:after-commit")
    assert r.returncode == -signal.SIGKILL, r.stderr
    seed, files = _set_state(out)
    assert seed == 1 and set(files) == {"mnist_model_state_dict.pth", "metrics.json", "training_curves.png",
                                        "confusion_matrix.png"}
    assert (out / "notes.txt").read_text().startswith("a user's file")


def test_ctrl_c_leaves_the_previous_set(previous_set, tmp_path, mnist_dir, cache_dir):
    out = tmp_path / "artifacts"
    shutil.copytree(previous_set, out)
    before = _set_state(out)
    r = _run(out, mnist_dir, cache_dir, seed=1, fault="train:before-manifest:SIGINT")
    assert r.returncode == 130, r.stderr
    assert "Traceback" not in r.stderr and "interrupted" in r.stderr
    assert _set_state(out) == before
    _no_leftovers(out)


def test_folder_mode_survives_the_exchange(previous_set, tmp_path, mnist_dir, cache_dir):
    out = tmp_path / "artifacts"
    shutil.copytree(previous_set, out)
    os.chmod(out, 0o750)
    assert _run(out, mnist_dir, cache_dir, seed=1).returncode == 0
    assert out.stat().st_mode & 0o777 == 0o750
    assert (out / "manifest.json").stat().st_mode & 0o044 == 0o044, "files follow the umask, not 0600"


@pytest.mark.parametrize("point", ["train:journaled", "train:renamed-one"])
def test_in_place_fallback_rolls_forward(point, previous_set, tmp_path, mnist_dir, cache_dir):
    """Where folders cannot be exchanged, a run killed mid-commit leaves a journal that completes it."""
    out = tmp_path / "artifacts"
    shutil.copytree(previous_set, out)
    r = _run(out, mnist_dir, cache_dir, seed=1, fault=point, env_extra={"MNIST_DEPLOY_INPLACE_COMMIT": "1"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert (out / JOURNAL).is_dir()
    assert finish_pending_commit(out)
    assert _set_state(out)[0] == 1
    _no_leftovers(out)


def test_a_reader_rolls_an_interrupted_commit_forward(previous_set, tmp_path, mnist_dir, cache_dir):
    """verify, predict and serve read the manifest through load_manifest: the journal is completed
    there, so no reader ever sees the new state_dict beside the old manifest."""
    from mnist_deploy.artifacts.manifest import load_manifest, verified_path

    out = tmp_path / "artifacts"
    shutil.copytree(previous_set, out)
    r = _run(out, mnist_dir, cache_dir, seed=1, fault="train:renamed-one",
             env_extra={"MNIST_DEPLOY_INPLACE_COMMIT": "1"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert (out / JOURNAL).is_dir()
    manifest = load_manifest(out)
    assert not (out / JOURNAL).exists()
    verified_path(out, "state_dict", manifest)  # the sha256 matches: one whole set
    assert _set_state(out)[0] == 1


def test_in_place_fallback_killed_before_the_journal(previous_set, tmp_path, mnist_dir, cache_dir):
    out = tmp_path / "artifacts"
    shutil.copytree(previous_set, out)
    before = _set_state(out)
    r = _run(out, mnist_dir, cache_dir, seed=1, fault="train:before-manifest",
             env_extra={"MNIST_DEPLOY_INPLACE_COMMIT": "1"})
    assert r.returncode == -signal.SIGKILL
    assert _set_state(out) == before and not finish_pending_commit(out)


def _limit_file_size():
    # Any write past 64 KiB fails with EFBIG (Python ignores SIGXFSZ): a disk that fills mid-write.
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))


def test_failed_write_is_one_line_and_keeps_the_previous_set(previous_set, tmp_path, mnist_dir, cache_dir):
    out = tmp_path / "artifacts"
    shutil.copytree(previous_set, out)
    before = _set_state(out)
    r = _run(out, mnist_dir, cache_dir, seed=1, preexec=_limit_file_size)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write the artifacts" in lines[0] and "unchanged" in lines[0], r.stderr
    assert _set_state(out) == before
    _no_leftovers(out)


def test_full_disk_on_tmpfs(previous_set, tmp_path, mnist_dir, cache_dir):
    """A real ENOSPC: a tmpfs with room for the previous set only. Needs root (mount)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    size = sum(p.stat().st_size for p in previous_set.iterdir()) + 200 * 1024
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], capture_output=True, text=True)
    if m.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {m.stderr.strip()}")
    try:
        out = mnt / "artifacts"
        shutil.copytree(previous_set, out)
        before = _set_state(out)
        r = _run(out, mnist_dir, cache_dir, seed=1)
        assert r.returncode == 1, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "No space left on device" in lines[0], r.stderr
        assert _set_state(out) == before
        _no_leftovers(out)
    finally:
        subprocess.run(["umount", str(mnt)], check=False)
