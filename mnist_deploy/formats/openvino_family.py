"""OpenVINO runtimes: the model as OpenVINO IR (an ``.xml`` graph plus a ``.bin`` of weights), run with
OpenVINO Runtime on CPU, at f32 (held to the fp32 parity gate) or bf16 (judged on predictions).

OpenVINO picks its inference precision itself (bf16 on CPUs that have it) unless told: each format pins
it, and each predictor reads back the precision and performance mode the compiled model actually uses.
Each batch size a predictor sees more than once also gets a compile for that static shape (a few kept, least
recently used first to go): OpenVINO fuses the INT8 input quantization only when the shape is static.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ExportError, RuntimeUnavailable
from .base import REDUCED_PARITY, ExportContext, Format, Predictor, option, quiet
from .static_shapes import CAPACITY, StaticShapes

OPENVINO = ("openvino",)
NNCF = ("openvino", "nncf")
PERFORMANCE_MODE = "LATENCY"  # one synchronous request per call, like every other runtime here


class OpenVINOPredictor(Predictor):
    """A model compiled by OpenVINO Runtime with a pinned inference precision, one infer request.

    The IR's batch axis is dynamic; each batch size called more than once also gets a model compiled
    for that static shape (kept in a small LRU, :mod:`.static_shapes`), where OpenVINO fuses more: the
    INT8 input FakeQuantize, above all. ``static_shapes=0`` keeps to the dynamic model.
    """

    def __init__(self, path: Path, runtime: str, precision: str, device: str = "cpu",
                 threads: int | None = None, static_shapes: int = CAPACITY) -> None:
        import openvino as ov

        self._core = ov.Core()
        self._config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": PERFORMANCE_MODE}
        if threads:
            self._config["INFERENCE_NUM_THREADS"] = int(threads)
        self._model = self._core.read_model(str(path))
        self.compiled = self._core.compile_model(self._model, device.upper(), self._config)
        self.request = self.compiled.create_infer_request()
        self.static = StaticShapes(self._compile_static, capacity=static_shapes)
        self.runtime = runtime
        self.device = device
        self.details = {
            "precision": _text(self.compiled.get_property("INFERENCE_PRECISION_HINT")),
            "performance_mode": _text(self.compiled.get_property("PERFORMANCE_HINT")),
            "threads": int(self.compiled.get_property("INFERENCE_NUM_THREADS")),
            "streams": int(self.compiled.get_property("NUM_STREAMS")),
            "shapes": self.static.describe(),
        }
        if runtime.endswith("int8"):
            # The hint is the precision of what stays unquantized; say what the quantized layers run in.
            self.details["int8_ops"] = _int8_ops(self.compiled)
            self.details["precision"] = f"int8 ({self.details['precision']} elsewhere)"

    def _compile_static(self, shape: tuple[int, ...]):
        """The IR reshaped to ``shape`` (a clone: the dynamic model stays as read), compiled like it."""
        model = self._model.clone()
        model.reshape({0: list(shape)})
        return self._core.compile_model(model, self.device.upper(), self._config).create_infer_request()

    def prepare(self, x: np.ndarray):
        return np.ascontiguousarray(x, dtype=np.float32)

    def run(self, prepared):
        request = self.static.get(prepared.shape)
        if request is None:
            request = self.request
        request.infer({0: prepared}, share_inputs=True)
        return request

    def finish(self, out) -> np.ndarray:
        return np.array(out.get_output_tensor(0).data, dtype=np.float32)


def _int8_ops(compiled) -> int | None:
    """How many operations of the compiled model execute in i8/u8 (read back, not assumed)."""
    try:
        ops = compiled.get_runtime_model().get_ordered_ops()
        return sum(1 for op in ops if str(op.get_rt_info()["runtimePrecision"].astype(str)) in ("i8", "u8"))
    except Exception:  # an optional fact: older OpenVINO versions name it otherwise
        return None


def _text(value) -> str:
    """OpenVINO returns enums and Type objects; ``f32`` / ``LATENCY`` is what we record."""
    if hasattr(value, "to_string"):
        return value.to_string()  # an ov.Type: f32, bf16
    text = str(value)
    return text.rsplit(".", 1)[-1] if "." in text else text


def _export_ir(model, path: Path, options, ctx: ExportContext) -> None:
    import openvino as ov

    with quiet():
        ov_model = ov.convert_model(model, example_input=ctx.example)
        shape = list(ov_model.input(0).get_partial_shape())
        ov_model.reshape({0: ov.PartialShape([-1, *shape[1:]])})  # any batch size
        if ctx.metadata:
            ov_model.set_rt_info(json.dumps(ctx.metadata, sort_keys=True), ["mnist_deploy"])
        # Keep the weights f32: save_model halves them to fp16 unless told not to.
        ov.save_model(ov_model, str(path), compress_to_fp16=False)


@dataclass(frozen=True)
class OpenVINOInt8Options:
    calibration_size: int = option(500, "INT8 static: number of training images to calibrate on.", minimum=1)
    calibration_method: str = option("minmax", "INT8 static: how activation ranges are calibrated (the first "
                                     "rung of the accuracy ladder).", choices=("minmax", "percentile", "entropy"))
    accuracy_control: str = option("on", "INT8 static: when the first configuration misses the gate on held-out "
                                   "training images, climb the ladder (calibration method, size, fp32 layers).",
                                   choices=("on", "off"))


# NNCF's activation range estimators for our calibration methods (entropy: its histogram-based one).
_NNCF_RANGES = {"minmax": "MINMAX", "percentile": "MEAN_QUANTILE", "entropy": "HISTOGRAM"}


def _quantize_ir(ov_model, stem: Path, config, images: np.ndarray) -> Path:
    """``nncf.quantize`` on the IR: 7-bit weights on every layer (NNCF's overflow fix, so CPUs whose
    ``vpmaddubsw`` saturates compute what VNNI computes), layers named in ``config.fp32_layers`` kept fp32."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    advanced = AdvancedQuantizationParameters(
        overflow_fix=OverflowFix.ENABLE if config.weights == "s7" else OverflowFix.DISABLE,
        activations_range_estimator_params=getattr(RangeEstimatorParametersSet, _NNCF_RANGES[config.method]))
    items = [images[i : i + 1] for i in range(len(images))]
    scope = nncf.IgnoredScope(names=list(config.fp32_layers)) if config.fp32_layers else None
    quantized = nncf.quantize(ov_model.clone(), nncf.Dataset(items), subset_size=len(items), ignored_scope=scope,
                              advanced_parameters=advanced)
    out = stem.with_suffix(".xml")
    ov.save_model(quantized, str(out), compress_to_fp16=False)
    return out


def _export_ir_int8(model, path: Path, options: OpenVINOInt8Options, ctx: ExportContext) -> None:
    import contextlib
    import io
    import logging

    import nncf
    import openvino as ov

    from .cpu_int8 import int8_path
    from .quantize import QuantConfig, climb, gate, tuning_data

    if ctx.calibration is None:
        raise ExportError("static INT8 quantization needs calibration images")
    with quiet():
        ov_model = ov.convert_model(model, example_input=ctx.example)
        shape = list(ov_model.input(0).get_partial_shape())
        ov_model.reshape({0: ov.PartialShape([-1, *shape[1:]])})
    layers = [op.get_friendly_name() for op in ov_model.get_ordered_ops()
              if op.get_type_name() in ("MatMul", "Convolution")]
    first = QuantConfig(method=options.calibration_method, calibration_size=options.calibration_size, weights="s7")

    def write(config, stem: Path) -> Path:
        return _quantize_ir(ov_model, stem, config, ctx.calibration(config.calibration_size))

    tuning, reference = tuning_data(model, ctx)
    nncf.set_log_level(logging.ERROR)
    sink = io.StringIO()  # NNCF draws progress bars
    with quiet(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        ladder = climb(first, quantize=write, workdir=ctx.workdir or path.parent, layers=layers, tuning=tuning,
                       reference=reference, criteria=gate(ctx), ladder=options.accuracy_control == "on",
                       load=lambda p: OpenVINOPredictor(p, "openvino-int8", "f32"))
    chosen = ladder.path
    ir = ov.Core().read_model(str(chosen))
    if ctx.metadata:
        ir.set_rt_info(json.dumps(ctx.metadata, sort_keys=True), ["mnist_deploy"])
    ov.save_model(ir, str(path), compress_to_fp16=False)
    for f in chosen.parent.glob(chosen.stem + ".*"):
        f.unlink()
    ctx.notes["int8"] = {"cpu_int8_path": int8_path(), "quantizer": f"nncf {nncf.__version__}", **ladder.to_dict()}


def _loader(runtime: str, precision: str):
    def load(path: Path, *, device: str, threads: int | None, manifest: dict) -> Predictor:
        if device != "cpu":
            raise RuntimeUnavailable(f"{runtime} runs on cpu here, not {device}")
        return OpenVINOPredictor(path, runtime, precision, device, threads)

    return load


def _cpu_has(precision: str):
    def available(device: str) -> str | None:
        import openvino as ov

        caps = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        if precision.upper() not in [str(c).upper() for c in caps]:
            return f"this CPU has no {precision} support in OpenVINO (capabilities: {', '.join(caps)})"
        return None

    return available


OPENVINO_F32 = Format(
    "openvino", "openvino", "OpenVINO IR (.xml + .bin), run with OpenVINO Runtime at f32 (pinned)",
    files=("mnist_model_openvino.xml", "mnist_model_openvino.bin"), load=_loader("openvino", "f32"),
    export=_export_ir, devices=("cpu",), packages=OPENVINO, available=_cpu_has("fp32"),
)
OPENVINO_BF16 = Format(
    "openvino-bf16", "openvino-bf16", "OpenVINO IR run at bf16 inference precision (judged on predictions)",
    files=("mnist_model_openvino_bf16.xml", "mnist_model_openvino_bf16.bin"), load=_loader("openvino-bf16", "bf16"),
    export=_export_ir, parity=REDUCED_PARITY, devices=("cpu",), packages=OPENVINO, available=_cpu_has("bf16"),
    roofline=False, variant_of="openvino",
)
OPENVINO_INT8 = Format(
    "openvino-int8", "openvino-int8", "OpenVINO IR quantized to INT8 with NNCF (7-bit weights, calibrated), "
    "run with OpenVINO Runtime (f32 for what stays unquantized)",
    files=("mnist_model_openvino_int8.xml", "mnist_model_openvino_int8.bin"), load=_loader("openvino-int8", "f32"),
    export=_export_ir_int8, options=OpenVINOInt8Options, parity=REDUCED_PARITY, devices=("cpu",), packages=NNCF,
    available=_cpu_has("int8"), roofline=False, variant_of="openvino",
)
