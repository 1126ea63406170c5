"""The format registry: the spine that export, verify, bench, predict and serve share.

One :class:`Format` entry per runtime, in :data:`FORMATS`: its files, options (a dataclass with
defaults; the CLI's options come from it), parity spec, devices, availability check, exporter, loader
(to one :class:`Predictor` signature) and the packages whose versions are recorded. Stages iterate over
or look up this table and never branch on a format's name; adding a runtime is adding one entry
(:func:`register`).
"""

from __future__ import annotations

from .aoti_family import AOTI, AOTI_CPP, TORCHSCRIPT_CPP
from .artifact import artifact_path, entry_problem, entry_usable, open_artifact
from .base import (
    DEFAULT_RUNTIME,
    FORMATS,
    FP32_PARITY,
    MAX_EXPORTED_BATCH,
    METADATA_FILE,
    REDUCED_PARITY,
    UNAVAILABLE_ENV,
    ExportContext,
    Format,
    LoadError,
    NoOptions,
    ParitySpec,
    Predictor,
    available,
    build_options,
    exportable,
    format_names,
    get_format,
    load_predictor,
    option,
    option_types,
    packages,
    register,
    registered,
    resolve,
    ruled_out,
    runtime_names,
    unregister,
    validate_options,
    written_as,
)
from .js_node import ONNX_NODE
from .js_web import ORT_WEB, ORT_WEB_1T, ORT_WEB_WEBGPU
from .onnx_family import DEFAULT_OPSET, ONNX, ONNX_INT8, OrtPredictor, check_onnx, onnx_opset_range
from .openvino_family import OPENVINO_BF16, OPENVINO_F32, OPENVINO_INT8, OpenVINOPredictor
from .torch_family import (
    EXTRA_FORMATS,
    PT2,
    PYTORCH,
    TORCH_COMPILE,
    TORCHSCRIPT,
    TorchPredictor,
    load_eager,
    model_from_state_dict,
)

for _fmt in (PYTORCH, TORCH_COMPILE, TORCHSCRIPT, ONNX, PT2, ONNX_INT8, OPENVINO_F32, OPENVINO_BF16, OPENVINO_INT8,
             AOTI, TORCHSCRIPT_CPP, AOTI_CPP, ONNX_NODE, ORT_WEB, ORT_WEB_1T, ORT_WEB_WEBGPU):
    register(_fmt)

__all__ = [
    "AOTI", "AOTI_CPP", "DEFAULT_OPSET", "DEFAULT_RUNTIME", "EXTRA_FORMATS", "FORMATS", "FP32_PARITY",
    "MAX_EXPORTED_BATCH", "METADATA_FILE", "ONNX_NODE", "ORT_WEB", "ORT_WEB_1T", "ORT_WEB_WEBGPU", "REDUCED_PARITY",
    "TORCHSCRIPT_CPP", "UNAVAILABLE_ENV",
    "ExportContext", "Format", "LoadError", "NoOptions", "OpenVINOPredictor", "OrtPredictor", "ParitySpec",
    "Predictor", "TorchPredictor", "artifact_path", "available", "build_options", "check_onnx", "entry_problem",
    "entry_usable", "exportable", "format_names", "get_format", "load_eager", "load_predictor", "model_from_state_dict",
    "onnx_opset_range", "open_artifact", "option", "option_types", "packages", "register", "registered", "resolve",
    "ruled_out", "runtime_names", "unregister", "validate_options", "written_as",
]
