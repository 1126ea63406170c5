"""The manifest's shape: valid JSON of the wrong shape is one ManifestError naming the field, exit 2,
in every command that reads it (never a traceback)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from click.testing import CliRunner

from mnist_deploy.artifacts.manifest import load_manifest, save_manifest
from mnist_deploy.cli import cli
from mnist_deploy.errors import ManifestError
from mnist_deploy.models import build_model, check_hparams


def _set(dotted: str, value):
    """A mutation that sets ``a.b.c`` in the manifest (creating nothing: the parents must exist)."""

    def mutate(m: dict) -> None:
        *parents, last = dotted.split(".")
        for p in parents:
            m = m[p]
        m[last] = value

    return mutate


def _onnx_entry(**parity):
    def mutate(m: dict) -> None:
        m["artifacts"]["onnx"] = {**m["artifacts"]["state_dict"], "format": "onnx", "status": "ok",
                                  "parity": {"criteria": {"kind": "logits", "atol": 1e-4, "rtol": 0.0,
                                                          "min_agreement": 1.0, **parity}}}
    return mutate


# (id, mutation, the text the one error line must contain). Each is caught on load, so every command
# that reads the manifest refuses it the same way.
SHAPE_CASES = [
    ("artifacts-list", _set("artifacts", [{"path": "x"}]), "artifacts must be a JSON object"),
    ("entry-string", _set("artifacts.state_dict", "mnist_model_state_dict.pth"),
     "artifacts.state_dict must be a JSON object"),
    ("path-null", _set("artifacts.state_dict.path", None), "artifacts.state_dict.path must be a file name"),
    ("path-number", _set("artifacts.state_dict.path", 7), "artifacts.state_dict.path must be a file name, not 7"),
    ("sha-number", _set("artifacts.state_dict.sha256", 12), "artifacts.state_dict.sha256 must be 64"),
    ("size-negative", _set("artifacts.state_dict.size_bytes", -1), "artifacts.state_dict.size_bytes must be"),
    ("files-string", _set("artifacts.state_dict.files", "a.bin"), "artifacts.state_dict.files must be a non-empty"),
    ("files-entry-no-sha", _set("artifacts.state_dict.files", [{"path": "a.bin", "size_bytes": 3}]),
     "artifacts.state_dict.files[0].sha256 must be"),
    ("criteria-string", _onnx_entry(atol="big"), "artifacts.onnx.parity.criteria.atol must be"),
    ("model-list", _set("model", ["mlp"]), "model must be a JSON object"),
    ("model-name-number", _set("model.name", 5), "model.name must be a model name"),
    ("hparams-list", _set("model.hparams", [128, 64]), "model.hparams must be a JSON object"),
    ("hparam-negative", _set("model.hparams.hidden1", -5), "model.hparams.hidden1 must be a width"),
    ("hparam-non-integer", _set("model.hparams.hidden1", 1.5), "model.hparams.hidden1 must be a width"),
    ("hparam-string", _set("model.hparams.hidden1", "128"), "model.hparams.hidden1 must be a width"),
    ("hparam-huge", _set("model.hparams.hidden1", 10**9), "model.hparams.hidden1 must be a width"),
    ("input-shape-strings", _set("model.input_shape", ["784"]), "model.input_shape must be a list of positive"),
    ("input-shape-wrong-size", _set("model.input_shape", [1, 28, 29]), "model.input_shape must be"),
    ("std-zero", _set("preprocessing.std", 0), "preprocessing.std must be a positive number"),
    ("versions-string", _set("versions", "2.13"), "versions must be a JSON object"),
]
# Right on their own, wrong for this model: caught where the model is rebuilt (models.check_hparams),
# so only by the commands that rebuild it.
MODEL_CASES = [
    ("hparam-rate-for-width", _set("model.hparams.hidden1", 0.5), "model.hparams.hidden1 must be an integer"),
    ("hparam-unknown", _set("model.hparams.hidden9", 8), "unknown hyperparameter model.hparams.hidden9"),
    ("model-unknown", _set("model.name", "resnet"), "unknown model 'resnet'"),
]


def _commands(folder, image) -> dict[str, list[str]]:
    a = ["--artifacts", str(folder)]
    data = ["--no-download"]
    return {
        "verify": ["verify", *a, *data],
        "bench": ["bench", *a, "--runtimes", "pytorch", "--batch-sizes", "1", "--min-time", "0.01", *data],
        "predict": ["predict", str(image), *a, "--runtime", "pytorch"],
        "serve": ["serve", *a, "--runtime", "pytorch", "--port", "0"],
        "export": ["export", "--out", str(folder), "--format", "onnx", *data],
        "evaluate": ["evaluate", *a, *data],
    }


@pytest.fixture(scope="module")
def good(trained_mlp) -> dict:
    return json.loads((trained_mlp / "manifest.json").read_text())


@pytest.fixture
def folder_with(trained_mlp, copy_artifacts, good, tmp_path, monkeypatch, mnist_dir):
    """``folder_with(mutate)`` -> (artifacts folder whose manifest is ``good`` mutated, a digit image)."""
    from PIL import Image

    import mnist_deploy.serve

    def _server_must_not_start(*_a, **_k):
        raise AssertionError("serve started on a malformed manifest")

    monkeypatch.setattr(mnist_deploy.serve, "run_server", _server_must_not_start)
    monkeypatch.setenv("MNIST_DEPLOY_DATA", str(mnist_dir))
    image = tmp_path / "digit.png"
    Image.fromarray(np.zeros((28, 28), dtype=np.uint8)).save(image)

    def make(mutate):
        folder = copy_artifacts(trained_mlp)
        manifest = copy.deepcopy(good)
        mutate(manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))
        return folder, image

    return make


def _one_error_line(result) -> str:
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.mark.integration
@pytest.mark.parametrize(("case", "mutate", "message"), SHAPE_CASES, ids=[c[0] for c in SHAPE_CASES])
def test_every_command_refuses_a_malformed_manifest(folder_with, case, mutate, message):
    folder, image = folder_with(mutate)
    for name, args in _commands(folder, image).items():
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, f"{name}: exit {result.exit_code}\n{result.output}"
        line = _one_error_line(result)
        assert message in line, f"{name}: {line}"
        assert "manifest.json" in line, f"{name}: the error names the file: {line}"


@pytest.mark.integration
@pytest.mark.parametrize(("case", "mutate", "message"), MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_commands_that_rebuild_the_model_refuse_bad_hyperparameters(folder_with, case, mutate, message):
    folder, image = folder_with(mutate)
    for name, args in _commands(folder, image).items():
        if name == "verify":
            continue  # verify rebuilds the model only when there are exports to check
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, f"{name}: exit {result.exit_code}\n{result.output}"
        assert message in _one_error_line(result), name


def test_real_manifests_load(trained_mlp, tmp_path):
    """The shapes train, export (failed and multi-file entries included) write are accepted."""
    m = load_manifest(trained_mlp)
    sd = m["artifacts"]["state_dict"]
    m["artifacts"]["onnx"] = {"path": "mnist_model.onnx", "sha256": None, "size_bytes": None, "status": "failed",
                              "error": "parity", "format": "onnx"}
    m["artifacts"]["openvino"] = {**sd, "status": "ok", "files": [
        {"path": "m.xml", "sha256": sd["sha256"], "size_bytes": 3}, {"path": "m.bin", "sha256": "0" * 64,
                                                                    "size_bytes": 0}]}
    save_manifest(tmp_path, m)
    assert load_manifest(tmp_path)["artifacts"]["openvino"]["files"][1]["path"] == "m.bin"


def test_an_ok_entry_needs_its_sha256(tmp_path, good):
    m = copy.deepcopy(good)
    m["artifacts"]["state_dict"]["sha256"] = None  # null is only for a failed export
    save_manifest(tmp_path, m)
    with pytest.raises(ManifestError, match="artifacts.state_dict.sha256 must be 64 lowercase hex digits, not null"):
        load_manifest(tmp_path)


def test_check_hparams():
    assert check_hparams("cnn", {"dropout": 0.5, "hidden": 64})["channels1"] == 16
    for bad in ({"hidden1": True}, {"hidden1": 0}, {"hidden1": 1 << 17}, {"hidden1": 12.0}):
        with pytest.raises(ManifestError, match="model.hparams.hidden1 must be an integer from 1 to 65536"):
            build_model("mlp", bad)
    with pytest.raises(ManifestError, match="model.hparams.dropout must be a number from 0 to 1"):
        build_model("cnn", {"dropout": float("nan")})
