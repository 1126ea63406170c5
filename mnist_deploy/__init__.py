"""mnist-deploy: train an MNIST classifier, export it with parity checks, benchmark and serve it.

The public API is importable from the package; submodules load on first use so that
``mnist-deploy --help`` does not pay for torch or onnx.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "TrainConfig": "train",
    "evaluate": "train",
    "load_trained_model": "train",
    "load_splits": "data",
    "summary": "data",
    "MODELS": "models",
    "build_model": "models",
    "classification_metrics": "metrics",
    "FORMATS": "formats",
    "load_predictor": "formats",
    "MnistDeployError": "errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'mnist_deploy' has no attribute '{name}'")
    return getattr(importlib.import_module(f".{module}", __name__), name)
