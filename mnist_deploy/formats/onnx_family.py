"""ONNX runtimes: fp32 ONNX (torch.export-based or legacy exporter) and INT8, both run with ONNX Runtime."""

from __future__ import annotations

import contextlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ExportError, InputError, IntegrityError, RuntimeUnavailable
from .base import REDUCED_PARITY, ExportContext, Format, LoadError, Predictor, first_line, option, quiet

ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
DEFAULT_OPSET = 18


def onnx_opset_range(exporter: str) -> tuple[int, int]:
    """The ONNX opsets ``exporter`` writes as asked (anything else it silently rewrites or rejects).

    The torch.export-based exporter builds opset 18+ natively (below that it tries a version
    converter that can silently fall back to 18); the TorchScript-based one supports 7 to 20.
    """
    if exporter == "legacy":
        return 7, 20
    import onnx

    return 18, int(onnx.defs.onnx_opset_version())


@dataclass(frozen=True)
class OnnxOptions:
    opset: int = option(DEFAULT_OPSET, "ONNX opset: 18 and up with the dynamo exporter, 7-20 with the legacy one.",
                        minimum=1)
    onnx_exporter: str = option("dynamo", "dynamo: the torch.export-based exporter; legacy: the TorchScript-based one.",
                                choices=("dynamo", "legacy"))

    def validate(self) -> None:
        lo, hi = onnx_opset_range(self.onnx_exporter)
        if not (lo <= self.opset <= hi):
            other = "legacy" if self.onnx_exporter == "dynamo" else "dynamo"
            olo, ohi = onnx_opset_range(other)
            hint = f"; the {other} exporter writes {olo}-{ohi} (--onnx-exporter {other})" if olo <= self.opset <= ohi else ""
            raise InputError(f"--opset {self.opset}: the {self.onnx_exporter} ONNX exporter writes opsets {lo}-{hi}{hint}")


@dataclass(frozen=True)
class Int8Options(OnnxOptions):
    quantization: str = option("static", "onnx-int8: static QDQ calibrated on training images, or dynamic "
                               "(activation ranges computed at run time).", choices=("static", "dynamic"))
    calibration_size: int = option(500, "INT8 static: number of training images to calibrate on.", minimum=1)
    calibration_method: str = option("minmax", "INT8 static: how activation ranges are calibrated (the first "
                                     "rung of the accuracy ladder).", choices=("minmax", "percentile", "entropy"))
    int8_weights: str = option("s7", "onnx-int8 static: s7: 7-bit signed weights (exact on every CPU); s8: 8-bit "
                               "signed weights (int16 saturation on x86 without VNNI); u8: u8 x u8.",
                               choices=("s7", "s8", "u8"))
    accuracy_control: str = option("on", "INT8 static: when the first configuration misses the gate on held-out "
                                   "training images, climb the ladder (calibration method, size, fp32 layers).",
                                   choices=("on", "off"))


class OrtPredictor(Predictor):
    """An ONNX Runtime ``InferenceSession`` (CPU provider, or CUDA when onnxruntime-gpu has it)."""

    def __init__(self, path: Path, runtime: str, device: str = "cpu", threads: int | None = None,
                 precision: str = "f32") -> None:
        import onnxruntime as ort

        refuse_external_data(path)
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail / InvalidGraph / InvalidProtobuf types
            raise LoadError(f"{path}: ONNX Runtime cannot load it: {first_line(exc)}") from None
        self.runtime = runtime
        self.device = device
        self.details = {"precision": precision, "threads": threads,
                        "providers": self.session.get_providers()}
        self.input_name = self.session.get_inputs()[0].name
        self.output_names = [self.session.get_outputs()[0].name]

    def prepare(self, x: np.ndarray):
        return {self.input_name: np.ascontiguousarray(x, dtype=np.float32)}

    def run(self, prepared):
        return self.session.run(self.output_names, prepared)[0]

    def finish(self, out) -> np.ndarray:
        return np.asarray(out, dtype=np.float32)


def refuse_external_data(path: Path) -> None:
    """Refuse an ONNX file whose tensors live in other files: the manifest's sha256 covers this file
    only, so weights read from beside it could be changed (or zeroed) unnoticed."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise LoadError(f"{path}: ONNX Runtime cannot load it: not a readable ONNX model ({first_line(exc)})") from None
    graphs = [proto.graph]
    while graphs:
        graph = graphs.pop()
        if any(uses_external_data(t) for t in graph.initializer):
            raise IntegrityError(f"{path}: its weights are stored in external data files, which the manifest's "
                                 "sha256 does not cover; refusing to load it (export it again: mnist-deploy "
                                 "writes one self-contained file)")
        for node in graph.node:
            graphs += [a.g for a in node.attribute if a.HasField("g")] + list(
                g for a in node.attribute for g in a.graphs)


def _ort_available(device: str) -> str | None:
    if device.startswith("cuda"):
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return ("ONNX Runtime has no CUDAExecutionProvider here "
                    f"(providers: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu")
    return None


def _write_onnx_fp32(model, path: Path, options: OnnxOptions, ctx: ExportContext) -> None:
    import onnx
    import torch

    with quiet():
        try:
            if options.onnx_exporter == "legacy":
                torch.onnx.export(
                    model, (ctx.example,), str(path), dynamo=False, opset_version=options.opset,
                    input_names=["input"], output_names=["logits"],
                    dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                )
            else:
                batch = torch.export.Dim("batch", min=1, max=1 << 20)
                program = torch.onnx.export(
                    model, (ctx.example,), dynamo=True, opset_version=options.opset, verbose=False,
                    input_names=["input"], output_names=["logits"], dynamic_shapes=({0: batch},),
                )
                program.save(str(path))
        except OSError:
            raise  # a full disk is an I/O failure, not a verdict on the format
        except Exception as exc:  # the exporters raise many types; the first line says what failed
            raise ExportError(f"ONNX export (exporter {options.onnx_exporter}, opset {options.opset}) failed: "
                              f"{first_line(exc)}") from None
    proto = onnx.load(str(path))
    written = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if written != options.opset:
        # The dynamo exporter quietly falls back to its own opset when a conversion fails.
        raise ExportError(
            f"the {options.onnx_exporter} ONNX exporter cannot write opset {options.opset} for this model "
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
        raise ExportError(f"{path}: not a valid ONNX model: {first_line(exc)}") from None


def _verify_onnx(path: Path, entry: dict) -> None:
    """verify's extra checks: the ONNX checker, no external data, and the metadata naming the source."""
    import onnx

    check_onnx(path)
    refuse_external_data(path)
    proto = onnx.load(str(path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    sd_sha = entry.get("source_state_dict_sha256")
    if props.get("source_state_dict_sha256") != sd_sha:
        raise IntegrityError(f"{path}: its metadata names another source state_dict "
                             f"({str(props.get('source_state_dict_sha256'))[:12]}...)")


def _load_onnx(path: Path, *, device: str, threads: int | None, manifest: dict) -> Predictor:
    if device.startswith("cuda") and (reason := _ort_available(device)):
        raise RuntimeUnavailable(reason)
    return OrtPredictor(path, "onnxruntime", device, threads)


def _load_onnx_int8(path: Path, *, device: str, threads: int | None, manifest: dict) -> Predictor:
    if device.startswith("cuda") and (reason := _ort_available(device)):
        raise RuntimeUnavailable(reason)
    return OrtPredictor(path, "onnxruntime-int8", device, threads, precision="int8")


def _export_onnx_int8(model, path: Path, options: Int8Options, ctx: ExportContext) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .cpu_int8 import int8_path
    from .quantize import QuantConfig, climb, gate, quantizable_layers, quantize_onnx, tuning_data

    folder = ctx.workdir or path.parent
    fp32 = folder / f".{path.name}.fp32.tmp.onnx"
    prep = folder / f".{path.name}.prep.tmp.onnx"
    try:
        passed = ctx.passed.get("onnx")
        if passed is not None and Path(passed).is_file():
            shutil.copyfile(passed, fp32)  # quantize the fp32 model that just passed, not a re-export
        else:
            _write_onnx_fp32(model, fp32, OnnxOptions(options.opset, options.onnx_exporter), ctx)
        notes = {"cpu_int8_path": int8_path()}
        with quiet():
            quant_pre_process(str(fp32), str(prep), skip_symbolic_shape=True)
            if options.quantization == "dynamic":
                quantize_dynamic(str(prep), str(path), weight_type=QuantType.QInt8)
            else:
                if ctx.calibration is None:
                    raise ExportError("static INT8 quantization needs calibration images")
                first = QuantConfig(method=options.calibration_method, calibration_size=options.calibration_size,
                                    weights=options.int8_weights)

                def write(config: QuantConfig, stem: Path) -> Path:
                    out = stem.with_suffix(".onnx")
                    quantize_onnx(prep, out, config, ctx.calibration(config.calibration_size))
                    return out

                tuning, reference = tuning_data(model, ctx)
                ladder = climb(first, quantize=write, workdir=folder, layers=quantizable_layers(prep), tuning=tuning,
                               reference=reference, criteria=gate(ctx), ladder=options.accuracy_control == "on",
                               load=lambda p: OrtPredictor(p, "onnxruntime-int8", precision="int8"))
                shutil.move(ladder.path, path)
                notes.update(ladder.to_dict())
        ctx.notes["int8"] = notes
        import onnx

        proto = onnx.load(str(path))
        _set_metadata(proto, {**ctx.metadata, "quantization": options.quantization})
        onnx.save(proto, str(path))
        check_onnx(path)
    finally:
        for p in (fp32, prep):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


ONNX = Format(
    "onnx", "onnxruntime", "ONNX (torch.export-based exporter), run with ONNX Runtime",
    files=("mnist_model.onnx",), load=_load_onnx, export=_write_onnx_fp32, options=OnnxOptions,
    packages=ONNX_PACKAGES, available=_ort_available, check=_verify_onnx,
)
ONNX_INT8 = Format(
    "onnx-int8", "onnxruntime-int8", "ONNX quantized to INT8 with ONNX Runtime (static QDQ, calibrated; or dynamic)",
    files=("mnist_model_int8.onnx",), load=_load_onnx_int8, export=_export_onnx_int8, options=Int8Options,
    parity=REDUCED_PARITY, packages=ONNX_PACKAGES, available=_ort_available, check=_verify_onnx, roofline=False,
    variant_of="onnx",
)
