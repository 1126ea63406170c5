"""`mnist-deploy package`: the Triton model repository (parsed with Triton's own ModelConfig schema),
the KServe InferenceService, the sha256 of the packaged file, and the refusals."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from _serving import onnx_artifacts
from click.testing import CliRunner

from mnist_deploy.cli import cli
from mnist_deploy.errors import ExportError
from mnist_deploy.package import PackageConfig, onnx_tensor_specs, package_artifacts


def triton_model_config():
    """Triton's ``model_config_pb2`` as shipped in tritonclient. It lives under tritonclient/grpc,
    whose ``__init__`` refuses to import without the [grpc] extra (which wants protobuf<7, ruled out
    by onnx's pin), so the generated module is loaded from its file: it needs only protobuf."""
    name = "_triton_model_config_pb2"
    if name not in sys.modules:
        tritonclient = pytest.importorskip("tritonclient")
        path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def parse_config(path: Path):
    from google.protobuf import text_format

    pb2 = triton_model_config()
    return text_format.Parse(path.read_text(encoding="utf-8"), pb2.ModelConfig()), pb2


@pytest.fixture(scope="module")
def exported(trained_mlp, tmp_path_factory, mnist_dir, cache_dir) -> Path:
    return onnx_artifacts(trained_mlp, tmp_path_factory.mktemp("package"), mnist_dir, cache_dir)


@pytest.fixture
def own_copy(exported, tmp_path) -> Path:
    dst = tmp_path / "artifacts"
    shutil.copytree(exported, dst)
    return dst


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_repository_parses_with_tritons_schema_and_matches_the_onnx_graph(exported, tmp_path):
    import onnxruntime as ort

    result = package_artifacts(artifacts=exported, out=tmp_path / "pkg")
    assert result.config_path == tmp_path / "pkg" / "model_repository" / "mlp" / "config.pbtxt"
    config, pb2 = parse_config(result.config_path)

    assert config.name == "mlp"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 256
    assert list(config.version_policy.specific.versions) == [1]
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    for tensors, ort_tensors in ((config.input, session.get_inputs()), (config.output, session.get_outputs())):
        assert [t.name for t in tensors] == [t.name for t in ort_tensors]
        for t, o in zip(tensors, ort_tensors, strict=True):
            assert t.data_type == pb2.TYPE_FP32 and o.type == "tensor(float)"
            assert list(t.dims) == o.shape[1:]  # the batch axis is Triton's, not in dims
    assert [list(t.dims) for t in config.input] == [manifest(exported)["model"]["input_shape"]]
    assert [list(t.dims) for t in config.output] == [[10]]
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 0
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, pb2.ModelInstanceGroup.KIND_CPU)]

    # the packaged file is the one the manifest vouches for, byte for byte
    digest = hashlib.sha256(result.model_path.read_bytes()).hexdigest()
    assert digest == manifest(exported)["artifacts"]["onnx"]["sha256"] == result.sha256
    assert result.model_path == result.config_path.parent / "1" / "model.onnx"
    assert not any(p.name.startswith(".") for p in (tmp_path / "pkg").rglob("*"))  # no staging left behind


def test_packaged_model_computes_what_the_served_model_computes(exported, tmp_path, mnist_dir):
    import onnxruntime as ort

    from mnist_deploy.data.mnist import load_raw
    from mnist_deploy.predict import load_model, normalize_pixels

    result = package_artifacts(artifacts=exported, out=tmp_path / "pkg")
    x = normalize_pixels(load_raw(mnist_dir, allow_download=False).arrays["test-images"][:64].reshape(64, 784))
    session = ort.InferenceSession(str(result.model_path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"input": x})[0]
    want = load_model(artifacts=exported, runtime="pytorch").logits(x)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_inference_service_is_kserve_v1beta1_onnx_v2(exported, tmp_path):
    yaml = pytest.importorskip("yaml")
    result = package_artifacts(artifacts=exported, out=tmp_path / "pkg",
                               config=PackageConfig(name="digits", storage_uri="gs://bucket/models/model_repository"))
    doc = yaml.safe_load(result.inference_service_path.read_text())
    assert result.inference_service_path == tmp_path / "pkg" / "inferenceservice.yaml"
    assert doc["apiVersion"] == "serving.kserve.io/v1beta1" and doc["kind"] == "InferenceService"
    assert doc["metadata"]["name"] == "digits"
    model = doc["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "onnx"}
    assert model["protocolVersion"] == "v2"
    assert model["storageUri"] == "gs://bucket/models/model_repository"
    config, _ = parse_config(result.repository / "digits" / "config.pbtxt")
    assert config.name == "digits"  # Triton requires the folder's name


def test_cli_package_passes_batching_and_instance_options(exported, tmp_path):
    out = tmp_path / "pkg"
    res = CliRunner().invoke(cli, ["package", "--artifacts", str(exported), "--out", str(out),
                                   "--max-batch-size", "64", "--max-queue-delay-us", "500",
                                   "--preferred-batch-size", "32", "--preferred-batch-size", "16",
                                   "--instances", "2", "--instance-kind", "auto", "--model-version", "3"])
    assert res.exit_code == 0, res.output
    assert "model.onnx" in res.output and "fill in storageUri" in res.output
    config, pb2 = parse_config(out / "model_repository" / "mlp" / "config.pbtxt")
    assert config.max_batch_size == 64
    assert list(config.dynamic_batching.preferred_batch_size) == [16, 32]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(g.count, g.kind) for g in config.instance_group] == [(2, pb2.ModelInstanceGroup.KIND_AUTO)]
    assert list(config.version_policy.specific.versions) == [3]
    assert (out / "model_repository" / "mlp" / "3" / "model.onnx").is_file()


def test_cli_refuses_artifacts_without_an_onnx_export(trained_mlp, tmp_path):
    res = CliRunner().invoke(cli, ["package", "--artifacts", str(trained_mlp), "--out", str(tmp_path / "pkg")])
    assert res.exit_code == 2
    assert "no 'onnx' artifact" in res.output and "mnist-deploy export" in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "pkg").exists()


def test_cli_refuses_a_failed_export(own_copy, tmp_path):
    m = manifest(own_copy)
    m["artifacts"]["onnx"]["status"] = "failed"
    m["artifacts"]["onnx"]["error"] = "parity: max abs diff 3.2 > 1e-4"
    (own_copy / "manifest.json").write_text(json.dumps(m))
    res = CliRunner().invoke(cli, ["package", "--artifacts", str(own_copy), "--out", str(tmp_path / "pkg")])
    assert res.exit_code == 2
    assert "marked 'failed'" in res.output and "parity" in res.output
    assert not (tmp_path / "pkg").exists()


def test_cli_refuses_a_tampered_onnx_file(own_copy, tmp_path):
    path = own_copy / "mnist_model.onnx"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    path.write_bytes(bytes(data))
    res = CliRunner().invoke(cli, ["package", "--artifacts", str(own_copy), "--out", str(tmp_path / "pkg")])
    assert res.exit_code == 1
    assert "sha256" in res.output and "refusing" in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "pkg").exists()


def test_existing_model_folder_needs_overwrite(exported, tmp_path):
    out = tmp_path / "pkg"
    runner = CliRunner()
    args = ["package", "--artifacts", str(exported), "--out", str(out)]
    assert runner.invoke(cli, args).exit_code == 0
    (out / "model_repository" / "mlp" / "stale.txt").write_text("from an earlier run")
    res = runner.invoke(cli, args)
    assert res.exit_code == 2 and "--overwrite" in res.output
    assert (out / "model_repository" / "mlp" / "stale.txt").exists()  # untouched
    res = runner.invoke(cli, [*args, "--overwrite"])
    assert res.exit_code == 0, res.output
    assert not (out / "model_repository" / "mlp" / "stale.txt").exists()
    assert (out / "model_repository" / "mlp" / "1" / "model.onnx").is_file()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("args, message", [
    (["--name", "Bad_Name"], "lowercase letters"),
    (["--preferred-batch-size", "512"], "must lie in 1..256"),
    (["--format", "pt2"], "Invalid value for '--format'"),
    (["--max-batch-size", "0"], "must be at least 1"),
    # Issue 18: each of these gave exit 0 and a config Triton or KServe rejects.
    (["--name", "mlp\n"], "lowercase letters"),  # "$" matched before the trailing newline
    (["--name", "mlp\nx"], "lowercase letters"),
    (["--model-version", str(2**63)], "--model-version 9223372036854775808 is out of range"),  # int64
    (["--max-batch-size", str(2**31)], "--max-batch-size 2147483648 is out of range"),  # int32
    (["--instances", str(2**31)], "--instances 2147483648 is out of range"),  # int32
    (["--max-queue-delay-us", str(2**64)], "--max-queue-delay-us 18446744073709551616 is out of range"),  # uint64
    (["--storage-uri", 's3://b/m"\n      runtime: "x'], "is not a storage URI"),  # YAML injection
    (["--storage-uri", "s3://b/m x"], "is not a storage URI"),
    (["--storage-uri", "model_repository"], "is not a storage URI"),
])
def test_cli_bad_options(exported, tmp_path, args, message):
    res = CliRunner().invoke(cli, ["package", "--artifacts", str(exported), "--out", str(tmp_path / "pkg"), *args])
    assert res.exit_code == 2, res.output
    assert message in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "pkg" / "model_repository" / "mlp").exists()
    assert not (tmp_path / "pkg" / "inferenceservice.yaml").exists()


def test_values_at_the_edges_of_tritons_ranges_parse(exported, tmp_path):
    # The largest value of each field's protobuf type is accepted, and Triton's own schema reads it back.
    out = tmp_path / "pkg"
    res = CliRunner().invoke(cli, ["package", "--artifacts", str(exported), "--out", str(out),
                                   "--model-version", str(2**63 - 1), "--max-batch-size", str(2**31 - 1),
                                   "--instances", str(2**31 - 1), "--max-queue-delay-us", str(2**64 - 1)])
    assert res.exit_code == 0, res.output
    config, _ = parse_config(out / "model_repository" / "mlp" / "config.pbtxt")
    assert list(config.version_policy.specific.versions) == [2**63 - 1]
    assert config.max_batch_size == 2**31 - 1 and config.instance_group[0].count == 2**31 - 1
    assert config.dynamic_batching.max_queue_delay_microseconds == 2**64 - 1


@pytest.mark.parametrize("uri", ['s3://b/m"x', "gs://b/it's#not:{a}[map]&*x|y>z", 's3://b/"\\u0000\\'])
def test_inference_service_yaml_keeps_any_storage_uri_one_scalar(uri):
    yaml = pytest.importorskip("yaml")
    from mnist_deploy.package import inference_service

    doc = yaml.safe_load(inference_service(name="digits", cfg=PackageConfig(storage_uri=uri)))
    model = doc["spec"]["predictor"]["model"]
    assert model["storageUri"] == uri
    assert sorted(model) == ["livenessProbe", "modelFormat", "protocolVersion", "readinessProbe", "resources",
                             "startupProbe", "storageUri"]
    assert sorted(doc) == ["apiVersion", "kind", "metadata", "spec"]


def test_pbtxt_strings_are_escaped():
    # Tensor names come from the ONNX graph; a quote or newline in one must not end the string.
    from google.protobuf import text_format

    from mnist_deploy.package import TensorSpec, triton_config

    pb2 = triton_model_config()
    odd = 'x"\nname: "evil\\'
    text = triton_config(name="mlp", cfg=PackageConfig(), inputs=[TensorSpec(odd, "TYPE_FP32", (784,))],
                         outputs=[TensorSpec("y", "TYPE_FP32", (10,))], sha256="0" * 64, source="test")
    config = text_format.Parse(text, pb2.ModelConfig())
    assert config.name == "mlp" and config.input[0].name == odd


@pytest.mark.parametrize("previous", [False, True], ids=["first", "overwrite"])
def test_a_yaml_that_cannot_be_written_leaves_no_model_folder(exported, tmp_path, previous):
    # The package is one unit: the exit was 1 but the new model folder stayed in the repository.
    out = tmp_path / "pkg"
    args = ["package", "--artifacts", str(exported), "--out", str(out)]
    model = out / "model_repository" / "mlp"
    if previous:
        assert CliRunner().invoke(cli, args).exit_code == 0
        (model / "marker.txt").write_text("the previous package")
        (out / "inferenceservice.yaml").unlink()
    (out / "inferenceservice.yaml").mkdir(parents=True)  # a folder where the file goes: the rename fails
    (out / "inferenceservice.yaml" / "keep").write_text("x")
    res = CliRunner().invoke(cli, [*args, "--overwrite", "--model-version", "7"])
    assert res.exit_code == 1, res.output
    assert "inferenceservice.yaml" in res.output and "Traceback" not in res.output
    if previous:
        assert (model / "marker.txt").read_text() == "the previous package"
        assert not (model / "7").exists()
    else:
        assert not model.exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_cli_formats_mirror_the_registrys_onnx_formats():
    from mnist_deploy.cli import PACKAGE_FORMATS
    from mnist_deploy.package import ONNX_FORMATS

    assert PACKAGE_FORMATS == ONNX_FORMATS == ("onnx", "onnx-int8")


def test_missing_artifacts_folder_is_one_clear_error(tmp_path):
    res = CliRunner().invoke(cli, ["package", "--artifacts", str(tmp_path / "nope"), "--out", str(tmp_path / "pkg")])
    assert res.exit_code == 2 and "no such artifacts folder" in res.output


def test_a_fixed_batch_axis_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 784])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 784])])
    path = tmp_path / "fixed.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(ExportError, match="fixed batch axis"):
        onnx_tensor_specs(path)

    graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    onnx.save(helper.make_model(graph), str(path))
    inputs, outputs = onnx_tensor_specs(path)
    assert [(s.name, s.datatype, s.dims) for s in inputs + outputs] == [("x", "TYPE_FP32", (784,)),
                                                                       ("y", "TYPE_FP32", (784,))]
