"""Static INT8 quantization with ONNX Runtime, one configuration at a time (:func:`quantize_onnx`), and
the accuracy-controlled ladder that climbs through configurations until one holds the gate on
held-out training images (:func:`climb`).

The default configuration is exact on every CPU: signed 8-bit activations and *7-bit* signed weights
(``reduce_range``), per channel, logits left in float. With |w| <= 64 no pair of u8 x s8 products can
leave int16, so x86 CPUs without VNNI (whose ``vpmaddubsw`` saturates at int16) compute what VNNI and
ARM compute: see :mod:`.int8_emulation` and ``benchmarks/int8_saturation.py``.

The ladder, tried in order until a rung passes (and only when the first one fails):
calibration method MinMax -> Percentile -> Entropy; then the best of those with a larger calibration
set; then the layers ranked most sensitive kept in fp32, one more at a time, never all of them (a model
that only passes unquantized fails the gate). Every rung is judged on held-out *training* images,
never on the test set; the gate's verdict is then given on the 10,000 test images by the export stage.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

WEIGHT_TYPES = ("s7", "s8", "u8")  # s7: signed with reduce_range (7-bit); u8: unsigned (U8U8 with u8 activations)
METHODS = ("minmax", "percentile", "entropy")
QUANTIZED_OPS = ("Gemm", "MatMul", "Conv")
TUNING_IMAGES = 5000  # held-out training images every rung is judged on
TUNING_MARGIN = 0.001  # a rung must clear the agreement gate by 0.1 points on the tuning images
LARGER_CALIBRATION = 4  # the calibration-size rung uses this many times the images


@dataclass(frozen=True)
class QuantConfig:
    """One static quantization: calibration method and size, weight type, layers kept fp32, float logits."""

    method: str = "minmax"
    calibration_size: int = 500
    weights: str = "s7"
    float_logits: bool = True
    fp32_layers: tuple[str, ...] = ()

    def label(self) -> str:
        parts = [self.method, f"{self.calibration_size} images", {"s7": "s8 act x 7-bit w", "s8": "s8 x s8",
                                                                  "u8": "u8 x u8"}[self.weights]]
        if self.fp32_layers:
            parts.append("fp32: " + ", ".join(self.fp32_layers))
        return ", ".join(parts)


class _Calibration:
    """Feeds calibration images to ONNX Runtime's static quantizer in batches."""

    def __init__(self, input_name: str, images: np.ndarray, batch: int = 50) -> None:
        self._batches = iter([{input_name: images[i : i + batch]} for i in range(0, len(images), batch)])

    def get_next(self):
        return next(self._batches, None)


def quantizable_layers(model_path: Path) -> list[str]:
    """Names of the nodes ONNX Runtime quantizes here (Gemm, MatMul, Conv), in graph order."""
    import onnx

    return [n.name for n in onnx.load(str(model_path)).graph.node if n.op_type in QUANTIZED_OPS]


def quantize_onnx(prepared: Path, out: Path, config: QuantConfig, images: np.ndarray, input_name: str = "input") -> None:
    """Quantize the pre-processed fp32 model ``prepared`` to ``out`` (QDQ, per channel) with ``config``,
    calibrated on ``images``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    act = QuantType.QUInt8 if config.weights == "u8" else QuantType.QInt8
    weight = QuantType.QUInt8 if config.weights == "u8" else QuantType.QInt8
    reader = _Calibration(input_name, np.ascontiguousarray(images[: config.calibration_size], dtype=np.float32))
    CalibrationDataReader.register(type(reader))
    extra = {"CalibPercentile": 99.99} if config.method == "percentile" else {}
    quantize_static(
        str(prepared), str(out), reader, quant_format=QuantFormat.QDQ, activation_type=act, weight_type=weight,
        per_channel=True, reduce_range=config.weights == "s7", calibrate_method=methods[config.method],
        nodes_to_exclude=list(config.fp32_layers), extra_options=extra,
    )
    if config.float_logits:
        _float_outputs(out)


def _float_outputs(path: Path) -> None:
    """Drop the Quantize/DequantizeLinear pair on each graph output: 8-bit logits have 256 levels, so
    near-ties collapse into exact ties and argmax picks the first. The last matrix product then writes
    float logits (ONNX Runtime's QGemm/QLinearMatMul with a float output)."""
    import onnx

    proto = onnx.load(str(path))
    graph = proto.graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, int] = {}
    for n in graph.node:
        for i in n.input:
            consumers[i] = consumers.get(i, 0) + 1
    drop = []
    for out in graph.output:
        dq = producer.get(out.name)
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear" or consumers.get(q.output[0], 0) != 1:
            continue
        src = producer.get(q.input[0])
        if src is None or consumers.get(q.input[0], 0) != 1:
            continue
        src.output[list(src.output).index(q.input[0])] = out.name
        drop += [dq, q]
    for n in drop:
        graph.node.remove(n)
    onnx.save(proto, str(path))


# ---------------------------------------------------------------------------------------------
# The ladder.


@dataclass
class Rung:
    """One configuration tried, and what it scored on the held-out training images."""

    step: str
    config: QuantConfig
    agreement: float | None = None
    accuracy_drop: float | None = None
    passed: bool = False
    seconds: float = 0.0
    error: str | None = None

    def to_dict(self) -> dict:
        return {"step": self.step, "config": {**asdict(self.config), "fp32_layers": list(self.config.fp32_layers)},
                "label": self.config.label(), "agreement": self.agreement, "accuracy_drop": self.accuracy_drop,
                "passed": self.passed, "seconds": round(self.seconds, 3), "error": self.error}


@dataclass
class LadderResult:
    chosen: Rung
    rungs: list[Rung]
    sensitivity: dict[str, float]
    tuning: dict
    path: Path

    def to_dict(self) -> dict:
        return {"chosen": self.chosen.to_dict(), "chosen_step": self.chosen.step,
                "fp32_layers": list(self.chosen.config.fp32_layers), "tuned_on": self.tuning,
                "rungs": [r.to_dict() for r in self.rungs], "layer_sensitivity": self.sensitivity}


def _score(predict: Callable[[np.ndarray], np.ndarray], images, labels, reference, criteria: dict) -> tuple:
    logits = predict(images)
    pred = logits.argmax(1)
    ref = reference.argmax(1)
    agreement = float((pred == ref).mean())
    drop = float((ref == labels).mean() - (pred == labels).mean())
    passed = agreement >= criteria["min_agreement"] + TUNING_MARGIN and drop <= criteria["max_accuracy_drop"]
    return agreement, drop, passed


class _Ladder:
    """The rungs tried so far, their files and the layer sensitivities; :func:`climb` drives it."""

    def __init__(self, quantize, workdir: Path, tuning, reference, criteria: dict, load) -> None:
        self.quantize, self.workdir, self.load = quantize, workdir, load
        self.tuning, self.reference, self.criteria = tuning, reference, criteria
        self.rungs: list[Rung] = []
        self.files: dict[int, Path] = {}
        self.sensitivity: dict[str, float] = {}

    def attempt(self, step: str, config: QuantConfig) -> Rung:
        rung = Rung(step, config)
        t0 = time.perf_counter()
        try:
            path = self.quantize(config, self.workdir / f".rung{len(self.rungs)}")
            self.files[len(self.rungs)] = path
            if self.tuning is not None:
                rung.agreement, rung.accuracy_drop, rung.passed = _score(self.load(path), *self.tuning,
                                                                         self.reference, self.criteria)
        except Exception as exc:  # a calibration method can fail on a model (e.g. an empty histogram)
            rung.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        rung.seconds = time.perf_counter() - t0
        self.rungs.append(rung)
        return rung

    def best_scored(self) -> Rung:
        return max((r for r in self.rungs if r.agreement is not None), key=lambda r: r.agreement,
                   default=self.rungs[0])

    def done(self) -> LadderResult:
        rungs, files = self.rungs, self.files
        written = [i for i in files if self.tuning is None or rungs[i].agreement is not None]
        if not written:
            raise RuntimeError("every quantization configuration failed: " + "; ".join(str(r.error) for r in rungs))
        passed = [i for i in written if rungs[i].passed]
        best = passed[0] if passed else max(written, key=lambda i: (rungs[i].agreement or 0.0, -i))
        for i, p in files.items():
            if i != best:
                for f in p.parent.glob(p.stem + ".*"):
                    with contextlib.suppress(FileNotFoundError):
                        f.unlink()
        tuned = {"images": int(len(self.tuning[0])) if self.tuning is not None else 0,
                 "source": "training images outside the calibration set", "margin": TUNING_MARGIN}
        return LadderResult(rungs[best], rungs, self.sensitivity, tuned, files[best])

    def keep_layers_fp32(self, layers: list[str]) -> bool:
        """The last rungs: each layer alone in fp32 (its sensitivity), then the top-k most sensitive,
        never all of them (a model that only passes in fp32 fails honestly). True when one passed."""
        best = self.best_scored()
        base, base_agreement = best.config, best.agreement or 0.0
        for layer in layers:
            rung = self.attempt(f"fp32 {layer} (sensitivity)", replace(base, fp32_layers=(layer,)))
            self.sensitivity[layer] = (rung.agreement - base_agreement) if rung.agreement is not None else 0.0
            if rung.passed:
                return True
        ranked = sorted(layers, key=lambda name: -self.sensitivity[name])
        return any(self.attempt(f"fp32 top {keep}", replace(base, fp32_layers=tuple(ranked[:keep]))).passed
                   for keep in range(2, len(layers)))


def climb(first: QuantConfig, *, quantize: Callable[[QuantConfig, Path], Path], workdir: Path, layers: list[str],
          tuning: tuple[np.ndarray, np.ndarray] | None, reference: np.ndarray | None, criteria: dict,
          load: Callable[[Path], Callable[[np.ndarray], np.ndarray]], methods: tuple[str, ...] = METHODS,
          ladder: bool = True) -> LadderResult:
    """Try ``first``, then the ladder's rungs until one passes ``criteria`` on the ``tuning`` images
    (held-out training images and labels; ``reference`` their fp32 logits). Returns the chosen rung (the
    first that passed, else the best scored) with its file, every rung tried and the layer sensitivities.

    ``quantize(config, stem)`` writes one configuration next to ``stem`` and returns its main file;
    ``load(path)`` gives a callable float32 batch -> logits in the format's runtime; ``layers`` are the
    quantizable layers by the names ``QuantConfig.fp32_layers`` takes; ``methods`` the calibration
    methods the quantizer offers. Without ``tuning`` only ``first`` is written, unscored."""
    run = _Ladder(quantize, workdir, tuning, reference, criteria, load)
    if run.attempt("first", first).passed or not ladder or tuning is None:
        return run.done()
    for method in methods:
        if method != first.method and run.attempt(f"method {method}", replace(first, method=method)).passed:
            return run.done()
    base = run.best_scored().config
    larger = replace(base, calibration_size=base.calibration_size * LARGER_CALIBRATION)
    if run.attempt(f"calibration {larger.calibration_size}", larger).passed or len(layers) < 2:
        return run.done()  # (keeping a model's one layer in fp32 is no quantization at all)
    run.keep_layers_fp32(layers)
    return run.done()


def tuning_data(model, ctx) -> tuple[tuple[np.ndarray, np.ndarray] | None, np.ndarray | None]:
    """The held-out training images and labels an export context offers (never test images), with the
    fp32 model's logits on them; (None, None) when it offers none."""
    if ctx.tuning is None:
        return None, None
    from .torch_family import load_eager

    tuning = ctx.tuning(TUNING_IMAGES)
    return tuning, load_eager(model)(tuning[0])


def gate(ctx) -> dict:
    return ctx.criteria or {"min_agreement": 0.995, "max_accuracy_drop": 0.003}


__all__ = ["METHODS", "QUANTIZED_OPS", "TUNING_IMAGES", "WEIGHT_TYPES", "LadderResult", "QuantConfig", "Rung",
           "climb", "gate", "quantizable_layers", "tuning_data", "quantize_onnx"]
