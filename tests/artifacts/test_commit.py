"""replace_set in-process: new folders, kept files, errors, and the journal fallback."""

from __future__ import annotations

import errno
import os

import pytest

from mnist_deploy.artifacts import commit as artifact_set
from mnist_deploy.artifacts.commit import ArtifactWriteError, replace_set


def _write(stage, **files):
    for name, text in files.items():
        (stage / name).write_text(text)


def _leftovers(out):
    return [p.name for p in out.parent.iterdir() if ".train-" in p.name] + \
        [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_new_folder_gets_the_set_and_the_umask(tmp_path):
    out = tmp_path / "new"
    with replace_set(out) as stage:
        _write(stage, **{"a.bin": "A", "manifest.json": "{}"})
    assert sorted(p.name for p in out.iterdir()) == ["a.bin", "manifest.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask
    assert not _leftovers(out)


def test_replaces_named_files_and_keeps_the_rest(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _write(out, **{"a.bin": "old", "manifest.json": "old", "model.onnx": "keep"})
    (out / "sub").mkdir()
    (out / "sub" / "x").write_text("keep too")
    with replace_set(out) as stage:
        _write(stage, **{"a.bin": "new", "manifest.json": "new"})
    assert (out / "a.bin").read_text() == "new" and (out / "manifest.json").read_text() == "new"
    assert (out / "model.onnx").read_text() == "keep" and (out / "sub" / "x").read_text() == "keep too"
    assert not _leftovers(out)


@pytest.mark.parametrize("exc", [KeyboardInterrupt, OSError(errno.ENOSPC, "No space left on device")])
def test_a_failure_inside_leaves_the_folder_untouched(tmp_path, exc):
    out = tmp_path / "out"
    out.mkdir()
    _write(out, **{"a.bin": "old", "manifest.json": "old"})
    expected = ArtifactWriteError if isinstance(exc, OSError) else KeyboardInterrupt
    with pytest.raises(expected) as info, replace_set(out) as stage:
        _write(stage, **{"a.bin": "new"})
        raise exc
    if expected is ArtifactWriteError:
        assert str(info.value) == (f"cannot write the artifacts to {out}: No space left on device; "
                                   "the previous artifacts are unchanged")
    assert (out / "a.bin").read_text() == "old" and not _leftovers(out)


def test_refused_hard_links_fall_back_to_the_journal(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    _write(out, **{"a.bin": "old", "manifest.json": "old", "other": "keep"})

    def refuse(*_a, **_k):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(artifact_set.os, "link", refuse)
    with replace_set(out) as stage:
        _write(stage, **{"a.bin": "new", "manifest.json": "new"})
    assert (out / "a.bin").read_text() == "new" and (out / "manifest.json").read_text() == "new"
    assert (out / "other").read_text() == "keep" and not _leftovers(out)
