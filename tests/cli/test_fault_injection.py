"""Fault injection: a full disk through a small tmpfs (root only), and train killed at every named
fault point with a good previous set in place, then `mnist-deploy verify` (issue 9)."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from mnist_deploy.artifacts.files import atomic_write_text
from mnist_deploy.data import mnist as data
from mnist_deploy.errors import DataError


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs filled to the last block; yields its path. Root only (mount), skipped elsewhere."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("a full disk is a small tmpfs, and mounting one needs root")
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if m.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {m.stderr.strip() or m.returncode}")
    try:
        (mnt / "old.json").write_text('{"previous": true}\n')
        (mnt / "MNIST").mkdir()
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(fd)
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _leftovers(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith(".tmp")]


def test_atomic_write_on_a_full_disk_keeps_the_previous_file(full_disk):
    with pytest.raises(OSError) as err:
        atomic_write_text(full_disk / "old.json", '{"new": "' + "x" * 100_000 + '"}')
    assert err.value.errno == errno.ENOSPC
    assert (full_disk / "old.json").read_text() == '{"previous": true}\n'
    assert _leftovers(full_disk) == []


@pytest.mark.integration
def test_download_onto_a_full_disk_is_one_data_error(full_disk, mirror, mnist_dir):
    (mirror / "t10k-labels-idx1-ubyte.gz").symlink_to(data.find_file(mnist_dir, "test-labels").resolve())
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: cannot save the download \(No space left"):
        data.download(full_disk, ["test-labels"], progress=False)
    assert _leftovers(full_disk) == []


@pytest.mark.integration
def test_cache_on_a_full_disk_costs_only_the_cache(full_disk, mnist_dir):
    splits, _ = data.load_splits(mnist_dir, cache_dir=full_disk, allow_download=False)
    assert len(splits["test"]) == 10000
    assert _leftovers(full_disk) == [] and not list(full_disk.glob("*.pth"))


# ---------------------------------------------------------------------------------------------
# train killed (SIGKILL) or interrupted (SIGINT, Ctrl-C) at every named fault point, over a good
# previous set that includes an ONNX export; afterwards `mnist-deploy verify` must pass on the folder:
# the previous set or the new one, whole.

REPO = Path(__file__).resolve().parents[2]
# The points a default train run passes, in order; the commit lies between before- and after-commit.
TRAIN_POINTS = ["train:rank0:step", "train:after-state-dict", "train:after-metrics", "train:after-plots",
                "train:before-manifest", "train:before-commit", "train:after-commit"]
AFTER_COMMIT = {"train:after-commit"}
# Reached only by the in-place (journal) commit, which the atomic-set tests cover with their roll-forward.
IN_PLACE_ONLY = {"train:journaled", "train:renamed-one"}


def _declared_train_points() -> set[str]:
    """Every ``fault_point("train:...")`` in the package (``{...}`` placeholders read as rank 0)."""
    import re

    found = set()
    for path in (REPO / "mnist_deploy").rglob("*.py"):
        if path.name == "faults.py":  # the switch itself (its docstring names an example point)
            continue
        for name in re.findall(r'fault_point\(f?"(train:[^"]+)"\)', path.read_text(encoding="utf-8")):
            found.add(re.sub(r"\{[^}]*\}", "0", name))
    return found


needs_points = pytest.mark.skipif(not _declared_train_points(),
                                  reason="train declares no fault points (they come with its atomic artifact set)")


@needs_points
def test_every_train_fault_point_is_exercised():
    assert _declared_train_points() == set(TRAIN_POINTS) | IN_PLACE_ONLY


def _cli(*args, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    import sys

    env = {**os.environ, **(env_extra or {})}
    env.pop("MNIST_DEPLOY_FAULT", None)
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "mnist_deploy", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _train(out: Path, mnist_dir: Path, seed: int, fault: str | None = None) -> subprocess.CompletedProcess:
    return _cli("train", "--epochs", "1", "--subset", "1000", "--seed", str(seed), "--plots", "--quiet",
                "--no-download", "--data-dir", str(mnist_dir), "--out", str(out),
                env_extra={"MNIST_DEPLOY_FAULT": fault} if fault else None)


def _verify(out: Path, mnist_dir: Path) -> subprocess.CompletedProcess:
    return _cli("verify", "--artifacts", str(out), "--no-download", "--data-dir", str(mnist_dir))


@pytest.fixture(scope="module")
def good_set(tmp_path_factory, mnist_dir) -> Path:
    """A whole previous set: trained (seed 0) and exported to ONNX, passing verify."""
    out = tmp_path_factory.mktemp("good") / "artifacts"
    r = _train(out, mnist_dir, seed=0)
    assert r.returncode == 0, r.stderr
    r = _cli("export", "--out", str(out), "--format", "onnx", "--no-download", "--data-dir", str(mnist_dir))
    assert r.returncode == 0, r.stderr
    assert _verify(out, mnist_dir).returncode == 0
    return out


@needs_points
@pytest.mark.integration
@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGINT"])
@pytest.mark.parametrize("point", TRAIN_POINTS)
def test_train_interrupted_at_any_point_leaves_a_whole_set(point, signal_name, good_set, tmp_path, mnist_dir,
                                                           monkeypatch):
    import json
    import shutil
    import signal

    monkeypatch.setenv("MNIST_DEPLOY_CACHE", str(good_set.parent / "cache"))
    out = tmp_path / "artifacts"
    shutil.copytree(good_set, out)
    r = _train(out, mnist_dir, seed=1, fault=f"{point}:{signal_name}")
    if signal_name == "SIGKILL":
        assert r.returncode == -signal.SIGKILL, r.stderr
    else:  # Ctrl-C: the CLI's one line and exit 130, never a traceback
        assert r.returncode == 130, r.stderr
        assert "Traceback" not in r.stderr and "interrupted" in r.stderr, r.stderr
    v = _verify(out, mnist_dir)
    assert v.returncode == 0, f"verify after {signal_name} at {point}:\n{v.stdout}{v.stderr}"
    manifest = json.loads((out / "manifest.json").read_text())
    if point in AFTER_COMMIT:
        assert manifest["seed"] == 1 and "onnx" not in manifest["artifacts"]  # the new set, whole
    else:
        assert manifest["seed"] == 0 and manifest["artifacts"]["onnx"]["status"] == "ok"  # the old set, whole
