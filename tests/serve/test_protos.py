"""The gRPC modules generated from the .proto on first use (mnist_deploy/serve/protos.py): where they go, when
they are made again, what a failure says, and that the service is the protocol's."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from mnist_deploy.errors import RuntimeUnavailable
from mnist_deploy.serve import protos

REPO = Path(__file__).resolve().parents[2]


def test_the_service_is_the_protocols(tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_DEPLOY_CACHE", str(tmp_path))
    pb2, pb2_grpc = protos.load_protos()
    service = pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert service.full_name == "inference.GRPCInferenceService"
    assert [m.name for m in service.methods] == ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata",
                                                 "ModelMetadata", "ModelInfer"]
    fields = {f.name: (f.number, f.type) for f in pb2.ModelInferRequest.DESCRIPTOR.fields}
    assert fields["raw_input_contents"][0] == 7 and fields["inputs"][0] == 5 and fields["id"][0] == 3
    assert {f.name: f.number for f in pb2.ModelInferResponse.DESCRIPTOR.fields}["raw_output_contents"] == 6
    assert hasattr(pb2_grpc, "GRPCInferenceServiceStub") and hasattr(pb2_grpc, "add_GRPCInferenceServiceServicer_to_server")


def test_generated_once_into_a_folder_named_by_the_proto_and_protoc(tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_DEPLOY_CACHE", str(tmp_path))
    folder = protos.generated_dir()
    assert folder.parent == tmp_path / "grpc" and folder.name == protos.cache_key()
    assert sorted(p.name for p in folder.iterdir()) == ["grpc_predict_v2_pb2.py", "grpc_predict_v2_pb2_grpc.py"]
    stamp = [(p, p.stat().st_mtime_ns) for p in folder.iterdir()]
    assert protos.generated_dir() == folder and all(p.stat().st_mtime_ns == t for p, t in stamp)  # reused
    changed = tmp_path / "proto" / "grpc_predict_v2.proto"
    changed.parent.mkdir()
    changed.write_text(protos.PROTO.read_text() + "\n// a change\n")
    other = protos.generated_dir(changed)
    assert other != folder and other.parent == folder.parent and (other / "grpc_predict_v2_pb2.py").is_file()
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".tmp")] == []  # nothing half-made left


def test_a_proto_protoc_refuses_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("MNIST_DEPLOY_CACHE", str(tmp_path))
    broken = tmp_path / "src" / "grpc_predict_v2.proto"
    broken.parent.mkdir()
    broken.write_text('syntax = "proto3";\nmessage M { not_a_type x = 1; }\n')
    with pytest.raises(RuntimeUnavailable, match="protoc could not compile") as exc:
        protos.generated_dir(broken)
    assert "\n" not in str(exc.value)
    assert list((tmp_path / "grpc").iterdir()) == []


def test_an_unwritable_cache_says_what_to_set(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MNIST_DEPLOY_CACHE", str(blocker / "cache"))
    with pytest.raises(RuntimeUnavailable, match="set MNIST_DEPLOY_CACHE") as exc:
        protos.generated_dir()
    assert "\n" not in str(exc.value)


def test_no_generated_module_is_committed():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert [f for f in tracked.splitlines() if f.endswith(("_pb2.py", "_pb2_grpc.py"))] == []
    assert "mnist_deploy/serve/proto/grpc_predict_v2.proto" in tracked.splitlines()
