"""artifacts: atomic writes leave nothing behind on failure; sha256-gated loading."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import torch

from mnist_deploy.artifacts.files import atomic_path, atomic_torch_save, atomic_write_text
from mnist_deploy.artifacts.manifest import record_artifact, save_manifest, verified_path
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


@pytest.fixture
def umask():
    """``umask(mask)`` sets this process's umask for the test; the old one comes back afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)],
                         ids=["umask022", "umask027", "umask002"])
def test_final_files_respect_the_umask(tmp_path, umask, mask, mode):
    # mkstemp's 0600 used to survive the rename: nobody else could read the manifest or the model.
    umask(mask)
    written = [
        atomic_write_text(tmp_path / "a.json", "{}"),
        atomic_torch_save({"w": torch.zeros(2)}, tmp_path / "m.pth"),
        save_manifest(tmp_path, {"artifacts": {}}),
    ]
    with atomic_path(tmp_path / "plot.png") as tmp:
        tmp.write_bytes(b"png")
    with atomic_path(tmp_path / "replaced.onnx") as tmp:  # a writer that puts its own (0600) file there
        tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
    written += [tmp_path / "plot.png", tmp_path / "replaced.onnx"]
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in written} == {p.name: oct(mode) for p in written}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)


def test_train_outputs_are_readable_by_others(tmp_path, mnist_dir):
    """The whole set train writes (state_dict, metrics, plots, manifest) is 0644 under umask 022."""
    out = tmp_path / "art"
    r = subprocess.run(
        [sys.executable, "-m", "mnist_deploy", "train", "--subset", "2000", "--epochs", "1", "--out", str(out),
         "--data-dir", str(mnist_dir), "--no-download"],
        capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.umask(0o022),
        env={**os.environ, "MNIST_DEPLOY_CACHE": str(tmp_path / "cache")},
    )
    assert r.returncode == 0, r.stderr
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in out.iterdir()}
    assert {"manifest.json", "mnist_model_state_dict.pth", "metrics.json"} <= set(modes)
    assert modes == dict.fromkeys(modes, oct(0o644))


# ---------------------------------------------------------------------------------------------
# A manifest vouches only for files in its own folder.


def _entry_for(path, name):
    from mnist_deploy.artifacts.manifest import artifact_entry

    return {**artifact_entry(path), "path": name}


@pytest.mark.parametrize("name", ["../outside.onnx", "sub/../../outside.onnx", "ABSOLUTE"])
def test_manifest_paths_outside_the_folder_are_refused(tmp_path, name):
    folder = tmp_path / "art"
    folder.mkdir()
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(b"a valid model, elsewhere")
    name = str(outside) if name == "ABSOLUTE" else name
    manifest = {"artifacts": {"onnx": _entry_for(outside, name)}}
    # Through the check verified_path makes itself (the manifest handed in, as bench and predict do) ...
    with pytest.raises(ManifestError, match=r"artifact path .* is outside .*; refusing it"):
        verified_path(folder, "onnx", manifest)
    # ... and on load, so that no command resolves it at all.
    save_manifest(folder, manifest)
    with pytest.raises(ManifestError, match=r"artifacts.onnx.path must be a file name inside the artifacts folder"):
        verified_path(folder, "onnx")


def test_symlinks_that_leave_the_folder_are_refused(tmp_path):
    folder = tmp_path / "art"
    (folder / "sub").mkdir(parents=True)
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(b"model")
    (folder / "model.onnx").symlink_to(outside)
    (folder / "sub" / "real.onnx").write_bytes(b"model")
    (folder / "inside.onnx").symlink_to(folder / "sub" / "real.onnx")
    save_manifest(folder, {"artifacts": {"onnx": _entry_for(outside, "model.onnx"),
                                         "in": _entry_for(outside, "inside.onnx"),
                                         "sub": _entry_for(outside, "sub/real.onnx")}})
    with pytest.raises(IntegrityError, match=r"model.onnx: leads to .*outside.onnx, outside .*refusing to load"):
        verified_path(folder, "onnx")
    assert verified_path(folder, "in") == folder / "inside.onnx"  # a link within the folder is fine
    assert verified_path(folder, "sub") == folder / "sub" / "real.onnx"


@pytest.mark.integration
def test_cli_refuses_a_state_dict_from_elsewhere(trained_mlp, copy_artifacts, tmp_path):
    """An absolute path to a valid state_dict elsewhere, with its right sha256, used to pass verify and predict."""
    import json

    import numpy as np
    from click.testing import CliRunner
    from PIL import Image

    from mnist_deploy.cli import cli

    folder = copy_artifacts(trained_mlp)
    elsewhere = tmp_path / "elsewhere.pth"
    (folder / "mnist_model_state_dict.pth").rename(elsewhere)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["artifacts"]["state_dict"]["path"] = str(elsewhere)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    image = tmp_path / "digit.png"
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(image)
    for args in (["verify", "--artifacts", str(folder), "--no-download"],
                 ["predict", str(image), "--artifacts", str(folder), "--runtime", "pytorch"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, f"{args[0]}: {result.output}"
        assert "artifacts.state_dict.path must be a file name inside the artifacts folder" in result.output
        assert "Traceback" not in result.output


def test_torchscript_renamed_pth_is_named_without_warnings(tmp_path):
    import warnings

    from mnist_deploy.artifacts.files import safe_torch_load
    from mnist_deploy.errors import CheckpointError
    from mnist_deploy.models import build_model

    path = tmp_path / "model.pth"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's own deprecation notice, not what is tested
        torch.jit.trace(build_model("mlp").eval(), torch.zeros(1, 784)).save(str(path))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match=r"model.pth: a TorchScript archive \(torch.jit.save\), not a st"):
            safe_torch_load(path)
    assert [str(w.message) for w in seen] == []
    torch.save(build_model("mlp").state_dict(), path)  # a real state_dict still loads, and quietly
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert set(safe_torch_load(path)) == set(build_model("mlp").state_dict())
    assert [str(w.message) for w in seen] == []
