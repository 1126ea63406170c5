"""OpenVINO at a dynamic against a static batch shape: the INT8 input FakeQuantize per layer, INT8/fp32 at
batch 1024, the compile a new shape costs, and a dynamic batcher's variable sizes, in one run.

    python benchmarks/bench_openvino_shapes.py --artifacts artifacts [--threads 2] [--calls 500] [--repeats 3]
                                               [--sections 1 2 3] [--concurrency 16 64] [--trace 10000]

The artifacts folder needs the `openvino` and `openvino-int8` exports (sha256-checked here).

1. Per layer: each IR compiled as the predictor compiles it (f32 inference precision pinned, LATENCY, the
   thread count), at its dynamic shape and reshaped to [1024, 784], with PERF_COUNT on; ``--calls`` infer
   calls at batch 1024, the four variants alternating ``--repeats`` times. Prints the median call, the
   input FakeQuantize's node type, kernel and median time (from ``get_profiling_info``), and INT8/fp32.
2. Through `OpenVINOPredictor` (what bench, parity, verify and serve run): ``static_shapes=0`` (dynamic
   only) against the default (a static compile per batch size), PERF_COUNT off, alternating; INT8/fp32
   for each, and what compiling one more shape cost (ms per shape).
3. Variable batch sizes: the serve's DynamicBatcher (max batch 64, no delay) fed by C concurrent callers
   of one real digit, each pausing a random time (exponential, mean ``--think-us``) between requests
   so batch sizes vary, for the INT8 predictor with and without static shapes (1 thread, as a server
   worker); and ``--trace`` calls at batch sizes drawn uniformly from 1-64 (the worst case for a
   per-shape cache: more sizes than slots, none dominant), timed whole, compiles included, and without.
Target (issue 17): INT8 at least 2x fp32 images/s at batch 1024 where the CPU has VNNI.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BATCH = 1024
RUNTIMES = ("openvino", "openvino-int8")


def _input_fq(model) -> str | None:
    """The friendly name of the FakeQuantize fed by the model's input (None in an fp32 IR)."""
    for op in model.get_ordered_ops():
        if op.get_type_name() == "FakeQuantize" and op.input_value(0).get_node().get_type_name() == "Parameter":
            return op.get_friendly_name()
    return None


def _profile(core, path: str, static: bool, threads: int, x: np.ndarray, calls: int) -> dict:
    model = core.read_model(path)
    fq = _input_fq(model)
    if static:
        model.reshape({0: list(x.shape)})
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY", "PERF_COUNT": True,
              "INFERENCE_NUM_THREADS": threads}
    request = core.compile_model(model, "CPU", config).create_infer_request()
    for _ in range(20):
        request.infer({0: x}, share_inputs=True)
    times, fq_ms, kind = [], [], "-"
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        request.infer({0: x}, share_inputs=True)
        times.append(time.perf_counter_ns() - t0)
        if fq is not None and len(fq_ms) < 50:  # reading the counters costs: 50 samples are enough
            node = next((p for p in request.get_profiling_info() if p.node_name == fq), None)
            if node is not None:
                fq_ms.append(node.real_time.total_seconds() * 1e3)
                kind = f"{node.node_type} ({node.exec_type})"
    return {"ms": statistics.median(times) / 1e6, "fq_ms": statistics.median(fq_ms) if fq_ms else None,
            "fq": kind}


def _per_layer(paths: dict, threads: int, x: np.ndarray, calls: int, repeats: int) -> None:
    import openvino as ov

    core = ov.Core()
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(repeats):
        for name in RUNTIMES:
            for shape in ("dynamic", "static"):
                runs.setdefault((name, shape), []).append(
                    _profile(core, paths[name], shape == "static", threads, x, calls))
    print(f"\n1. per layer, PERF_COUNT on, batch {BATCH}, {calls} calls x {repeats} alternating repeats (medians)")
    print("| runtime | shape | ms per call | input FakeQuantize runs as | its ms |")
    print("|---|---|---:|---|---:|")
    med = {}
    for (name, shape), rs in runs.items():
        med[name, shape] = statistics.median(r["ms"] for r in rs)
        fq = [r["fq_ms"] for r in rs if r["fq_ms"] is not None]
        print(f"| {name} | {shape} | {med[name, shape]:.3f} | {rs[-1]['fq']} | "
              f"{f'{statistics.median(fq):.3f}' if fq else '-'} |")
    for shape in ("dynamic", "static"):
        print(f"INT8/fp32 ({shape} shapes on both): {med['openvino', shape] / med['openvino-int8', shape]:.2f}x")


def _through_predictor(paths: dict, threads: int, x: np.ndarray, calls: int, repeats: int) -> None:
    from mnist_deploy.formats import OpenVINOPredictor

    ms: dict[tuple[str, str], list[float]] = {}
    compile_ms: list[float] = []
    for _ in range(repeats):
        for name in RUNTIMES:
            for shape, slots in (("dynamic", 0), ("static", None)):
                kw = {} if slots is None else {"static_shapes": slots}
                p = OpenVINOPredictor(Path(paths[name]), name, "f32", threads=threads, **kw)
                prepared = p.prepare(x)
                for _ in range(20):
                    p.run(prepared)
                times = []
                for _ in range(calls):
                    t0 = time.perf_counter_ns()
                    p.finish(p.run(prepared))
                    times.append(time.perf_counter_ns() - t0)
                ms.setdefault((name, shape), []).append(statistics.median(times) / 1e6)
                for n in (1, 64, 256):  # three more shapes, twice each: what each new compile costs
                    p.run(p.prepare(x[:n]))
                    p.run(p.prepare(x[:n]))
                compile_ms += p.static.compile_ms
    print(f"\n2. through OpenVINOPredictor, batch {BATCH}, {calls} calls x {repeats} alternating repeats (medians)")
    print("| runtime | shapes | ms per call | images/s |")
    print("|---|---|---:|---:|")
    med = {k: statistics.median(v) for k, v in ms.items()}
    for (name, shape), m in med.items():
        print(f"| {name} | {shape} | {m:.3f} | {BATCH / m * 1e3:,.0f} |")
    for shape in ("dynamic", "static"):
        print(f"INT8/fp32 ({shape}): {med['openvino', shape] / med['openvino-int8', shape]:.2f}x")
    print(f"compile per new static shape: median {statistics.median(compile_ms):.1f} ms, "
          f"max {max(compile_ms):.1f} ms over {len(compile_ms)} compiles")


async def _batched(predictor, x1: np.ndarray, concurrency: int, seconds: float, think_us: float) -> dict:
    from mnist_deploy.serve.batching import DynamicBatcher

    sizes: list[int] = []
    b = DynamicBatcher(predictor, max_batch_size=64, max_queue_delay_us=0, on_batch=lambda n, _w: sizes.append(n))
    latencies: list[int] = []
    stop = time.perf_counter() + seconds

    async def caller(seed: int) -> None:
        rng = np.random.default_rng(seed)
        while time.perf_counter() < stop:
            await asyncio.sleep(rng.exponential(think_us) / 1e6)
            t0 = time.perf_counter_ns()
            await b.infer(x1)
            latencies.append(time.perf_counter_ns() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - t0
    await b.close()
    lat = np.array(latencies) / 1e3
    return {"rate": len(latencies) / elapsed, "p50": float(np.percentile(lat, 50)),
            "p99": float(np.percentile(lat, 99)), "sizes": len(set(sizes)), "mean": float(np.mean(sizes))}


def _variable(path: str, x: np.ndarray, seconds: float, concurrency: list[int], think_us: float, trace: int) -> None:
    from mnist_deploy.formats import OpenVINOPredictor

    print(f"\n3. openvino-int8, 1 thread, variable batch sizes (batcher: {seconds:g} s per cell, think time mean "
          f"{think_us:g} us; static then dynamic)")
    print("| load | shapes | calls/s | p50 us | p99 us | distinct sizes | mean size | compiles | compile ms total |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for c in concurrency:
        for shape, kw in (("static", {}), ("dynamic", {"static_shapes": 0})):
            p = OpenVINOPredictor(Path(path), "openvino-int8", "f32", threads=1, **kw)
            r = asyncio.run(_batched(p, x[:1], c, seconds, think_us))
            print(f"| batcher, {c} callers | {shape} | {r['rate']:,.0f} | {r['p50']:.0f} | {r['p99']:.0f} | "
                  f"{r['sizes']} | {r['mean']:.1f} | {p.static.compiles} | {sum(p.static.compile_ms):.0f} |",
                  flush=True)
    sizes = np.random.default_rng(0).integers(1, 65, size=trace)
    for shape, kw in (("static", {}), ("dynamic", {"static_shapes": 0})):
        p = OpenVINOPredictor(Path(path), "openvino-int8", "f32", threads=1, **kw)
        t0 = time.perf_counter()
        for n in sizes:
            p(x[:n])
        total = time.perf_counter() - t0
        spent = sum(p.static.compile_ms) / 1e3
        print(f"| {trace:,} calls, sizes uniform 1-64 | {shape} | {trace / total:,.0f} ({trace / (total - spent):,.0f}"
              f" without compiles) | - | - | 64 | {sizes.mean():.1f} | {p.static.compiles} | {1e3 * spent:.0f} |",
              flush=True)


def main() -> None:
    from mnist_deploy.artifacts.manifest import load_manifest, verified_path
    from mnist_deploy.bench.env import default_threads, loadavg
    from mnist_deploy.data.mnist import load_raw
    from mnist_deploy.formats.cpu_int8 import int8_path
    from mnist_deploy.predict import normalize_pixels

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--data-dir", default=os.environ.get("MNIST_DEPLOY_DATA", "data"))
    ap.add_argument("--threads", type=int, default=default_threads())
    ap.add_argument("--calls", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0, help="per batcher cell")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--think-us", type=float, default=300.0, help="callers' mean pause between requests")
    ap.add_argument("--trace", type=int, default=10_000, help="calls at uniform random batch sizes")
    ap.add_argument("--sections", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    args = ap.parse_args()

    import openvino as ov

    manifest = load_manifest(args.artifacts)
    paths = {n: str(verified_path(args.artifacts, n, manifest)) for n in RUNTIMES}
    raw = load_raw(Path(args.data_dir), allow_download=False)
    x = np.ascontiguousarray(normalize_pixels(raw.arrays["test-images"][:BATCH]), dtype=np.float32)
    print(f"OpenVINO {ov.__version__}, {args.artifacts}, {args.threads} threads, 8-bit path "
          f"{int8_path().get('path')}, load average before {loadavg()}")
    if 1 in args.sections:
        _per_layer(paths, args.threads, x, args.calls, args.repeats)
    if 2 in args.sections:
        _through_predictor(paths, args.threads, x, args.calls, args.repeats)
    if 3 in args.sections:
        _variable(paths["openvino-int8"], x, args.seconds, args.concurrency, args.think_us, args.trace)
    print(f"\nload average after {loadavg()}")


if __name__ == "__main__":
    main()
