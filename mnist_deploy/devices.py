"""Device selection, shared by train, bench and serve. A leaf.

What cannot be right without a GPU lives here, each piece written against a small ``cuda`` object
(``torch.cuda`` by default) so that a test can hand in a fake that records the calls:

- :func:`synchronize`: CUDA kernels run asynchronously, so a host clock read after a launch times the
  launch, not the work; wait for the device before reading the clock.
- :func:`host_to_device`: a CPU tensor goes to the GPU through pinned (page-locked) memory, as an
  asynchronous copy on the current stream (a copy from pageable memory is staged and blocks).
- :func:`rank_device`: under torchrun every process takes the GPU its ``LOCAL_RANK`` names
  (``cuda:N``), and makes it the current device before NCCL starts.
- :func:`cuda_numerics`: the TF32 switches that decide whether "fp32" on CUDA is fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from .errors import RuntimeUnavailable

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def _torch_cuda():
    import torch

    return torch.cuda


def resolve_device(name: str = "auto"):
    """``auto`` -> CUDA when available else CPU; ``cuda`` without a GPU is an error, not a silent CPU run."""
    import torch

    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            reason = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA device is visible"
            raise RuntimeUnavailable(f"device '{name}' requested but {reason}; use --device cpu or auto")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeUnavailable(f"device '{name}' requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return dev
    raise RuntimeUnavailable(f"unknown device '{name}'; choose one of {', '.join(DEVICE_CHOICES)}")


def is_cuda(device) -> bool:
    """True for ``torch.device("cuda[:N]")`` and the strings ``"cuda"``, ``"cuda:N"``."""
    kind = getattr(device, "type", None)
    return (kind if kind is not None else str(device).split(":", 1)[0]) == "cuda"


def device_name(device) -> str:
    """A human name for the device: the GPU's name on CUDA, the CPU model otherwise."""
    import torch

    if is_cuda(device):
        return torch.cuda.get_device_name(device)
    return cpu_model()


def cpu_model() -> str:
    import platform

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synchronize(device, *, cuda=None) -> None:
    """Wait for queued kernels on CUDA before reading a clock; a no-op on CPU.

    ``device`` may be a ``torch.device`` or a string (``"cuda:1"``): the wait is for that device, not
    whichever is current (under torchrun each process's current device is its own, but a bench or
    server may hold a model on another)."""
    if is_cuda(device):
        (cuda or _torch_cuda()).synchronize(device)


def host_to_device(tensor, device, *, pin: bool = True):
    """``tensor`` (on the CPU) on ``device``.

    To CUDA the copy goes through pinned memory and is asynchronous (``non_blocking``): the kernels
    that read it are queued after it on the same stream, and torch's caching host allocator keeps
    the pinned buffer until the copy has completed. ``pin_memory()`` copies, so the caller's array
    may change as soon as this returns. Elsewhere the tensor is moved (or returned) as is.
    """
    if not is_cuda(device):
        return tensor if str(tensor.device) == str(device) else tensor.to(device)
    if pin and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=bool(pin))


def rank_device(device, local_rank: int, *, cuda=None):
    """The device of the torchrun process with ``local_rank``: ``cuda:LOCAL_RANK`` (made the current
    device, so NCCL and every bare ``cuda`` tensor use it) when ``device`` is CUDA, else ``device``.

    One GPU per process: a ``LOCAL_RANK`` with no GPU of its own is an error naming the limit, not
    two processes sharing one GPU (NCCL refuses that) or a CUDA traceback."""
    import torch

    if not is_cuda(device):
        return device
    cuda = cuda or _torch_cuda()
    count = cuda.device_count()
    if local_rank < 0 or local_rank >= count:
        raise RuntimeUnavailable(f"LOCAL_RANK {local_rank} has no GPU of its own: {count} CUDA device(s) are "
                                 f"visible; use --nproc-per-node {max(count, 1)} or fewer")
    dev = torch.device("cuda", local_rank)
    cuda.set_device(dev)
    return dev


def cuda_numerics() -> dict:
    """The switches that let CUDA's "fp32" run in TF32 (a 10-bit mantissa), recorded with results."""
    import torch

    return {"matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
            "float32_matmul_precision": torch.get_float32_matmul_precision()}


@contextlib.contextmanager
def strict_fp32() -> Iterator[None]:
    """fp32 on CUDA computed in fp32: TF32 off for matrix products and cuDNN convolutions inside the
    block (PyTorch leaves cuDNN's on by default, so a CNN's "fp32" convolutions would round their inputs
    to TF32), and the previous settings restored after. No effect on the CPU."""
    import torch

    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
