"""What a bench run is asked for: runtime names (from the registry), batch sizes, devices and the
settings, each checked before anything is timed."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..devices import DEVICE_CHOICES as TORCH_DEVICES
from ..errors import InputError, RuntimeUnavailable
from ..formats import FORMATS, MAX_EXPORTED_BATCH, Format, resolve, ruled_out, runtime_names

DEFAULT_BATCH_SIZES = (1, 32, 256, 1024)
# bench's --device: one device, or every one ("all"); train's and serve's "auto" means one device
BENCH_DEVICES = (*(d for d in TORCH_DEVICES if d != "auto"), "all")


# ---------------------------------------------------------------------------------------------
# What can be benchmarked: every format in the registry, by its runtime name.


def by_runtime(name: str) -> Format:
    return next(f for f in FORMATS.values() if f.runtime == name)


def parse_runtimes(value: str | Sequence[str] | None) -> tuple[tuple[str, ...], bool]:
    """``"all"``/None -> every runtime; else a comma list of runtime or format names (or aliases).

    Returns ``(names, explicit)``: an explicitly named runtime whose artifact was never exported is
    an error, while ``all`` shows it as a skipped row.
    """
    items = _split(value)
    if not items or items == ["all"]:
        return runtime_names(), False
    names = [resolve(item).runtime for item in items]
    order = runtime_names()
    return tuple(sorted(dict.fromkeys(names), key=order.index)), True


def parse_batch_sizes(value: str | Sequence[int] | None) -> tuple[int, ...]:
    """A comma list (or sequence) of positive integers, deduplicated and sorted."""
    if value is None:
        return DEFAULT_BATCH_SIZES
    items = _split(value) if isinstance(value, str) else list(value)
    if not items:
        raise InputError("--batch-sizes is empty; give positive integers such as 1,32,256,1024")
    out = []
    for item in items:
        text = str(item).strip()
        try:
            n = int(text) if not isinstance(item, bool) else None
        except ValueError:
            n = None
        if n is None or str(n) != text.lstrip("+") or n < 1:
            raise InputError(f"batch size '{text}' is not a positive integer (e.g. --batch-sizes 1,32,256,1024)")
        if n > MAX_EXPORTED_BATCH:
            raise InputError(f"batch size {n} is larger than {MAX_EXPORTED_BATCH}, the exported batch axis's limit")
        out.append(n)
    return tuple(sorted(set(out)))


def _split(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v).strip() for v in value if str(v).strip()]


def plan_devices(device: str = "all") -> list[tuple[str, str | None]]:
    """The devices a run covers, each with ``None`` when usable or the reason it is not.

    ``all`` is CPU plus CUDA; CUDA without a GPU is not an error here but a reason for skipped rows.
    """
    from ..devices import resolve_device

    key = (device or "all").strip().lower()
    if key == "all":
        names = ["cpu", "cuda"]
    elif key == "cpu" or key == "cuda" or key.startswith("cuda:"):
        names = [key]
    else:
        raise InputError(f"unknown device '{device}'; choose one of {', '.join(BENCH_DEVICES)}")
    out = []
    for name in names:
        ruled = ruled_out(None, name)
        if ruled:
            out.append((name, ruled))
            continue
        try:
            resolve_device(name)
        except RuntimeUnavailable as exc:
            # devices' message ends with advice for train ("use --device cpu or auto"); keep the cause
            out.append((name, str(exc).split(" but ", 1)[-1].split(";")[0]))
        else:
            out.append((name, None))
    return out


def unavailable_reason(runtime: str, device: str) -> str | None:
    """Why ``runtime`` cannot run on ``device`` here, or None; the registry entry's own check."""
    return resolve(runtime).unavailable(device)


@dataclass
class BenchConfig:
    """What decides a bench run; recorded in bench.json."""

    artifacts: str = "artifacts"
    runtimes: tuple[str, ...] = ()
    explicit_runtimes: bool = False
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    device: str = "all"
    threads: int = 1
    warmup: int = 10
    min_time: float = 1.0
    min_calls: int = 20

    def validate(self) -> None:
        if not isinstance(self.threads, int) or self.threads < 1:
            raise InputError(f"--threads must be at least 1, got {self.threads}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise InputError(f"--warmup must be 0 or more calls, got {self.warmup}")
        if not (isinstance(self.min_time, int | float) and math.isfinite(self.min_time) and self.min_time > 0):
            raise InputError(f"--min-time must be a positive number of seconds, got {self.min_time}")
        if not isinstance(self.min_calls, int) or self.min_calls < 1:
            raise InputError(f"min_calls must be at least 1, got {self.min_calls}")
