"""A Seldon MLServer custom runtime serving mnist-deploy's exported ``mnist_model.onnx`` with the same
tensors as our Open Inference Protocol routes (mnist_deploy/serve/v2.py), so the two servers can be
compared request for request (benchmarks/compare_mlserver.py).

Runs inside MLServer's own venv (scripts/mlserver_env.sh), never ours: it imports only mlserver,
onnxruntime and numpy. Its model-settings.json (written by compare_mlserver.py) names the ONNX file in
``parameters.uri`` and carries the manifest's normalisation and input shape in ``parameters.extra``.

Tensors: input ``input`` FP32 (already normalised, the model's shape with batch -1) or ``pixels``
UINT8 [-1, 28, 28] (0..255, normalised here); outputs ``logits`` FP32 [-1, 10] and ``probabilities``
FP32 [-1, 10] when asked for; no ``outputs`` gives ``logits``. Bad input raises MLServer's own
``InferenceError`` (a 400); everything protocol-level (routing, request parsing, ``id``, 404s) is
MLServer's.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import InferenceError
from mlserver.types import InferenceRequest, InferenceResponse, ResponseOutput
from mlserver.utils import get_model_uri

OUTPUTS = ("logits", "probabilities")


def _datatype(d) -> str:
    """A Datatype enum or its string (MLServer's models keep either, depending on how they were built)."""
    return str(getattr(d, "value", d))


class MnistOnnxRuntime(MLModel):
    """One ONNX Runtime session (one thread) behind MLServer's data plane."""

    async def load(self) -> bool:
        path = await get_model_uri(self.settings)
        extra = (self.settings.parameters.extra if self.settings.parameters else None) or {}
        self._mean = np.float32(extra.get("mean", 0.1307))
        self._std = np.float32(extra.get("std", 0.3081))
        self._input_shape = tuple(int(d) for d in extra.get("input_shape", [784]))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
        self._input_name = self._session.get_inputs()[0].name
        return True

    def _batch(self, payload: InferenceRequest) -> np.ndarray:
        """The request's one input -> the model's float32 batch, or InferenceError."""
        if len(payload.inputs) != 1:
            raise InferenceError(f"expected one input ('input' or 'pixels'), got {len(payload.inputs)}")
        tensor = payload.inputs[0]
        wanted = {t.name: t for t in self.inputs or []}
        if tensor.name not in wanted:
            raise InferenceError(f"unknown input '{tensor.name}'; the model takes {sorted(wanted)}")
        want, got = _datatype(wanted[tensor.name].datatype), _datatype(tensor.datatype)
        if got != want:
            raise InferenceError(f"input '{tensor.name}' has datatype {want}, got {got}")
        try:
            arr = self.decode(tensor, default_codec=NumpyCodec)
            x = np.asarray(arr, dtype=np.float32).reshape(tensor.shape[0], int(np.prod(self._input_shape)))
        except (ValueError, TypeError, OverflowError, IndexError) as exc:
            raise InferenceError(f"input '{tensor.name}': {exc}") from None
        if tensor.name == "pixels":
            x = (x / np.float32(255.0) - self._mean) / self._std
        return x.reshape(-1, *self._input_shape)

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = self._batch(payload)
        names = [o.name for o in payload.outputs] if payload.outputs else ["logits"]
        unknown = [n for n in names if n not in OUTPUTS]
        if unknown:
            raise InferenceError(f"unknown output(s) {unknown}; the model has {list(OUTPUTS)}")
        try:
            logits = self._session.run(None, {self._input_name: x})[0].astype(np.float32)
        except (RuntimeError, ValueError) as exc:  # onnxruntime's own errors (InvalidArgument, Fail)
            raise InferenceError(f"onnxruntime: {exc}") from None
        outputs: list[ResponseOutput] = []
        for name in names:
            y = logits
            if name == "probabilities":
                z = np.exp(logits.astype(np.float64) - logits.max(axis=1, keepdims=True))
                y = (z / z.sum(axis=1, keepdims=True)).astype(np.float32)
            outputs.append(NumpyCodec.encode_output(name, y))
        return InferenceResponse(model_name=self.name, model_version=self.version, outputs=outputs)
