"""Device selection, synchronisation, pinned copies and per-rank GPUs, tested on the CPU: the CUDA
branches are exercised by faking availability and by fake ``torch.cuda`` objects that record the
calls. The ``gpu``-marked tests run the same on a real GPU and skip without one."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from mnist_deploy import devices
from mnist_deploy.bench.timing import time_calls
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


# ---------------------------------------------------------------------------------------------
# What cannot be right without a GPU, checked on the CPU with fakes that record the calls.

NO_GPU = not torch.cuda.is_available()


class FakeCuda:
    """Stands in for ``torch.cuda``: records synchronize and set_device, with a device count."""

    def __init__(self, count: int = 1, log: list | None = None) -> None:
        self.count, self.calls = count, log if log is not None else []

    def synchronize(self, device=None):
        self.calls.append(("synchronize", str(device)))

    def device_count(self):
        return self.count

    def set_device(self, device):
        self.calls.append(("set_device", str(device)))


class FakeTensor:
    """A CPU tensor that records pin_memory() and to() instead of touching a GPU."""

    def __init__(self, log: list, pinned: bool = False) -> None:
        self.log, self.pinned, self.device = log, pinned, torch.device("cpu")

    def is_pinned(self):
        return self.pinned

    def pin_memory(self):
        self.log.append(("pin_memory",))
        return FakeTensor(self.log, pinned=True)

    def to(self, device, non_blocking=False):
        self.log.append(("to", str(device), non_blocking, self.pinned))
        return ("on", str(device))


@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 1)])
def test_synchronize_waits_for_that_cuda_device(device):
    fake = FakeCuda()
    devices.synchronize(device, cuda=fake)
    assert fake.calls == [("synchronize", str(device))]


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu")])
def test_synchronize_is_a_no_op_on_the_cpu(device):
    fake = FakeCuda()
    devices.synchronize(device, cuda=fake)
    assert fake.calls == []


def test_the_clock_is_read_only_after_the_device_is_synchronized(monkeypatch):
    """time_calls with sync: every timed run is followed by sync before the clock is read again, and
    the warm-up's queued work is waited for before the first timed call."""
    log = []
    ticks = iter(range(0, 10**12, 10**8))

    def clock():
        log.append("clock")
        return next(ticks)

    monkeypatch.setattr(time, "perf_counter_ns", clock)
    times = time_calls(lambda _: log.append("run"), None, warmup=2, min_time=0.25, min_calls=3,
                       sync=lambda: log.append("sync"))
    assert log[:3] == ["run", "run", "sync"]  # the warm-up, then wait for it
    timed = log[4:]  # after the deadline's clock read
    assert len(times) >= 3 and timed == ["clock", "run", "sync", "clock"] * len(times)


def test_a_torch_predictor_on_cuda_synchronizes_its_own_device(monkeypatch):
    from mnist_deploy.formats import TorchPredictor

    fake = FakeCuda()
    monkeypatch.setattr(torch.cuda, "synchronize", fake.synchronize)
    TorchPredictor(lambda x: x, "test", device="cuda:1").sync()
    TorchPredictor(lambda x: x, "test", device="cpu").sync()
    assert fake.calls == [("synchronize", "cuda:1")]


def test_host_to_device_pins_then_copies_asynchronously():
    log = []
    assert devices.host_to_device(FakeTensor(log), torch.device("cuda", 0)) == ("on", "cuda:0")
    assert log == [("pin_memory",), ("to", "cuda:0", True, True)]


def test_host_to_device_does_not_pin_twice_and_can_be_told_not_to_pin():
    log = []
    devices.host_to_device(FakeTensor(log, pinned=True), "cuda")
    assert log == [("to", "cuda", True, True)]
    log.clear()
    devices.host_to_device(FakeTensor(log), "cuda", pin=False)
    assert log == [("to", "cuda", False, False)]  # pageable memory: a blocking copy


def test_host_to_device_on_the_cpu_neither_pins_nor_copies():
    t = torch.arange(4.0)
    assert devices.host_to_device(t, torch.device("cpu")) is t
    log = []
    fake = FakeTensor(log)
    assert devices.host_to_device(fake, "cpu") is fake and log == []


def test_a_torch_predictor_prepares_its_input_through_host_to_device(monkeypatch):
    from mnist_deploy.formats import TorchPredictor

    seen = []
    monkeypatch.setattr(devices, "host_to_device", lambda t, dev: seen.append((t.clone(), str(dev))) or t)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    out = TorchPredictor(lambda t: t, "test", device="cuda").prepare(x)
    assert len(seen) == 1 and seen[0][1] == "cuda" and torch.equal(seen[0][0], torch.from_numpy(x))
    assert out.dtype == torch.float32


def test_a_bf16_predictor_casts_after_the_copy():
    from mnist_deploy.formats import TorchPredictor

    p = TorchPredictor(lambda t: t * 2, "test", device="cpu", dtype="bfloat16")
    assert p.prepare(np.ones((1, 3), np.float32)).dtype == torch.bfloat16
    assert p.details["precision"] == "bf16"
    assert p(np.ones((1, 3), np.float32)).dtype == np.float32


def test_rank_device_takes_the_gpu_of_its_local_rank_and_makes_it_current():
    fake = FakeCuda(count=2)
    assert devices.rank_device(torch.device("cuda"), 1, cuda=fake) == torch.device("cuda", 1)
    assert fake.calls == [("set_device", "cuda:1")]


def test_rank_device_refuses_a_local_rank_without_a_gpu():
    fake = FakeCuda(count=2)
    with pytest.raises(RuntimeUnavailable, match="LOCAL_RANK 2 has no GPU of its own: 2 CUDA device"):
        devices.rank_device(torch.device("cuda"), 2, cuda=fake)
    assert fake.calls == []


def test_rank_device_leaves_the_cpu_alone():
    fake = FakeCuda(count=0)
    assert devices.rank_device(torch.device("cpu"), 3, cuda=fake) == torch.device("cpu")
    assert fake.calls == []


def test_strict_fp32_turns_tf32_off_and_restores_it():
    before = devices.cuda_numerics()
    torch.backends.cudnn.allow_tf32 = True
    try:
        with devices.strict_fp32():
            inside = devices.cuda_numerics()
        assert not inside["cudnn_allow_tf32"] and not inside["matmul_allow_tf32"]
        assert devices.cuda_numerics()["cudnn_allow_tf32"] is True
    finally:
        torch.backends.cudnn.allow_tf32 = before["cudnn_allow_tf32"]


# ---------------------------------------------------------------------------------------------
# The same on a real GPU (skipped without one).


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("pin", [True, False])
def test_host_to_device_round_trip_on_cuda(pin):
    x = torch.randn(4096, 784)
    y = devices.host_to_device(x, torch.device("cuda"), pin=pin)
    assert y.device.type == "cuda"
    torch.testing.assert_close(y.cpu(), x, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason="needs a CUDA device")
def test_synchronize_and_rank_device_on_cuda():
    dev = devices.rank_device(torch.device("cuda"), 0)
    assert dev == torch.device("cuda", 0) and torch.cuda.current_device() == 0
    a = torch.randn(2048, 2048, device=dev)
    b = a @ a
    devices.synchronize(dev)
    assert torch.cuda.current_stream(dev).query()  # nothing left queued
    assert torch.isfinite(b).all()


@pytest.mark.gpu
@pytest.mark.skipif(NO_GPU, reason="needs a CUDA device")
def test_a_torch_predictor_on_cuda_matches_the_cpu():
    from mnist_deploy.formats import load_eager
    from mnist_deploy.models import build_model

    torch.manual_seed(0)
    model = build_model("cnn", {}).eval()
    x = np.random.default_rng(0).standard_normal((64, 1, 28, 28), dtype=np.float32)
    cpu = load_eager(model, "cpu")(x)
    with devices.strict_fp32():
        cuda = load_eager(model, "cuda")(x)
    np.testing.assert_allclose(cuda, cpu, rtol=0, atol=1e-4)
