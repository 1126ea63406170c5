"""Device selection, shared by train, bench and serve. A leaf."""

from __future__ import annotations

from .errors import RuntimeUnavailable

DEVICE_CHOICES = ("auto", "cpu", "cuda")


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


def device_name(device) -> str:
    """A human name for the device: the GPU's name on CUDA, the CPU model otherwise."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
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


def synchronize(device) -> None:
    """Wait for queued kernels on CUDA before reading a clock; a no-op on CPU."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize(device)
