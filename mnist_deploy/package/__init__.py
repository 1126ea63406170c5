"""`mnist-deploy package`: the ONNX export for a cluster.

* :mod:`.run` -- the Triton model repository (``config.pbtxt`` + the sha256-checked ``model.onnx``),
  written with the YAML files as one unit: :func:`package_artifacts`;
* :mod:`.kubernetes` -- the KServe InferenceService, and a Deployment + Service running this server,
  with probes that follow its lifecycle.
"""

from __future__ import annotations

from .kubernetes import IMAGE_PLACEHOLDER, STORAGE_URI_PLACEHOLDER, deployment, inference_service
from .run import (
           ONNX_FORMATS,
           PackageConfig,
           PackageResult,
           TensorSpec,
           onnx_tensor_specs,
           package_artifacts,
           triton_config,
)

__all__ = ["IMAGE_PLACEHOLDER", "ONNX_FORMATS", "STORAGE_URI_PLACEHOLDER", "PackageConfig", "PackageResult", "TensorSpec",
           "deployment", "inference_service", "onnx_tensor_specs", "package_artifacts", "triton_config"]
