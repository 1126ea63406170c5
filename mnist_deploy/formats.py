"""The format registry: the spine that export, verify, bench, predict and serve share.

One entry per format: the file it is written as, how to export it from a PyTorch model, and how to
load it back as a :class:`Predictor` (a float32 batch in, float32 logits out). Adding a format is
adding one entry to :data:`FORMATS`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ExportError, RuntimeUnavailable

DEFAULT_OPSET = 18


# ---------------------------------------------------------------------------------------------
# Predictors: one call signature for every runtime.


class Predictor:
    """A loaded model. ``predictor(x)`` maps float32 (N, *input_shape) to float32 logits (N, 10).

    ``prepare`` / ``run`` / ``finish`` split that call so a benchmark can time the runtime call
    alone: ``prepare`` puts the input where the runtime wants it (a tensor on the device, an
    OrtValue...), ``run`` is the runtime call, ``finish`` waits for it and returns numpy.
    """

    runtime: str = ""
    device: str = "cpu"

    def prepare(self, x: np.ndarray) -> Any:
        raise NotImplementedError

    def run(self, prepared: Any) -> Any:
        raise NotImplementedError

    def finish(self, out: Any) -> np.ndarray:
        raise NotImplementedError

    def sync(self) -> None:
        """Block until queued work is done (CUDA); a no-op on CPU."""

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.finish(self.run(self.prepare(np.ascontiguousarray(x, dtype=np.float32))))


class TorchPredictor(Predictor):
    """Wraps any torch callable: an eager ``nn.Module``, a TorchScript module, an ExportedProgram's module."""

    def __init__(self, fn: Callable, runtime: str, device: str = "cpu") -> None:
        import torch

        self.fn = fn
        self.runtime = runtime
        self.device = device
        self._torch_device = torch.device(device)

    def prepare(self, x: np.ndarray):
        import torch

        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self._torch_device)

    def run(self, prepared):
        import torch

        with torch.inference_mode():
            return self.fn(prepared)

    def finish(self, out) -> np.ndarray:
        return out.detach().float().cpu().numpy()

    def sync(self) -> None:
        from .devices import synchronize

        synchronize(self._torch_device)


class OrtPredictor(Predictor):
    """An ONNX Runtime ``InferenceSession`` (CPU provider, or CUDA when onnxruntime-gpu has it)."""

    def __init__(self, path: Path, runtime: str, device: str = "cpu", threads: int | None = None) -> None:
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeUnavailable(
                    "ONNX Runtime has no CUDAExecutionProvider here (install onnxruntime-gpu on a CUDA machine)"
                )
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / InvalidProtobuf types
            raise ExportError(f"{path}: ONNX Runtime cannot load it: {str(exc).splitlines()[0]}") from None
        self.runtime = runtime
        self.device = device
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [self.session.get_outputs()[0].name]

    def prepare(self, x: np.ndarray):
        return {self.input_name: np.ascontiguousarray(x, dtype=np.float32)}

    def run(self, prepared):
        return self.session.run(self.output_names, prepared)[0]

    def finish(self, out) -> np.ndarray:
        return np.asarray(out, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Exporters. Each writes one file at ``path`` (a temporary name in the final folder; the caller
# renames it into place only after the parity gate).


@dataclass
class ExportContext:
    """What an exporter needs besides the model: an example input, options and metadata."""

    example: Any  # torch.Tensor (B, *input_shape), float32, CPU
    opset: int = DEFAULT_OPSET
    torchscript_method: str = "trace"  # trace | script
    onnx_exporter: str = "dynamo"  # dynamo (torch.export-based) | legacy (TorchScript-based)
    quantization: str = "static"  # static (QDQ, calibrated) | dynamic
    calibration: np.ndarray | None = None  # float32 images for static INT8 calibration
    metadata: dict[str, str] = field(default_factory=dict)  # ONNX metadata_props; a JSON file in .pt/.pt2
    workdir: Path | None = None  # where intermediate files may go (the output folder)
    onnx_fp32: Path | None = None  # an fp32 ONNX file of this model already checked: INT8 quantizes it


@contextlib.contextmanager
def _quiet():
    """Keep deprecation chatter and exporter progress lines out of the user's terminal."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def _export_torchscript(model, path: Path, ctx: ExportContext) -> None:
    import torch

    with _quiet():
        if ctx.torchscript_method == "script":
            scripted = torch.jit.script(model)
        elif ctx.torchscript_method == "trace":
            scripted = torch.jit.trace(model, ctx.example, check_trace=False)
        else:
            raise ExportError(f"unknown TorchScript method '{ctx.torchscript_method}' (trace or script)")
        torch.jit.save(scripted, str(path), _extra_files=_extra_files(ctx))


METADATA_FILE = "mnist_deploy.json"  # inside .pt / .pt2 archives: the same metadata as the ONNX props


def _extra_files(ctx: ExportContext) -> dict[str, str]:
    import json

    return {METADATA_FILE: json.dumps(ctx.metadata, sort_keys=True)} if ctx.metadata else {}


def _load_torchscript(path: Path, device: str = "cpu", threads: int | None = None) -> Predictor:
    import torch

    with _quiet():
        module = torch.jit.load(str(path), map_location=device)
    module.eval()
    return TorchPredictor(module, "torchscript", device)


def _write_onnx_fp32(model, path: Path, ctx: ExportContext) -> None:
    import onnx
    import torch

    with _quiet():
        try:
            if ctx.onnx_exporter == "legacy":
                torch.onnx.export(
                    model, (ctx.example,), str(path), dynamo=False, opset_version=ctx.opset,
                    input_names=["input"], output_names=["logits"],
                    dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                )
            elif ctx.onnx_exporter == "dynamo":
                batch = torch.export.Dim("batch", min=1, max=1 << 20)
                program = torch.onnx.export(
                    model, (ctx.example,), dynamo=True, opset_version=ctx.opset, verbose=False,
                    input_names=["input"], output_names=["logits"], dynamic_shapes=({0: batch},),
                )
                program.save(str(path))
            else:
                raise ExportError(f"unknown ONNX exporter '{ctx.onnx_exporter}' (dynamo or legacy)")
        except ExportError:
            raise
        except Exception as exc:  # the exporters raise many types; the first line says what failed
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ExportError(f"ONNX export (exporter {ctx.onnx_exporter}, opset {ctx.opset}) failed: {msg}") from None
    proto = onnx.load(str(path))
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != ctx.opset:
        # The dynamo exporter quietly falls back to its own opset when a conversion fails.
        raise ExportError(
            f"the {ctx.onnx_exporter} ONNX exporter cannot write opset {ctx.opset} for this model "
            f"(it wrote opset {written}); choose another --opset"
        )
    _set_metadata(proto, ctx.metadata)
    onnx.save(proto, str(path))
    check_onnx(path)


def _set_metadata(proto, metadata: dict[str, str]) -> None:
    keep = {p.key: p.value for p in proto.metadata_props}
    keep.update({k: str(v) for k, v in metadata.items()})
    del proto.metadata_props[:]
    for k, v in keep.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v


def check_onnx(path: Path) -> None:
    """``onnx.checker.check_model`` with full checks (shape inference included)."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # onnx raises ValidationError, DecodeError, InferenceError...
        raise ExportError(f"{path}: not a valid ONNX model: {str(exc).strip().splitlines()[0]}") from None


def _load_onnx(path: Path, device: str = "cpu", threads: int | None = None) -> Predictor:
    return OrtPredictor(path, "onnxruntime", device, threads)


def _load_onnx_int8(path: Path, device: str = "cpu", threads: int | None = None) -> Predictor:
    return OrtPredictor(path, "onnxruntime-int8", device, threads)


class _Calibration:
    """Feeds calibration images to ONNX Runtime's static quantizer in batches."""

    def __init__(self, input_name: str, images: np.ndarray, batch: int = 50) -> None:
        self._batches = iter([{input_name: images[i : i + batch]} for i in range(0, len(images), batch)])

    def get_next(self):
        return next(self._batches, None)


def _export_onnx_int8(model, path: Path, ctx: ExportContext) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    folder = ctx.workdir or path.parent
    fp32 = folder / f".{path.name}.fp32.tmp.onnx"
    prep = folder / f".{path.name}.prep.tmp.onnx"
    try:
        if ctx.onnx_fp32 is not None and Path(ctx.onnx_fp32).is_file():
            import shutil

            shutil.copyfile(ctx.onnx_fp32, fp32)
        else:
            _write_onnx_fp32(model, fp32, ctx)
        with _quiet():
            quant_pre_process(str(fp32), str(prep), skip_symbolic_shape=True)
            if ctx.quantization == "dynamic":
                quantize_dynamic(str(prep), str(path), weight_type=QuantType.QInt8)
            elif ctx.quantization == "static":
                if ctx.calibration is None or len(ctx.calibration) == 0:
                    raise ExportError("static INT8 quantization needs calibration images")
                reader = _Calibration("input", np.ascontiguousarray(ctx.calibration, dtype=np.float32))
                CalibrationDataReader.register(type(reader))
                quantize_static(
                    str(prep), str(path), reader, quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                )
            else:
                raise ExportError(f"unknown quantization '{ctx.quantization}' (static or dynamic)")
        import onnx

        proto = onnx.load(str(path))
        _set_metadata(proto, {**ctx.metadata, "quantization": ctx.quantization})
        onnx.save(proto, str(path))
        check_onnx(path)
    finally:
        for p in (fp32, prep):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def _export_pt2(model, path: Path, ctx: ExportContext) -> None:
    import torch

    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    with _quiet():
        try:
            program = torch.export.export(model, (ctx.example,), dynamic_shapes=({0: batch},), strict=False)
        except Exception as exc:
            raise ExportError(f"torch.export failed: {str(exc).strip().splitlines()[0]}") from None
        torch.export.save(program, str(path), extra_files=_extra_files(ctx))


def _load_pt2(path: Path, device: str = "cpu", threads: int | None = None) -> Predictor:
    import torch

    with _quiet():
        program = torch.export.load(str(path))
    module = program.module()
    if device != "cpu":
        module = module.to(device)
    return TorchPredictor(module, "torch.export", device)


def model_from_state_dict(manifest: dict, path: str | os.PathLike, source: str | None = None):
    """Rebuild the model the manifest describes and load the state_dict at ``path`` into it, safely
    (``weights_only``) and strictly (missing, extra or misshapen tensors are named). Returns it in eval mode."""
    from .artifacts import safe_torch_load
    from .models import build_model, load_state_dict_checked

    info = manifest["model"]  # load_manifest has checked it is there
    model = build_model(info["name"], info.get("hparams"))
    load_state_dict_checked(model, safe_torch_load(path), source or str(path))
    return model.eval()


def load_eager(model, device: str = "cpu") -> Predictor:
    """A Predictor for an in-memory eager model (the reference every format is compared to)."""
    model = model.eval().to(device)
    return TorchPredictor(model, "pytorch", device)


# ---------------------------------------------------------------------------------------------
# The registry.


@dataclass(frozen=True)
class Format:
    name: str
    filename: str
    runtime: str  # the runtime that executes it
    description: str
    export: Callable[[Any, Path, ExportContext], None]
    load: Callable[..., Predictor]  # load(path, device="cpu", threads=None)
    parity: str = "logits"  # logits: compared to eager with atol/rtol; predictions: agreement + accuracy drop
    devices: tuple[str, ...] = ("cpu", "cuda")
    deprecated: str = ""


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format(
            "torchscript", "mnist_model_torchscript.pt", "torchscript",
            "TorchScript via torch.jit.trace (or script); deprecated in torch 2.13, kept for existing consumers",
            _export_torchscript, _load_torchscript,
            deprecated="TorchScript is deprecated in PyTorch 2.13; prefer pt2 (torch.export) or onnx",
        ),
        Format(
            "onnx", "mnist_model.onnx", "onnxruntime",
            "ONNX (torch.export-based exporter), run with ONNX Runtime",
            _write_onnx_fp32, _load_onnx,
        ),
        Format(
            "pt2", "mnist_model.pt2", "torch.export",
            "torch.export ExportedProgram (torch.export.save / torch.export.load)",
            _export_pt2, _load_pt2,
        ),
        Format(
            "onnx-int8", "mnist_model_int8.onnx", "onnxruntime-int8",
            "ONNX quantized to INT8 with ONNX Runtime (static QDQ, calibrated; or dynamic)",
            _export_onnx_int8, _load_onnx_int8, parity="predictions",
        ),
    )
}


def get_format(name: str) -> Format:
    try:
        return FORMATS[name]
    except KeyError:
        raise ExportError(f"unknown format '{name}'; choose one of {', '.join(FORMATS)}") from None


def load_predictor(name: str, path: str | os.PathLike, device: str = "cpu", threads: int | None = None) -> Predictor:
    """Load the artifact at ``path`` (already sha256-checked by the caller) as format ``name``."""
    return get_format(name).load(Path(path), device=device, threads=threads)
