"""The model registry: a small MLP and a small CNN, rebuilt by name from recorded hyperparameters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, ManifestError


class MLP(nn.Module):
    """The default network: 784 -> 128 ReLU -> 64 ReLU -> 10. Takes (N, 784)."""

    def __init__(self, hidden1: int = 128, hidden2: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, hidden1)
        self.fc2 = nn.Linear(hidden1, hidden2)
        self.fc3 = nn.Linear(hidden2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 784)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class CNN(nn.Module):
    """Two conv blocks with batch norm, then dropout. Takes (N, 1, 28, 28)."""

    def __init__(self, channels1: int = 16, channels2: int = 32, hidden: int = 128, dropout: float = 0.25) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels1, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 14x14
            nn.Conv2d(channels1, channels2, 3, padding=1, bias=False),
            nn.BatchNorm2d(channels2),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 7x7
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(channels2 * 7 * 7, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 1, 28, 28)
        return self.classifier(self.features(x))


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows of a model: how to build it and what input it takes."""

    name: str
    factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]  # per example, without the batch axis
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec(
        "mlp", MLP, (784,), {"hidden1": 128, "hidden2": 64}, "MLP 784-128-64-10, input (N, 784)"
    ),
    "cnn": ModelSpec(
        "cnn",
        CNN,
        (1, 28, 28),
        {"channels1": 16, "channels2": 32, "hidden": 128, "dropout": 0.25},
        "2 conv blocks + batch norm + dropout, input (N, 1, 28, 28)",
    ),
}


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise CheckpointError(f"unknown model '{name}'; known: {', '.join(MODELS)}") from None


MAX_WIDTH = 1 << 16  # as artifacts.MAX_WIDTH: a wider layer is a corrupt manifest (and would allocate terabytes)


def check_hparams(name: str, hparams: dict[str, Any] | None) -> dict[str, Any]:
    """``hparams`` over model ``name``'s defaults, each checked against its default's kind: widths are
    integers in [1, 65536], rates (dropout) numbers in [0, 1]. A bad one is a ManifestError naming it."""
    spec = get_spec(name)
    for key, value in (hparams or {}).items():
        if key not in spec.defaults:
            raise ManifestError(f"model '{name}': unknown hyperparameter model.hparams.{key} "
                                f"(known: {', '.join(spec.defaults)})")
        default = spec.defaults[key]
        if isinstance(default, int):
            ok, want = type(value) is int and 1 <= value <= MAX_WIDTH, f"an integer from 1 to {MAX_WIDTH}"
        else:
            ok, want = type(value) in (int, float) and 0 <= value <= 1, "a number from 0 to 1"
        if not ok:
            raise ManifestError(f"model '{name}': model.hparams.{key} must be {want}, not {value!r}")
    return {**spec.defaults, **(hparams or {})}


def build_model(name: str, hparams: dict[str, Any] | None = None) -> nn.Module:
    """Build model ``name`` with its defaults overridden by ``hparams`` (as recorded in a manifest)."""
    return get_spec(name).factory(**check_hparams(name, hparams))


def model_hparams(name: str, hparams: dict[str, Any] | None = None) -> dict[str, Any]:
    return {**get_spec(name).defaults, **(hparams or {})}


def flops_per_example(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """Multiply-accumulates x 2 of the Linear and Conv2d layers for one example (what GFLOP/s counts)."""
    total = 0
    hooks = []

    def _linear(mod: nn.Linear, _inp, _out) -> None:
        nonlocal total
        total += 2 * mod.in_features * mod.out_features

    def _conv(mod: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        k = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        total += 2 * k * out.shape[1] * out.shape[2] * out.shape[3]

    for m in model.modules():
        if isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(_linear))
        elif isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(_conv))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1, *input_shape)))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total


def load_state_dict_checked(model: nn.Module, state_dict: Any, source: str = "checkpoint") -> nn.Module:
    """Load ``state_dict`` strictly, with an error that names missing, unexpected and misshapen tensors."""
    if not isinstance(state_dict, dict) or not all(isinstance(k, str) for k in state_dict):
        raise CheckpointError(f"{source}: not a state_dict (expected a mapping of names to tensors)")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    extra = [k for k in state_dict if k not in expected]
    wrong = []
    for k, v in state_dict.items():
        if k in expected:
            if not isinstance(v, torch.Tensor):
                wrong.append(f"{k} (not a tensor)")
            elif tuple(v.shape) != tuple(expected[k].shape):
                wrong.append(f"{k} {tuple(v.shape)} != {tuple(expected[k].shape)}")
    problems = []
    if missing:
        problems.append("missing " + ", ".join(missing))
    if extra:
        problems.append("unexpected " + ", ".join(extra))
    if wrong:
        problems.append("wrong shape " + ", ".join(wrong))
    if problems:
        raise CheckpointError(f"{source}: does not match the model: " + "; ".join(problems))
    bad = {k: int((~torch.isfinite(v)).sum()) for k, v in state_dict.items()
           if v.is_floating_point() and not bool(torch.isfinite(v).all())}
    if bad:
        listed = ", ".join(f"{k} ({n:,} of {state_dict[k].numel():,})" for k, n in bad.items())
        raise CheckpointError(f"{source}: non-finite weights (NaN or inf) in {listed}; the training diverged "
                              "or the file is corrupt, refusing to load it")
    model.load_state_dict(state_dict, strict=True)
    return model
