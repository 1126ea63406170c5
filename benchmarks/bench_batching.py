"""Where should DynamicBatcher run the model call: inline on the event loop, or in a worker thread?

    python benchmarks/bench_batching.py --artifacts artifacts [--seconds 2] [--runtime onnx]
                                        [--concurrency 1 16 64] [--work-us 0 250]

Loads the real model (ONNX Runtime, 1 intra-op thread, as one server worker does), then, in one
asyncio loop, runs C callers that each loop: busy-wait ``work_us`` on the loop (standing in for a
request's HTTP and JSON work, about 250 us per request in today's server) then ``await
batcher.infer(one real MNIST row)``. For inline and thread, at each C and work, prints calls per
second, the infer latency p50/p99 and the mean batch size, and the thread/inline throughput ratio.
No HTTP here: bench_serve.py measures the server end to end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mnist_deploy.serve.batching import DynamicBatcher  # noqa: E402


def _busy(us: int) -> None:
    end = time.perf_counter_ns() + us * 1000
    while time.perf_counter_ns() < end:
        pass


async def _cell(fn, x: np.ndarray, *, concurrency: int, work_us: int, seconds: float, in_thread: bool,
                max_batch_size: int) -> dict:
    batches: list[int] = []
    b = DynamicBatcher(fn, max_batch_size=max_batch_size, max_queue_delay_us=0, run_in_thread=in_thread,
                       on_batch=lambda n, _w: batches.append(n))
    latencies: list[int] = []
    stop = time.perf_counter() + seconds

    async def caller() -> None:
        while time.perf_counter() < stop:
            _busy(work_us)
            t0 = time.perf_counter_ns()
            await b.infer(x)
            latencies.append(time.perf_counter_ns() - t0)

    for _ in range(20):  # warm-up (thread start, allocator)
        await b.infer(x)
    batches.clear()
    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    await b.close()
    lat = np.array(latencies) / 1e3
    return {"rate": len(latencies) / elapsed, "p50": float(np.percentile(lat, 50)),
            "p99": float(np.percentile(lat, 99)), "mean_batch": float(np.mean(batches)) if batches else 0.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--runtime", default="onnx")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--work-us", type=int, nargs="+", default=[0, 250])
    ap.add_argument("--max-batch-size", type=int, default=64)
    args = ap.parse_args(argv)

    from mnist_deploy.data.mnist import load_raw
    from mnist_deploy.predict import load_model, normalize_pixels

    model = load_model(artifacts=args.artifacts, runtime=args.runtime, threads=1)
    data_dir = os.environ.get("MNIST_DEPLOY_DATA", "data")
    raw = load_raw(Path(data_dir), allow_download=False)
    x = normalize_pixels(raw.arrays["test-images"][:1].reshape(1, 784))
    fn = model.logits
    t = []
    for _ in range(2000):
        t0 = time.perf_counter_ns()
        fn(x)
        t.append(time.perf_counter_ns() - t0)
    print(f"model call alone ({args.runtime}, 1 thread, batch 1): p50 {np.median(t) / 1e3:.1f} us")
    print("| callers | work us | mode | calls/s | p50 us | p99 us | mean batch | thread/inline |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for work in args.work_us:
        for c in args.concurrency:
            res = {}
            for mode in ("inline", "thread"):
                res[mode] = r = asyncio.run(_cell(fn, x, concurrency=c, work_us=work, seconds=args.seconds,
                                                  in_thread=mode == "thread", max_batch_size=args.max_batch_size))
                ratio = f"{res['thread']['rate'] / res['inline']['rate']:.2f}x" if mode == "thread" else ""
                print(f"| {c} | {work} | {mode} | {r['rate']:,.0f} | {r['p50']:.0f} | {r['p99']:.0f} | "
                      f"{r['mean_batch']:.1f} | {ratio} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
