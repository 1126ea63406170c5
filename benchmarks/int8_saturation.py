"""What 8-bit saturation does to an INT8 model, seen on any CPU: each quantization configuration's
predictions with exact int32 arithmetic (VNNI, ARM) and with `vpmaddubsw`'s int16 saturation (x86
without VNNI: SSE4.1, AVX2, AVX-512BW), emulated in NumPy on the model's own quantized weights and
activations; plus its agreement with fp32 and its images/s at batch 1024 against onnxruntime fp32,
measured in the same run on this machine.

    MNIST_DEPLOY_DATA=/work/shared/data/mnist python benchmarks/int8_saturation.py --artifacts artifacts

``--artifacts`` is a folder `mnist-deploy train` wrote (repeatable). Configurations:
old-default (S8S8, 8-bit weights, 8-bit logits: the exporter's default before issue 17), s8-float-logits,
s7 (7-bit weights, reduce_range) with 8-bit and with float logits (the new default), u8u8.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

CONFIGS = {
    "old-default s8s8": dict(weights="s8", float_logits=False),
    "s8s8 float logits": dict(weights="s8", float_logits=True),
    "s7 (reduce_range)": dict(weights="s7", float_logits=False),
    "s7 float logits (new default)": dict(weights="s7", float_logits=True),
    "u8u8 float logits": dict(weights="u8", float_logits=True),
}


def images_per_second(session, x: np.ndarray, repeats: int) -> float:
    feed = {session.get_inputs()[0].name: x}
    for _ in range(3):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        session.run(None, feed)
        times.append(time.perf_counter_ns() - t0)
    return len(x) / (statistics.median(times) / 1e9)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifacts", action="append", required=True)
    ap.add_argument("--images", type=int, default=10_000, help="test images to compare on")
    ap.add_argument("--repeats", type=int, default=30, help="timed runs at batch 1024 (median reported)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()

    import onnxruntime as ort

    from mnist_deploy.export.source import load_eval_data, load_source, reference_logits
    from mnist_deploy.formats.base import ExportContext
    from mnist_deploy.formats.cpu_int8 import int8_path
    from mnist_deploy.formats.int8_emulation import saturation_report
    from mnist_deploy.formats.onnx_family import OnnxOptions, _write_onnx_fp32
    from mnist_deploy.formats.quantize import QuantConfig, quantize_onnx

    path = int8_path()
    print(f"this CPU's 8-bit path: {path['path']} ({path['detail']}); threads {args.threads}")
    rows = []
    for folder in args.artifacts:
        source = load_source(Path(folder) / "mnist_model_state_dict.pth")
        data = load_eval_data(source.manifest, None, None, False)
        images, labels = data.images[: args.images], data.labels[: args.images]
        reference = reference_logits(source.model, images)
        import torch

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = args.threads, 1
        opts.log_severity_level = 3
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = Path(tmp) / "fp32.onnx"
            _write_onnx_fp32(source.model.eval(), fp32, OnnxOptions(),
                             ExportContext(example=torch.from_numpy(images[:2].copy())))
            from onnxruntime.quantization.shape_inference import quant_pre_process

            prep = Path(tmp) / "prep.onnx"
            quant_pre_process(str(fp32), str(prep), skip_symbolic_shape=True)
            batch = np.ascontiguousarray(data.images[:1024])
            fp32_session = ort.InferenceSession(str(fp32), opts, providers=["CPUExecutionProvider"])
            calib = data.calibration(500)
            for name, kw in CONFIGS.items():
                out = Path(tmp) / f"{len(rows)}.onnx"
                quantize_onnx(prep, out, replace(QuantConfig(), **kw), calib)
                session = ort.InferenceSession(str(out), opts, providers=["CPUExecutionProvider"])
                pred = session.run(None, {"input": images})[0].argmax(1)
                report = saturation_report(out, images, reference)
                # Interleave the two timings so load on the machine hits both alike.
                int8_ips, fp32_ips = [], []
                for _ in range(3):
                    int8_ips.append(images_per_second(session, batch, args.repeats // 3))
                    fp32_ips.append(images_per_second(fp32_session, batch, args.repeats // 3))
                row = {
                    "model": f"{source.manifest['model']['name']} seed {source.manifest['training']['seed']} "
                             f"{source.manifest['training']['epochs']} ep"
                             + (f" subset {source.manifest['training']['subset']}"
                                if source.manifest["training"].get("subset") else ""),
                    "config": name,
                    "agreement_here": float((pred == reference.argmax(1)).mean()),
                    "agreement_exact": report["agreement_exact"],
                    "agreement_saturating": report["agreement_saturating"],
                    "changed_by_saturation": report["changed_predictions"],
                    "saturated_pairs": report["saturated_pairs"],
                    "max_abs_pair": report["max_abs_pair"],
                    "accuracy_drop": float((reference.argmax(1) == labels).mean() - (pred == labels).mean()),
                    "int8_images_per_s": statistics.median(int8_ips),
                    "fp32_images_per_s": statistics.median(fp32_ips),
                }
                row["speedup"] = row["int8_images_per_s"] / row["fp32_images_per_s"]
                rows.append(row)
                print(f"{row['model']:<22} {name:<30} here {100 * row['agreement_here']:6.2f}%  exact "
                      f"{100 * row['agreement_exact']:6.2f}%  saturating {100 * row['agreement_saturating']:6.2f}%  "
                      f"changed {row['changed_by_saturation']:4d}  max|pair| {row['max_abs_pair']:6d}  "
                      f"drop {100 * row['accuracy_drop']:+.2f} pt  {row['int8_images_per_s'] / 1e3:8.0f} k/s  "
                      f"{row['speedup']:.2f}x fp32", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu_int8_path": path, "threads": args.threads, "rows": rows},
                                              indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
