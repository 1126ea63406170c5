"""The format registry: the spine that export, verify, bench, predict and serve share.

One :class:`Format` entry per runtime, in :data:`FORMATS`: its files, options (a dataclass with
defaults; the CLI's options come from it), parity spec, devices, availability check, exporter, loader
(to one :class:`Predictor` signature) and the packages whose versions are recorded. Stages iterate over
or look up this table and never branch on a format's name; adding a runtime is adding one entry
(:func:`register`).
"""

from __future__ import annotations

from .base import (
    DEFAULT_RUNTIME,
    FORMATS,
    FP32_PARITY,
    METADATA_FILE,
    REDUCED_PARITY,
    ExportContext,
    Format,
    LoadError,
    NoOptions,
    ParitySpec,
    Predictor,
    build_options,
    exportable,
    get_format,
    load_predictor,
    option,
    option_types,
    packages,
    register,
    registered,
    resolve,
    unregister,
    validate_options,
    written_as,
)
from .onnx_family import DEFAULT_OPSET, ONNX, ONNX_INT8, OrtPredictor, check_onnx, onnx_opset_range
from .openvino_family import OPENVINO_BF16, OPENVINO_F32, OPENVINO_INT8, OpenVINOPredictor
from .torch_family import (
    PT2,
    PYTORCH,
    TORCH_COMPILE,
    TORCHSCRIPT,
    TorchPredictor,
    load_eager,
    model_from_state_dict,
)

for _fmt in (PYTORCH, TORCH_COMPILE, TORCHSCRIPT, ONNX, PT2, ONNX_INT8, OPENVINO_F32, OPENVINO_BF16, OPENVINO_INT8):
    register(_fmt)

__all__ = [
    "DEFAULT_OPSET", "DEFAULT_RUNTIME", "FORMATS", "FP32_PARITY", "METADATA_FILE", "REDUCED_PARITY",
    "ExportContext", "Format", "LoadError", "NoOptions", "OpenVINOPredictor", "OrtPredictor", "ParitySpec",
    "Predictor", "TorchPredictor", "build_options", "check_onnx", "exportable", "get_format", "load_eager",
    "load_predictor", "model_from_state_dict", "onnx_opset_range", "option", "option_types", "packages",
    "register", "registered", "resolve", "unregister", "validate_options", "written_as",
]
