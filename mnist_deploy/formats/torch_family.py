"""PyTorch runtimes: eager and torch.compile (from the state_dict), TorchScript and torch.export (pt2)."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ExportError
from .base import (
    MAX_EXPORTED_BATCH,
    METADATA_FILE,
    REDUCED_PARITY,
    ExportContext,
    Format,
    Predictor,
    first_line,
    option,
    quiet,
)

TORCH = ("torch",)
_PRECISION = {"float32": "f32", "bfloat16": "bf16"}


class TorchPredictor(Predictor):
    """Wraps any torch callable: an eager ``nn.Module``, a TorchScript module, an ExportedProgram's module.

    With ``threads`` set, each call runs with that many intra-op threads and puts torch's global
    count back afterwards, so loading a model never changes the process's threading for anyone else.
    """

    def __init__(self, fn: Callable, runtime: str, device: str = "cpu", threads: int | None = None,
                 dtype: str = "float32") -> None:
        import torch

        self.fn = fn
        self.runtime = runtime
        self.device = device
        self.threads = threads
        self.details = {"precision": _PRECISION[dtype], "threads": threads}
        self._torch_device = torch.device(device)
        self._dtype = getattr(torch, dtype)

    def prepare(self, x: np.ndarray):
        import torch

        from ..devices import host_to_device

        t = host_to_device(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), self._torch_device)
        return t if self._dtype == torch.float32 else t.to(self._dtype)

    def run(self, prepared):
        import torch

        before = torch.get_num_threads() if self.threads else None
        if before is not None and before != self.threads:
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                return self.fn(prepared)
        finally:
            if before is not None and before != self.threads:
                torch.set_num_threads(before)

    def finish(self, out) -> np.ndarray:
        return out.detach().float().cpu().numpy()

    def sync(self) -> None:
        from ..devices import synchronize

        synchronize(self._torch_device)


def model_from_state_dict(manifest: dict, path: str | os.PathLike, source: str | None = None):
    """Rebuild the model the manifest describes and load the state_dict at ``path`` into it, safely
    (``weights_only``) and strictly (missing, extra or misshapen tensors are named). Returns it in eval mode."""
    from ..artifacts.files import safe_torch_load
    from ..models import build_model, load_state_dict_checked

    info = manifest["model"]  # load_manifest has checked it is there
    model = build_model(info["name"], info.get("hparams"))
    load_state_dict_checked(model, safe_torch_load(path), source or str(path))
    return model.eval()


def load_eager(model, device: str = "cpu", threads: int | None = None) -> Predictor:
    """A Predictor for an in-memory eager model (the reference every format is compared to)."""
    model = model.eval().to(device)
    return TorchPredictor(model, "pytorch", device, threads)


def _load_pytorch(path: Path, *, device: str, threads: int | None, manifest: dict) -> Predictor:
    return load_eager(model_from_state_dict(manifest, path), device, threads)


def _load_compiled(path: Path, *, device: str, threads: int | None, manifest: dict) -> Predictor:
    import torch

    model = model_from_state_dict(manifest, path).to(device)
    return TorchPredictor(torch.compile(model), "torch.compile", device, threads)


def _load_bf16(path: Path, *, device: str, threads: int | None, manifest: dict) -> Predictor:
    import torch

    model = model_from_state_dict(manifest, path).to(device=device, dtype=torch.bfloat16)
    return TorchPredictor(model, "pytorch-bf16", device, threads, dtype="bfloat16")


def _load_cudagraphs(path: Path, *, device: str, threads: int | None, manifest: dict) -> Predictor:
    """torch.compile(mode="reduce-overhead"): inductor's kernels replayed as CUDA graphs (one launch per
    call instead of one per kernel), a graph recorded per batch size. On the CPU the mode has no graphs
    to record and is plain torch.compile; the entry runs there so that a CPU dry run covers its path."""
    import torch

    model = model_from_state_dict(manifest, path).to(device)
    return TorchPredictor(torch.compile(model, mode="reduce-overhead"), "torch.compile-cudagraphs", device, threads)


def _inductor_cache_counts() -> tuple[int, int]:
    try:
        from torch._dynamo.utils import counters

        return int(counters["inductor"]["fxgraph_cache_hit"]), int(counters["inductor"]["fxgraph_cache_miss"])
    except Exception:  # a private counter that moved: the note says "unknown"
        return 0, 0


def _compile_cold_start() -> Callable[[], str]:
    """Read inductor's cache counters now (after torch.compile() has imported dynamo, so reading them
    costs the other runtimes nothing); the function returned says, after the first call, whether that
    call's compilation hit the cache."""
    hits, misses = _inductor_cache_counts()

    def note() -> str:
        h2, m2 = _inductor_cache_counts()
        cache = "hit" if h2 > hits and m2 == misses else "miss" if m2 > misses else "unknown"
        return f"cold start includes compilation (inductor cache {cache})"

    return note


def _compiler_available(device: str) -> str | None:
    if device != "cpu":
        return None
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except ImportError:
        pass  # a private helper that moved: let the compile itself say what is wrong
    except Exception as exc:  # inductor raises its own InvalidCxxCompiler
        return f"torch.compile on CPU needs a C++ compiler: {first_line(exc)}"
    return None


def _extra_files(ctx: ExportContext) -> dict[str, str]:
    return {METADATA_FILE: json.dumps(ctx.metadata, sort_keys=True)} if ctx.metadata else {}


def _write(path: Path, buf: io.BytesIO) -> None:
    # torch's zip writer aborts the process (c10::Error, SIGABRT) when the disk fills under it; it
    # writes into memory here, and the one plain write below fails with an OSError instead.
    with open(path, "wb") as fh:
        fh.write(buf.getbuffer())


@dataclass(frozen=True)
class TorchScriptOptions:
    torchscript_method: str = option("trace", "torch.jit.trace or torch.jit.script.", choices=("trace", "script"))


def _export_torchscript(model, path: Path, options: TorchScriptOptions, ctx: ExportContext) -> None:
    import torch

    with quiet():
        if options.torchscript_method == "script":
            scripted = torch.jit.script(model)
        else:
            scripted = torch.jit.trace(model, ctx.example, check_trace=False)
        buf = io.BytesIO()
        torch.jit.save(scripted, buf, _extra_files=_extra_files(ctx))
    _write(path, buf)


def _load_torchscript(path: Path, *, device: str, threads: int | None, manifest: dict) -> Predictor:
    import torch

    with quiet():
        module = torch.jit.load(str(path), map_location=device)
    module.eval()
    return TorchPredictor(module, "torchscript", device, threads)


def _export_pt2(model, path: Path, options, ctx: ExportContext) -> None:
    import torch

    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORTED_BATCH)
    with quiet():
        try:
            program = torch.export.export(model, (ctx.example,), dynamic_shapes=({0: batch},), strict=False)
        except Exception as exc:
            raise ExportError(f"torch.export failed: {first_line(exc)}") from None
        buf = io.BytesIO()
        torch.export.save(program, buf, extra_files=_extra_files(ctx))
    _write(path, buf)


def _load_pt2(path: Path, *, device: str, threads: int | None, manifest: dict) -> Predictor:
    import torch

    with quiet():
        program = torch.export.load(str(path))
    module = program.module()
    if device != "cpu":
        module = module.to(device)
    return TorchPredictor(module, "torch.export", device, threads)


PYTORCH = Format(
    "pytorch", "pytorch", "PyTorch eager, from the state_dict (the reference)",
    load=_load_pytorch, packages=TORCH, source="state_dict", aliases=("eager", "torch"),
)
TORCH_COMPILE = Format(
    "torch.compile", "torch.compile", "torch.compile (inductor) of the eager model; its first call compiles",
    load=_load_compiled, packages=TORCH, source="state_dict", available=_compiler_available,
    cold_start=_compile_cold_start, aliases=("compile",),
)
TORCHSCRIPT = Format(
    "torchscript", "torchscript",
    "TorchScript via torch.jit.trace (or script); deprecated in torch 2.13, kept for existing consumers",
    files=("mnist_model_torchscript.pt",), load=_load_torchscript, export=_export_torchscript,
    options=TorchScriptOptions, packages=TORCH,
    deprecated="TorchScript is deprecated in PyTorch 2.13; prefer pt2 (torch.export) or onnx",
)
PT2 = Format(
    "pt2", "torch.export", "torch.export ExportedProgram (torch.export.save / torch.export.load)",
    files=("mnist_model.pt2",), load=_load_pt2, export=_export_pt2, packages=TORCH,
)

# Opt-in entries, not in the default table: benchmarks/gpu_suite.py registers them for its run
# (``formats.registered``), so every stage it calls (bench, the parity gate) sees them as formats.
PYTORCH_BF16 = Format(
    "pytorch-bf16", "pytorch-bf16", "PyTorch eager with bf16 weights and inputs (judged on predictions)",
    load=_load_bf16, packages=TORCH, source="state_dict", parity=REDUCED_PARITY, roofline=False,
    variant_of="pytorch",
)
TORCH_COMPILE_CUDAGRAPHS = Format(
    "torch.compile-cudagraphs", "torch.compile-cudagraphs",
    'torch.compile(mode="reduce-overhead"): CUDA graphs replay the compiled kernels; its first call compiles',
    load=_load_cudagraphs, packages=TORCH, source="state_dict", available=_compiler_available,
    cold_start=_compile_cold_start,
)
EXTRA_FORMATS = (PYTORCH_BF16, TORCH_COMPILE_CUDAGRAPHS)
