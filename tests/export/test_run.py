"""Export + parity + verify, on the real MNIST test set with real runtimes (ONNX Runtime, TorchScript,
torch.export). Each format is exported once per model (module-scoped) and reused by the checks."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mnist_deploy.artifacts.files import sha256_file
from mnist_deploy.artifacts.manifest import load_manifest, save_manifest, verified_path
from mnist_deploy.cli import cli
from mnist_deploy.export.run import export_artifacts, onnx_opset_range, verify_artifacts
from mnist_deploy.formats import FORMATS, METADATA_FILE, available, exportable, load_predictor

pytestmark = pytest.mark.integration
ALL = exportable()  # every format export tries; those that cannot run here (no bf16 in OpenVINO, ruled
# out by $MNIST_DEPLOY_UNAVAILABLE) are skipped with the registry's own reason, and tested where they can


def _here() -> tuple[str, ...]:
    """The formats of ALL that this machine can export and run: the registry's availability checks."""
    return available("cpu", ALL)


def _needs(name: str) -> None:
    reason = FORMATS[name].unavailable("cpu")
    if reason:
        pytest.skip(f"{name}: {reason}")


# ---------------------------------------------------------------------------------------------
# Helpers and fixtures.


def _export(folder: Path, mnist_dir: Path, cache_dir: Path, **kw):
    return export_artifacts(artifacts=folder, data_dir=mnist_dir, cache_dir=cache_dir, allow_download=False, **kw)


def _verify(folder: Path, mnist_dir: Path, cache_dir: Path):
    return verify_artifacts(artifacts=folder, data_dir=mnist_dir, cache_dir=cache_dir, allow_download=False)


def _cli(*args, mnist_dir: Path, cache_dir: Path):
    data = ["--data-dir", str(mnist_dir), "--cache-dir", str(cache_dir), "--no-download"]
    return CliRunner().invoke(cli, [*args, *data], catch_exceptions=False)


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file in the folder with its sha256 (to prove that nothing was written)."""
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()}


def _eager(folder: Path):
    """The oracle: the model rebuilt independently from the manifest and the state_dict."""
    from mnist_deploy.models import build_model

    manifest = load_manifest(folder)
    model = build_model(manifest["model"]["name"], manifest["model"]["hparams"])
    model.load_state_dict(torch.load(folder / "mnist_model_state_dict.pth", weights_only=True))
    return model.eval(), tuple(manifest["model"]["input_shape"])


def _test_images(mnist_dir: Path, cache_dir: Path, shape, n: int = 2000):
    from mnist_deploy.data.mnist import load_splits

    splits, _ = load_splits(mnist_dir, cache_dir=cache_dir, allow_download=False)
    x = splits["test"].images[:n].numpy().reshape(n, *shape)
    return np.ascontiguousarray(x), splits["test"].labels[:n].numpy()


def _tamper_onnx(path: Path, delta: float = 1.0) -> None:
    """Change one weight (the first element of the largest initializer) and re-save the file."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    init = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] += delta
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(proto, str(path))


@pytest.fixture(scope="module")
def mlp_exported(exported_mlp):
    return exported_mlp  # conftest's: every format, the full 10,000-image parity run (shared with bench, formats)


@pytest.fixture(scope="module")
def cnn_exported(trained_cnn, tmp_path_factory, mnist_dir, cache_dir):
    folder = tmp_path_factory.mktemp("export-cnn") / "artifacts"
    shutil.copytree(trained_cnn, folder)
    report = _export(folder, mnist_dir, cache_dir, parity_images=1000)  # the full run per format is the MLP's
    return folder, report


# ---------------------------------------------------------------------------------------------
# Round trips on the trained models.


def test_mlp_every_format_passes_parity_and_is_recorded(mlp_exported):
    folder, report = mlp_exported
    assert report.ok, [r.error for r in report.failures]
    assert [r.format for r in report.results] == list(ALL)
    here = _here()
    manifest = load_manifest(folder)
    for r in report.results:  # a format that cannot run here is skipped with its check's reason, unrecorded
        if r.format not in here:
            assert r.status == "skipped" and r.error == FORMATS[r.format].unavailable("cpu"), r
            assert r.format not in manifest["artifacts"]
    sd_sha = manifest["artifacts"]["state_dict"]["sha256"]
    parity = json.loads((folder / "parity.json").read_text())
    assert parity["source_state_dict_sha256"] == sd_sha and set(parity["formats"]) == set(here)
    for name in here:
        entry = manifest["artifacts"][name]
        path = folder / FORMATS[name].files[0]
        assert entry["status"] == "ok" and entry["format"] == name and entry["path"] == path.name
        files = [folder / f for f in FORMATS[name].files]
        assert entry["sha256"] == sha256_file(path) and entry["size_bytes"] == sum(f.stat().st_size for f in files)
        if len(files) > 1:  # every file of a multi-file artifact is recorded with its own sha256
            assert [(f["path"], f["sha256"]) for f in entry["files"]] == [(f.name, sha256_file(f)) for f in files]
        assert entry["source_state_dict_sha256"] == sd_sha
        assert entry["parity"]["passed"] is True
        assert set(entry["parity"]["batch_sizes"]) == {"1", "10000"}
        assert all(run["images"] == 10_000 for run in entry["parity"]["batch_sizes"].values())
        assert parity["formats"][name]["parity"]["passed"] is True
    for name in here:
        p = manifest["artifacts"][name]["parity"]
        if FORMATS[name].parity.kind == "logits":
            assert p["criteria"]["atol"] == 1e-4 and p["max_abs_diff"] < 1e-4 and p["agreement"] == 1.0
        else:
            assert p["agreement"] >= 0.995 and p["reference_accuracy"] - p["accuracy"] <= 0.003
    # the precision OpenVINO actually applied, read back from the compiled model, where it ran
    for name, precision in (("openvino", "f32"), ("openvino-bf16", "bf16")):
        if name in here:
            assert manifest["artifacts"][name]["parity"]["applied"]["precision"] == precision
    assert not list(folder.glob(".*tmp*")), "temporary files left behind"
    assert "PASS" in report.table() and report.table(markdown=True).startswith("| format |")


@pytest.mark.parametrize("name", ALL)
def test_round_trip_same_predictions_as_eager(mlp_exported, mnist_dir, cache_dir, name):
    _needs(name)
    folder, _ = mlp_exported
    model, shape = _eager(folder)
    x, _ = _test_images(mnist_dir, cache_dir, shape)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    got = load_predictor(name, verified_path(folder, name))(x)
    if FORMATS[name].parity.kind == "logits":
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
        assert (got.argmax(1) == expected.argmax(1)).all()
    else:
        assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.99


@pytest.mark.parametrize("name", ALL)
def test_dynamic_batch_axis(mlp_exported, mnist_dir, cache_dir, name):
    _needs(name)
    folder, _ = mlp_exported
    _, shape = _eager(folder)
    x, _ = _test_images(mnist_dir, cache_dir, shape, n=300)
    predictor = load_predictor(name, verified_path(folder, name))
    full = predictor(x)
    for n in (1, 3, 257):
        out = predictor(x[:n])
        assert out.shape == (n, 10)
        np.testing.assert_allclose(out, full[:n], atol=1e-4 if FORMATS[name].parity.kind == "logits" else 1e-3)
    if name in ("onnx", "onnx-int8"):
        import onnxruntime as ort

        session = ort.InferenceSession(str(folder / FORMATS[name].files[0]), providers=["CPUExecutionProvider"])
        (inp,), (out,) = session.get_inputs(), session.get_outputs()
        assert (inp.name, out.name) == ("input", "logits")
        assert isinstance(inp.shape[0], str) and isinstance(out.shape[0], str)  # symbolic batch dimension


def test_onnx_metadata_and_archive_metadata(mlp_exported):
    import onnx

    folder, _ = mlp_exported
    manifest = load_manifest(folder)
    sd_sha = manifest["artifacts"]["state_dict"]["sha256"]
    for name in ("onnx", "onnx-int8"):
        proto = onnx.load(str(folder / FORMATS[name].files[0]))
        props = {p.key: p.value for p in proto.metadata_props}
        assert props["model_name"] == "mlp"
        assert float(props["preprocessing_mean"]) == pytest.approx(0.1307)
        assert float(props["preprocessing_std"]) == pytest.approx(0.3081)
        assert "784" in props["input_layout"]
        assert json.loads(props["class_labels"]) == [str(i) for i in range(10)]
        assert props["source_state_dict_sha256"] == sd_sha
        assert props["toolkit_version"] == manifest["toolkit_version"]
        assert next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 18
    assert props["quantization"] == "static"
    extra = {METADATA_FILE: ""}
    torch.jit.load(str(folder / FORMATS["torchscript"].files[0]), _extra_files=extra)
    assert json.loads(extra[METADATA_FILE])["source_state_dict_sha256"] == sd_sha
    extra = {METADATA_FILE: ""}
    torch.export.load(str(folder / FORMATS["pt2"].files[0]), extra_files=extra)
    assert json.loads(extra[METADATA_FILE])["model_name"] == "mlp"


@pytest.mark.slow
def test_cnn_every_format_passes_parity(cnn_exported):
    folder, report = cnn_exported
    assert report.ok, [r.error for r in report.failures]
    manifest = load_manifest(folder)
    assert manifest["model"]["name"] == "cnn"
    assert {r.format for r in report.results if r.status == "ok"} == set(_here())
    for name in _here():
        assert manifest["artifacts"][name]["status"] == "ok"
        assert manifest["artifacts"][name]["parity"]["passed"] is True
    assert manifest["artifacts"]["onnx"]["parity"]["max_abs_diff"] < 1e-4


@pytest.mark.slow
def test_cnn_verify_passes(cnn_exported, mnist_dir, cache_dir):
    folder, _ = cnn_exported
    report = _verify(folder, mnist_dir, cache_dir)
    assert report.ok, report.problems


def test_other_exporters_and_methods(trained_mlp, copy_artifacts, mnist_dir, cache_dir):
    folder = copy_artifacts(trained_mlp)
    report = _export(folder, mnist_dir, cache_dir, formats=["torchscript", "onnx", "onnx-int8"],
                     torchscript_method="script", onnx_exporter="legacy", opset=17, quantization="dynamic")
    assert report.ok, [r.error for r in report.failures]
    manifest = load_manifest(folder)
    assert manifest["artifacts"]["onnx"]["options"] == {"opset": 17, "onnx_exporter": "legacy"}
    assert manifest["artifacts"]["onnx-int8"]["options"]["quantization"] == "dynamic"
    assert manifest["artifacts"]["torchscript"]["options"] == {"torchscript_method": "script"}
    assert "pt2" not in manifest["artifacts"]


def test_export_into_another_folder_is_self_contained(trained_mlp, tmp_path, mnist_dir, cache_dir):
    out = tmp_path / "deploy"
    report = _export(out, mnist_dir, cache_dir, checkpoint=trained_mlp / "mnist_model_state_dict.pth",
                     formats=["torchscript"])
    assert report.ok
    manifest = load_manifest(out)
    assert manifest["model"]["name"] == "mlp"
    assert sha256_file(out / "mnist_model_state_dict.pth") == sha256_file(trained_mlp / "mnist_model_state_dict.pth")
    assert _verify(out, mnist_dir, cache_dir).ok


def test_no_parity_records_unchecked(trained_mlp, copy_artifacts, mnist_dir, cache_dir):
    folder = copy_artifacts(trained_mlp)
    report = _export(folder, mnist_dir, cache_dir, formats=["pt2"], parity=False)
    assert report.ok and report.results[0].parity["skipped"] is True
    assert "not checked" in report.table()
    assert _verify(folder, mnist_dir, cache_dir).ok  # verify runs the parity check export skipped


# ---------------------------------------------------------------------------------------------
# A deliberately broken artifact: fails the export gate, and verify.


def _broken_onnx_format():
    real = FORMATS["onnx"]

    def export(model, path, options, ctx):
        real.export(model, path, options, ctx)
        _tamper_onnx(path)  # the exporter "miscompiles" one weight

    return dataclasses.replace(real, export=export)


def test_perturbed_artifact_fails_the_gate(trained_mlp, copy_artifacts, mnist_dir, cache_dir, monkeypatch):
    folder = copy_artifacts(trained_mlp)
    monkeypatch.setitem(FORMATS, "onnx", _broken_onnx_format())
    result = _cli("export", "--out", str(folder), "--format", "onnx", "--format", "pt2",
                  mnist_dir=mnist_dir, cache_dir=cache_dir)
    assert result.exit_code == 1
    assert "FAIL" in result.stdout and "PASS" in result.stdout  # pt2 still passes
    assert "error: onnx: batch size 1 and 10000: max abs diff" in result.stderr
    assert "would pass with --atol" in result.stderr
    manifest = load_manifest(folder)
    entry = manifest["artifacts"]["onnx"]
    assert entry["status"] == "failed" and entry["sha256"] is None and entry["parity"]["passed"] is False
    assert entry["parity"]["would_pass_with"]["atol"] > 1e-4
    assert not (folder / "mnist_model.onnx").exists()
    assert manifest["artifacts"]["pt2"]["status"] == "ok"
    assert json.loads((folder / "parity.json").read_text())["formats"]["onnx"]["status"] == "failed"
    assert not list(folder.glob(".*tmp*"))
    # verify refuses the folder too: the manifest says one format failed.
    monkeypatch.undo()
    result = _cli("verify", "--artifacts", str(folder), mnist_dir=mnist_dir, cache_dir=cache_dir)
    assert result.exit_code == 1 and "onnx: recorded as 'failed'" in result.stderr


def test_tiny_atol_fails_the_gate_and_removes_a_previous_good_file(mlp_exported, copy_artifacts, mnist_dir,
                                                                   cache_dir):
    folder = copy_artifacts(mlp_exported[0])
    assert (folder / "mnist_model.pt2").exists()
    result = _cli("export", "--out", str(folder), "--format", "pt2", "--atol", "1e-12",
                  mnist_dir=mnist_dir, cache_dir=cache_dir)
    assert result.exit_code == 1, result.output
    assert "error: pt2:" in result.stderr and "exceeds atol 1e-12" in result.stderr
    assert load_manifest(folder)["artifacts"]["pt2"]["status"] == "failed"
    assert not (folder / "mnist_model.pt2").exists()
    with pytest.raises(Exception, match="sha256|missing"):
        verified_path(folder, "pt2")


def test_verify_passes_then_catches_a_tampered_onnx(mlp_exported, copy_artifacts, mnist_dir, cache_dir):
    folder = copy_artifacts(mlp_exported[0])
    result = _cli("verify", "--artifacts", str(folder), mnist_dir=mnist_dir, cache_dir=cache_dir)
    assert result.exit_code == 0, result.output
    n_formats = len(_here())
    n_items = len(load_manifest(folder)["artifacts"])
    assert f"all {n_items} artifacts verified ({n_formats} formats re-checked for parity)" in result.stdout
    _tamper_onnx(folder / "mnist_model.onnx")
    result = _cli("verify", "--artifacts", str(folder), mnist_dir=mnist_dir, cache_dir=cache_dir)
    assert result.exit_code == 1
    assert all(line.startswith("error: onnx: ") for line in result.stderr.strip().splitlines())
    assert "sha256" in result.stderr and "refusing to load it" in result.stderr
    # Even with the manifest rewritten to vouch for the tampered file, the parity check catches it.
    manifest = load_manifest(folder)
    manifest["artifacts"]["onnx"]["sha256"] = sha256_file(folder / "mnist_model.onnx")
    save_manifest(folder, manifest)
    report = _verify(folder, mnist_dir, cache_dir)
    assert not report.ok
    assert [p.split(":")[0] for p in report.problems] == ["onnx"]
    assert "parity failed" in report.problems[0] and "max abs diff" in report.problems[0]


def test_verify_rejects_a_file_that_is_not_onnx(mlp_exported, copy_artifacts, mnist_dir, cache_dir):
    folder = copy_artifacts(mlp_exported[0])
    (folder / "mnist_model_int8.onnx").write_bytes(b"this is not a protobuf")
    manifest = load_manifest(folder)
    manifest["artifacts"]["onnx-int8"]["sha256"] = sha256_file(folder / "mnist_model_int8.onnx")
    save_manifest(folder, manifest)
    result = _cli("verify", "--artifacts", str(folder), mnist_dir=mnist_dir, cache_dir=cache_dir)
    assert result.exit_code == 1
    assert "error: onnx-int8:" in result.stderr and "not a valid ONNX model" in result.stderr
    assert "Traceback" not in result.output


# ---------------------------------------------------------------------------------------------
# Bad input: one line on stderr, non-zero exit, nothing written.


def _one_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_missing_checkpoint(tmp_path, mnist_dir, cache_dir):
    result = _cli("export", "--checkpoint", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "o"),
                  mnist_dir=mnist_dir, cache_dir=cache_dir)
    assert result.exit_code == 2
    assert "no such checkpoint file" in _one_error_line(result)
    assert not (tmp_path / "o").exists()


def test_corrupt_checkpoint(trained_mlp, copy_artifacts, mnist_dir, cache_dir):
    folder = copy_artifacts(trained_mlp)
    sd = folder / "mnist_model_state_dict.pth"
    sd.write_bytes(sd.read_bytes()[:1000])  # truncated
    before = _snapshot(folder)
    result = _cli("export", "--out", str(folder), mnist_dir=mnist_dir, cache_dir=cache_dir)
    assert result.exit_code == 2
    assert "not a readable PyTorch checkpoint" in _one_error_line(result)
    assert _snapshot(folder) == before


def test_onnx_file_given_as_checkpoint(mlp_exported, tmp_path, mnist_dir, cache_dir):
    result = _cli("export", "--checkpoint", str(mlp_exported[0] / "mnist_model.onnx"), "--out", str(tmp_path / "o"),
                  mnist_dir=mnist_dir, cache_dir=cache_dir)
    assert result.exit_code == 2
    assert "not a PyTorch checkpoint" in _one_error_line(result)
    assert not (tmp_path / "o").exists()


def test_checkpoint_of_another_model(trained_mlp, quick_cnn, copy_artifacts, mnist_dir, cache_dir):
    folder = copy_artifacts(trained_mlp)
    shutil.copyfile(quick_cnn / "mnist_model_state_dict.pth", folder / "mnist_model_state_dict.pth")
    before = _snapshot(folder)
    result = _cli("export", "--out", str(folder), mnist_dir=mnist_dir, cache_dir=cache_dir)
    assert result.exit_code == 2
    line = _one_error_line(result)
    assert "does not match the model" in line and "manifest says model 'mlp'" in line
    assert _snapshot(folder) == before


def test_checkpoint_not_the_recorded_state_dict(trained_mlp, copy_artifacts, mnist_dir, cache_dir):
    folder = copy_artifacts(trained_mlp)
    sd = torch.load(folder / "mnist_model_state_dict.pth", weights_only=True)
    sd["fc3.bias"] += 1.0
    torch.save(sd, folder / "other.pth")
    before = _snapshot(folder)
    result = _cli("export", "--out", str(folder), "--checkpoint", str(folder / "other.pth"),
                  mnist_dir=mnist_dir, cache_dir=cache_dir)
    assert result.exit_code == 2
    assert "is not the state_dict recorded in" in _one_error_line(result)
    assert _snapshot(folder) == before


def test_no_manifest(tmp_path, trained_mlp, mnist_dir, cache_dir):
    shutil.copyfile(trained_mlp / "mnist_model_state_dict.pth", tmp_path / "m.pth")
    result = _cli("export", "--checkpoint", str(tmp_path / "m.pth"), "--out", str(tmp_path / "o"),
                  mnist_dir=mnist_dir, cache_dir=cache_dir)
    assert result.exit_code == 2 and "no manifest" in _one_error_line(result)
    result = _cli("verify", "--artifacts", str(tmp_path), mnist_dir=mnist_dir, cache_dir=cache_dir)
    assert result.exit_code == 2 and "no manifest" in _one_error_line(result)


def test_unknown_format(trained_mlp, mnist_dir, cache_dir):
    result = _cli("export", "--out", str(trained_mlp), "--format", "tflite", mnist_dir=mnist_dir, cache_dir=cache_dir)
    names = ", ".join(f"'{n}'" for n in (*exportable(), "all"))
    assert result.exit_code == 2 and f"'tflite' is not one of {names}" in result.stderr
    with pytest.raises(Exception, match="unknown format 'tflite'"):
        export_artifacts(artifacts=trained_mlp, formats=["tflite"])


@pytest.mark.parametrize("args, message", [
    (["--opset", "5"], "--opset 5: the dynamo ONNX exporter writes opsets 18-"),
    (["--opset", "17"], "the legacy exporter writes 7-20 (--onnx-exporter legacy)"),
    (["--opset", "99", "--format", "onnx-int8"], "--opset 99"),
    (["--opset", "21", "--onnx-exporter", "legacy"], "the legacy ONNX exporter writes opsets 7-20"),
    (["--min-agreement", "1.5"], "--min-agreement is a fraction between 0 and 1"),
    (["--atol", "-1"], "--atol must be a finite number >= 0"),
])
def test_bad_options(trained_mlp, copy_artifacts, mnist_dir, cache_dir, args, message):
    folder = copy_artifacts(trained_mlp)
    before = _snapshot(folder)
    result = _cli("export", "--out", str(folder), *args, mnist_dir=mnist_dir, cache_dir=cache_dir)
    assert result.exit_code == 2  # a usage error, as the README promises
    assert message in _one_error_line(result)
    assert _snapshot(folder) == before


def test_dynamo_opset_fallback_is_refused(tmp_path):
    """Asked for an opset it cannot convert to, the dynamo exporter quietly writes 18; that is an error."""
    from mnist_deploy.errors import ExportError
    from mnist_deploy.formats import ExportContext
    from mnist_deploy.formats.onnx_family import OnnxOptions
    from mnist_deploy.models import build_model

    ctx = ExportContext(example=torch.zeros(2, 784))
    with pytest.raises(ExportError, match="cannot write opset 13 for this model"):
        FORMATS["onnx"].export(build_model("mlp").eval(), tmp_path / "m.onnx", OnnxOptions(opset=13), ctx)


def test_opset_range_is_what_the_exporters_write():
    import onnx

    assert onnx_opset_range("legacy") == (7, 20)
    assert onnx_opset_range("dynamo") == (18, onnx.defs.onnx_opset_version())


def test_help_mentions_torchscript_deprecation():
    result = CliRunner().invoke(cli, ["export", "--help"])
    assert result.exit_code == 0
    assert "deprecated" in result.output and "torchscript" in result.output
    assert "--opset" in result.output and "--no-parity" in result.output
    result = CliRunner().invoke(cli, ["verify", "--help"])
    assert result.exit_code == 0 and "sha256" in result.output


def test_cli_export_prints_the_table(trained_mlp, copy_artifacts, mnist_dir, cache_dir):
    folder = copy_artifacts(trained_mlp)
    result = _cli("export", "--out", str(folder), "--format", "torchscript", "--markdown",
                  mnist_dir=mnist_dir, cache_dir=cache_dir)
    assert result.exit_code == 0, result.output
    assert "| format | file | size | export time | max abs diff | agreement | accuracy | verdict |" in result.stdout
    assert "| torchscript | mnist_model_torchscript.pt |" in result.stdout and "PASS" in result.stdout
    assert "warn" not in result.output.lower()  # TorchScript's deprecation warnings stay out of the user's face
