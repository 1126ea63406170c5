"""artifacts: atomic writes leave nothing behind on failure; sha256-gated loading."""

from __future__ import annotations

import pytest

from mnist_deploy.artifacts import atomic_path, atomic_write_text, record_artifact, verified_path
from mnist_deploy.errors import IntegrityError, ManifestError


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "f.txt"
    atomic_write_text(p, "old")
    with pytest.raises(RuntimeError), atomic_path(p) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert p.read_text() == "old"
    assert [x.name for x in tmp_path.iterdir()] == ["f.txt"]


def test_verified_path_refuses_changed_files(tmp_path):
    f = tmp_path / "model.onnx"
    f.write_bytes(b"abc")
    record_artifact(tmp_path, "onnx", f, format="onnx", status="ok")
    assert verified_path(tmp_path, "onnx") == f
    f.write_bytes(b"abd")
    with pytest.raises(IntegrityError, match="refusing to load"):
        verified_path(tmp_path, "onnx")
    with pytest.raises(ManifestError, match="no artifact 'pt2'"):
        verified_path(tmp_path, "pt2")
    f.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        verified_path(tmp_path, "onnx")
