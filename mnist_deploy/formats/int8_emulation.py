"""The integer arithmetic of an INT8 (QDQ) ONNX model, emulated in NumPy, exact or as x86 CPUs without
VNNI do it.

ONNX Runtime's CPU kernels (MLAS) run an 8-bit matrix product as unsigned 8-bit activations times
signed 8-bit weights (a signed-activation model is shifted by +128 first). With AVX-512 VNNI / AVX-VNNI
(``vpdpbusd``) and on ARM (``sdot``/``udot`` or widening multiplies) every product is summed into int32:
exact. Without VNNI (SSE4.1, AVX2, AVX-512BW) the kernel uses ``vpmaddubsw``: the products of each
pair of neighbouring ``k`` are added into a *signed 16-bit* lane with saturation, then ``vpmaddwd``
adds the 16-bit lanes into int32. A pair ``255 * 127 + 255 * 127 = 64770`` does not fit in 16 bits and
is clipped to 32767, so the same file predicts differently on those CPUs. 7-bit weights
(``reduce_range``: |w| <= 64, so ``2 * 255 * 64 = 32640``) or unsigned weights (u8 x u8 goes through
16-bit ``vpmaddwd``, which cannot overflow) make every path exact.

:func:`run` evaluates a QDQ model (the ops our exporters write: Quantize/DequantizeLinear, Gemm,
MatMul, Conv, Relu, MaxPool, Add, Reshape, Flatten...) with ``arithmetic="exact"`` or
``"saturating"``; :func:`saturation_report` compares the two on a batch. This machine's own path is
:func:`mnist_deploy.formats.cpu_int8.int8_path`; the emulation lets a VNNI machine see what an
AVX2-only one computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ARITHMETIC = ("exact", "saturating")
INT16_MAX, INT16_MIN = 32767, -32768
_CHUNK_ELEMENTS = 1 << 22  # pair sums held at once when checking for saturation (32 MiB of float64)


@dataclass
class EmulationStats:
    """What the integer products did: how many 8-bit matrix products ran, how many pair sums there were,
    how many exceeded int16 (and were clipped under saturating arithmetic), and the largest |pair sum|."""

    products: int = 0
    pairs: int = 0
    saturated_pairs: int = 0
    max_abs_pair: int = 0
    layers: dict[str, dict] = field(default_factory=dict)

    def add(self, name: str, pairs: int, saturated: int, max_abs: int) -> None:
        self.products += 1
        self.pairs += pairs
        self.saturated_pairs += saturated
        self.max_abs_pair = max(self.max_abs_pair, max_abs)
        layer = self.layers.setdefault(name, {"pairs": 0, "saturated_pairs": 0, "max_abs_pair": 0})
        layer["pairs"] += pairs
        layer["saturated_pairs"] += saturated
        layer["max_abs_pair"] = max(layer["max_abs_pair"], max_abs)


@dataclass
class _Quantized:
    """A tensor known as integers: ``values`` with ``scale`` and ``zero_point`` (per ``axis`` or scalar)."""

    values: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int
    dtype: np.dtype


def _load(model) -> object:
    import onnx

    if isinstance(model, str | Path):
        return onnx.load(str(model))
    return model


def _broadcast(param: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    if param.ndim == 0 or param.size == 1:
        return param.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = param.size
    return param.reshape(shape)


def pair_products(a: np.ndarray, w: np.ndarray, *, saturate: bool, stats: EmulationStats | None = None,
                  name: str = "") -> np.ndarray:
    """``a @ w.T`` for integer ``a`` (M, K) and ``w`` (N, K), summed the way an 8-bit kernel does.

    Exact: int64 sums (float64 BLAS, exact for these magnitudes). Saturating: the products of each pair
    ``(2j, 2j+1)`` of ``k`` are added and clipped to int16 (``vpmaddubsw``), then the pair sums are
    added exactly (``vpmaddwd`` + int32 adds). Returns int64 (M, N).

    Only the (pair, output) cells whose weights could overflow int16 for *some* activation in
    ``a``'s range (``max|a| * (|w_2j| + |w_2j+1|) > 32767``) are evaluated pair by pair; the rest cannot
    saturate, so the exact sum stands for them. With 7-bit weights there are none.
    """
    a = np.asarray(a)
    w = np.asarray(w)
    m, k = a.shape
    n = w.shape[0]
    if k % 2:
        a = np.concatenate([a, np.zeros((m, 1), a.dtype)], axis=1)
        w = np.concatenate([w, np.zeros((n, 1), w.dtype)], axis=1)
        k += 1
    out = np.rint(a.astype(np.float64) @ w.astype(np.float64).T).astype(np.int64)
    amax = int(np.abs(a).max(initial=0))
    we, wo = np.abs(w[:, 0::2].astype(np.int64)), np.abs(w[:, 1::2].astype(np.int64))  # (N, K/2)
    cand_n, cand_j = np.nonzero(amax * (we + wo) > INT16_MAX)
    saturated, max_abs = 0, 0
    if len(cand_n):
        w64 = w.astype(np.float64)
        wce, wco = w64[cand_n, 2 * cand_j], w64[cand_n, 2 * cand_j + 1]  # (C,)
        groups, starts = np.unique(cand_n, return_index=True)
        rows = max(1, _CHUNK_ELEMENTS // len(cand_n))
        for i in range(0, m, rows):
            a64 = a[i : i + rows].astype(np.float64)
            pairs = a64[:, 2 * cand_j] * wce + a64[:, 2 * cand_j + 1] * wco  # (rows, C), exact
            excess = pairs - np.clip(pairs, INT16_MIN, INT16_MAX)
            saturated += int(np.count_nonzero(excess))
            max_abs = max(max_abs, int(np.abs(pairs).max(initial=0)))
            if saturate and saturated:
                # cand_n is sorted (np.nonzero is row-major): sum each output's excess in one pass.
                out[i : i + rows, groups] -= np.rint(np.add.reduceat(excess, starts, axis=1)).astype(np.int64)
    if stats is not None:
        stats.add(name, m * (k // 2) * n, saturated, max_abs)
    return out


def _int_matmul(aq: _Quantized, wq: _Quantized, *, saturate: bool, stats: EmulationStats, name: str) -> np.ndarray:
    """Float result of (a - za)(w - zw) * sa * sw for activations ``aq`` (M, K) and weights ``wq`` (N, K)."""
    a = aq.values.astype(np.int64)
    za = np.asarray(aq.zero_point, dtype=np.int64).reshape(())
    w = wq.values.astype(np.int64)
    zw = np.asarray(wq.zero_point, dtype=np.int64).reshape(-1)
    signed_weights = wq.dtype == np.int8
    if aq.dtype == np.int8 and signed_weights:
        a, za = a + 128, za + 128  # MLAS runs s8 x s8 as u8 x s8 on x86 (the activation shifted by 128)
    # Only u8 x s8 goes through vpmaddubsw; u8 x u8 uses 16-bit vpmaddwd and cannot saturate.
    if signed_weights:
        acc = pair_products(a, w, saturate=saturate, stats=stats, name=name)
    else:
        acc = np.rint(a.astype(np.float64) @ w.astype(np.float64).T).astype(np.int64)
    k = a.shape[1]
    acc = acc - za * w.sum(axis=1)[None, :] - zw[None, :] * a.sum(axis=1)[:, None] + k * za * zw[None, :]
    scale = np.asarray(aq.scale, np.float64).reshape(()) * np.asarray(wq.scale, np.float64).reshape(-1)
    return (acc * scale[None, :]).astype(np.float32)


def _im2col(x: np.ndarray, kh: int, kw: int, pads, strides, dilations, pad_value) -> tuple[np.ndarray, int, int]:
    """(N, C, H, W) -> (N*OH*OW, kh*kw*C) patches in MLAS's NHWC order (kh, kw, C)."""
    n, c, h, w = x.shape
    top, left, bottom, right = pads
    xp = np.full((n, c, h + top + bottom, w + left + right), pad_value, dtype=x.dtype)
    xp[:, :, top : top + h, left : left + w] = x
    sh, sw = strides
    dh, dw = dilations
    oh = (h + top + bottom - dh * (kh - 1) - 1) // sh + 1
    ow = (w + left + right - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((n, oh, ow, kh, kw, c), dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i * dh : i * dh + sh * oh : sh, j * dw : j * dw + sw * ow : sw]
            cols[:, :, :, i, j, :] = patch.transpose(0, 2, 3, 1)
    return cols.reshape(n * oh * ow, kh * kw * c), oh, ow


def _attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def run(model, x: np.ndarray, arithmetic: str = "exact", stats: EmulationStats | None = None) -> np.ndarray:
    """Logits of the QDQ model ``model`` (a path or ModelProto) for the float32 batch ``x``, with every
    8-bit matrix product (Gemm, MatMul, Conv between a quantized activation and quantized weights)
    computed in integers, ``exact`` or ``saturating`` (see the module docstring)."""
    from onnx import numpy_helper

    if arithmetic not in ARITHMETIC:
        raise ValueError(f"arithmetic must be one of {ARITHMETIC}, got {arithmetic!r}")
    saturate = arithmetic == "saturating"
    stats = stats if stats is not None else EmulationStats()
    proto = _load(model)
    graph = proto.graph
    env: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    env[graph.input[0].name] = np.ascontiguousarray(x, dtype=np.float32)
    quant: dict[str, _Quantized] = {}  # DequantizeLinear outputs, known as integers

    for node in graph.node:
        op, a = node.op_type, _attrs(node)
        ins = [env[i] if i else None for i in node.input]
        if op == "Constant":
            out = numpy_helper.to_array(a["value"])
        elif op == "QuantizeLinear":
            zp = ins[2] if len(ins) > 2 and ins[2] is not None else np.uint8(0)
            axis = a.get("axis", 1)
            info = np.iinfo(zp.dtype)
            scale = _broadcast(ins[1].astype(np.float32), ins[0].ndim, axis)
            zpb = _broadcast(zp.astype(np.int64), ins[0].ndim, axis)
            out = np.clip(np.rint(ins[0] / scale) + zpb, info.min, info.max).astype(zp.dtype)
        elif op == "DequantizeLinear":
            zp = ins[2] if len(ins) > 2 and ins[2] is not None else np.zeros((), ins[0].dtype)
            axis = a.get("axis", 1)
            scale = _broadcast(ins[1].astype(np.float32), ins[0].ndim, axis)
            out = ((ins[0].astype(np.int64) - _broadcast(zp.astype(np.int64), ins[0].ndim, axis)) * scale).astype(
                np.float32)
            if ins[0].dtype in (np.int8, np.uint8):
                quant[node.output[0]] = _Quantized(ins[0], ins[1], zp, axis, ins[0].dtype)
        elif op in ("Gemm", "MatMul"):
            out = _gemm(node, a, ins, quant, saturate, stats)
        elif op == "Conv":
            out = _conv(node, a, ins, quant, saturate, stats)
        elif op == "Relu":
            out = np.maximum(ins[0], 0)
        elif op == "Add":
            out = ins[0] + ins[1]
        elif op == "Mul":
            out = ins[0] * ins[1]
        elif op in ("Reshape",):
            shape = [d if d != 0 else ins[0].shape[i] for i, d in enumerate(ins[1].tolist())]
            out = ins[0].reshape(shape)
        elif op == "Flatten":
            axis = a.get("axis", 1)
            out = ins[0].reshape(int(np.prod(ins[0].shape[:axis])), -1)
        elif op == "Transpose":
            out = ins[0].transpose(a.get("perm"))
        elif op == "Identity":
            out = ins[0]
        elif op == "MaxPool":
            out = _maxpool(ins[0], a)
        else:
            raise NotImplementedError(f"int8 emulation: ONNX op {op} ({node.name}) is not emulated")
        env[node.output[0]] = out
    return np.asarray(env[graph.output[0].name], dtype=np.float32)


def _gemm(node, a, ins, quant, saturate, stats) -> np.ndarray:
    x, w = ins[0], ins[1]
    xq, wq = quant.get(node.input[0]), quant.get(node.input[1])
    trans_b = a.get("transB", 0) if node.op_type == "Gemm" else 0
    if a.get("transA", 0):
        x = x.T
    if xq is not None and wq is not None and x.ndim == 2:
        wvals = wq.values if trans_b else wq.values.T  # (N, K)
        wmat = _Quantized(wvals, wq.scale, wq.zero_point, 0, wq.dtype)
        xmat = xq if not a.get("transA", 0) else _Quantized(xq.values.T, xq.scale, xq.zero_point, 0, xq.dtype)
        out = _int_matmul(xmat, wmat, saturate=saturate, stats=stats, name=node.name or node.output[0])
        out = out * np.float32(a.get("alpha", 1.0))
    else:
        out = x @ (w.T if trans_b else w) * np.float32(a.get("alpha", 1.0))
    if len(ins) > 2 and ins[2] is not None:
        out = out + np.float32(a.get("beta", 1.0)) * ins[2]
    return out.astype(np.float32)


def _conv(node, a, ins, quant, saturate, stats) -> np.ndarray:
    x, w = ins[0], ins[1]
    if a.get("group", 1) != 1:
        raise NotImplementedError("int8 emulation: grouped convolutions are not emulated")
    cout, cin, kh, kw = w.shape
    pads = a.get("pads", [0, 0, 0, 0])
    pads = (pads[0], pads[1], pads[2], pads[3])
    strides, dilations = a.get("strides", [1, 1]), a.get("dilations", [1, 1])
    xq, wq = quant.get(node.input[0]), quant.get(node.input[1])
    n = x.shape[0]
    if xq is not None and wq is not None:
        zp = np.asarray(xq.zero_point).reshape(())
        cols, oh, ow = _im2col(xq.values, kh, kw, pads, strides, dilations, zp.astype(xq.values.dtype))
        wmat = wq.values.transpose(0, 2, 3, 1).reshape(cout, -1)
        out = _int_matmul(_Quantized(cols, xq.scale, xq.zero_point, 0, xq.dtype),
                          _Quantized(wmat, wq.scale, wq.zero_point, 0, wq.dtype),
                          saturate=saturate, stats=stats, name=node.name or node.output[0])
    else:
        cols, oh, ow = _im2col(x, kh, kw, pads, strides, dilations, np.float32(0))
        out = cols @ w.transpose(0, 2, 3, 1).reshape(cout, -1).T
    out = out.reshape(n, oh, ow, cout).transpose(0, 3, 1, 2)
    if len(ins) > 2 and ins[2] is not None:
        out = out + ins[2].reshape(1, -1, 1, 1)
    return np.ascontiguousarray(out, dtype=np.float32)


def _maxpool(x: np.ndarray, a: dict) -> np.ndarray:
    kh, kw = a["kernel_shape"]
    sh, sw = a.get("strides", [1, 1])
    pads = a.get("pads", [0, 0, 0, 0])
    if any(pads) or a.get("ceil_mode", 0) or any(d != 1 for d in a.get("dilations", [1, 1])):
        raise NotImplementedError("int8 emulation: MaxPool with padding, ceil_mode or dilation")
    n, c, h, w = x.shape
    oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
    out = np.full((n, c, oh, ow), -np.inf, dtype=x.dtype)
    for i in range(kh):
        for j in range(kw):
            out = np.maximum(out, x[:, :, i : i + sh * oh : sh, j : j + sw * ow : sw])
    return out


def saturation_report(model, images: np.ndarray, reference: np.ndarray | None = None,
                      batch: int = 1000) -> dict:
    """Run ``model`` on ``images`` with exact and with saturating 8-bit arithmetic and compare.

    Returns the number of images whose predicted digit changes between the two, the pair sums that
    overflowed int16, and (given fp32 ``reference`` logits) each arithmetic's top-1 agreement with fp32.
    """
    proto = _load(model)
    preds, stats = {}, {}
    for arith in ARITHMETIC:
        st = EmulationStats()
        outs = [run(proto, images[i : i + batch], arith, st) for i in range(0, len(images), batch)]
        preds[arith] = np.concatenate(outs).argmax(1)
        stats[arith] = st
    st = stats["exact"]
    out = {
        "images": int(len(images)),
        "changed_predictions": int((preds["exact"] != preds["saturating"]).sum()),
        "pairs": st.pairs,
        "saturated_pairs": st.saturated_pairs,
        "max_abs_pair": st.max_abs_pair,
        "layers": st.layers,
    }
    if reference is not None:
        ref = reference.argmax(1)
        out["agreement_exact"] = float((preds["exact"] == ref).mean())
        out["agreement_saturating"] = float((preds["saturating"] == ref).mean())
    return out


__all__ = ["ARITHMETIC", "EmulationStats", "pair_products", "run", "saturation_report"]
