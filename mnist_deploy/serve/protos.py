"""The Python modules of the Open Inference Protocol's gRPC service, generated from its ``.proto`` on first use.

``proto/grpc_predict_v2.proto`` (package ``inference``, service ``GRPCInferenceService``) is the one
source; nothing generated is committed. :func:`load_protos` runs grpcio-tools' ``protoc`` on it once,
into ``$MNIST_DEPLOY_CACHE/grpc`` (else ``~/.cache/mnist-deploy/grpc``) in a folder named by the
``.proto``'s sha256 and the grpcio-tools version, so a changed ``.proto`` or a new protoc generates
afresh and anything else reuses what is there. The folder is written whole or not at all (generated in a
temporary folder beside it, then renamed), so several workers starting at once cannot see half of it.

The generated modules keep the names protoc gives them (``grpc_predict_v2_pb2``, ``..._pb2_grpc``),
which is how the second imports the first; :func:`load_protos` loads both from the cache folder under
those names. A failure (grpcio or grpcio-tools missing, an unwritable cache, protoc's error) is one
:class:`~mnist_deploy.errors.RuntimeUnavailable` line that says what to do.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

from ..errors import RuntimeUnavailable, first_line

PROTO = Path(__file__).resolve().parent / "proto" / "grpc_predict_v2.proto"
MODULES = ("grpc_predict_v2_pb2", "grpc_predict_v2_pb2_grpc")  # protoc's names, the first imported by the second
_lock = threading.Lock()
_loaded: dict[str, tuple[ModuleType, ModuleType]] = {}  # cache key -> (pb2, pb2_grpc)


def cache_root() -> Path:
    base = os.environ.get("MNIST_DEPLOY_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "mnist-deploy") / "grpc"


def _tools_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("grpcio")
        return version("grpcio-tools")
    except PackageNotFoundError as exc:
        raise RuntimeUnavailable(f"gRPC needs the {exc.name} package (pip install -c constraints.txt -e .), or "
                                 "serve with --grpc-port 0") from None


def cache_key(proto: Path = PROTO) -> str:
    """What the generated modules depend on: the .proto's bytes and the protoc that compiles them."""
    digest = hashlib.sha256(proto.read_bytes()).hexdigest()[:20]
    return f"{digest}-grpcio-tools-{_tools_version()}"


def generate(proto: Path, out: Path) -> None:
    """Run grpcio-tools' protoc on ``proto``: ``*_pb2.py`` and ``*_pb2_grpc.py`` into the folder ``out``."""
    from importlib import resources

    from grpc_tools import protoc

    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto, should the file import one
    args = ["grpc_tools.protoc", f"-I{proto.parent}", f"-I{well_known}", f"--python_out={out}",
            f"--grpc_python_out={out}", str(proto)]
    if protoc.main(args) != 0:  # protoc has printed its error on stderr
        raise RuntimeUnavailable(f"protoc could not compile {proto} (its error is above)")


def _complete(folder: Path) -> bool:
    return all((folder / f"{m}.py").is_file() for m in MODULES)


def generated_dir(proto: Path = PROTO) -> Path:
    """The cache folder holding the modules generated from ``proto``, generated now if it is not there."""
    final = cache_root() / cache_key(proto)
    if _complete(final):
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    except OSError as exc:
        raise RuntimeUnavailable(f"cannot write the generated gRPC modules to {final.parent} ({exc.strerror or exc}); "
                                 "set MNIST_DEPLOY_CACHE to a writable folder") from None
    try:
        generate(proto, tmp)
        try:
            tmp.rename(final)
        except OSError:  # another process got there first (use its copy), or a folder was left half-deleted
            if not _complete(final):
                shutil.rmtree(final, ignore_errors=True)
                tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _import(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def load_protos(proto: Path = PROTO) -> tuple[ModuleType, ModuleType]:
    """``(pb2, pb2_grpc)``: the message classes and the service's stub, servicer and registration function."""
    with _lock:
        key = cache_key(proto)
        if key not in _loaded:
            folder = generated_dir(proto)
            try:
                _loaded[key] = tuple(_import(m, folder / f"{m}.py") for m in MODULES)
            except Exception as exc:  # a protobuf or grpcio too old for the generated code, a clashing proto
                raise RuntimeUnavailable(f"cannot load the gRPC modules generated in {folder}: "
                                         f"{first_line(exc)}") from None
        return _loaded[key]


__all__ = ["MODULES", "PROTO", "cache_key", "cache_root", "generate", "generated_dir", "load_protos"]
