"""Device selection, tested on CPU: the CUDA branches are exercised by faking availability."""

from __future__ import annotations

import pytest
import torch

from mnist_deploy.devices import resolve_device
from mnist_deploy.errors import RuntimeUnavailable


def test_cpu_and_auto_without_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == "cpu"
    with pytest.raises(RuntimeUnavailable, match="device 'cuda' requested"):
        resolve_device("cuda")


def test_auto_and_cuda_with_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(RuntimeUnavailable, match="only 1 CUDA device"):
        resolve_device("cuda:3")


def test_unknown_device():
    with pytest.raises(RuntimeUnavailable, match="unknown device 'tpu'"):
        resolve_device("tpu")
