"""Export: every format in the registry from the trained state_dict (:mod:`.run`), what the exporter
starts from (:mod:`.source`), the parity gate (:mod:`.parity`) and re-checking a folder (:mod:`.verify`)."""

from .run import export_artifacts, onnx_opset_range, verify_artifacts

__all__ = ["export_artifacts", "onnx_opset_range", "verify_artifacts"]
