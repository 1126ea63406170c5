"""Where one worker's time goes per request: the server's ASGI app driven in-process, no sockets, no wrk.

    python benchmarks/profile_v2.py --artifacts artifacts [--requests 3000] [--no-fast-path]
                                    [--cprofile "v2 JSON"] [--top 25]

Builds the app `mnist-deploy serve` runs (create_app: the guard, FastAPI, the service; ONNX Runtime, 1
thread, no batching) and sends each of benchmarks/bench_v2.py's request bodies to it directly
(``await app(scope, receive, send)``), timing every request with ``perf_counter_ns``: the CPU a worker
spends per request above the HTTP parser (httptools), which is the same for every route. Prints the
median and p90 microseconds per request and ratios against ``/predict``. ``--cprofile LABEL`` profiles
that case's requests (rows: 1) with cProfile and prints the top functions by cumulative time;
``--no-fast-path`` sends everything through FastAPI (the guard's fast paths off), as v2 was before.
Compare two versions of the package with PYTHONPATH pointing at the other tree.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_v2  # noqa: E402  (cases, digits)


def _scope(case: bench_v2.Case) -> dict:
    headers = [(b"content-type", case.content_type.encode()), (b"content-length", str(len(case.body)).encode())]
    if case.header_length is not None:
        headers.append((b"inference-header-content-length", str(case.header_length).encode()))
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
            "path": case.path, "raw_path": case.path.encode(), "query_string": b"", "root_path": "",
            "headers": headers, "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8000)}


async def _one(app, case: bench_v2.Case, scope: dict) -> int:
    sent = {"status": 0}

    async def receive():
        return {"type": "http.request", "body": case.body, "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start":
            sent["status"] = message["status"]

    await app(dict(scope), receive, send)
    return sent["status"]


async def run(app, case: bench_v2.Case, requests: int, profiler: cProfile.Profile | None = None) -> list[float]:
    scope = _scope(case)
    for _ in range(min(200, requests)):  # warm-up
        status = await _one(app, case, scope)
        if status != 200:
            raise RuntimeError(f"{case.label} ({case.rows} rows) answered {status}")
    times = []
    for _ in range(requests):
        if profiler is not None:
            profiler.enable()
        t0 = time.perf_counter_ns()
        await _one(app, case, scope)
        times.append((time.perf_counter_ns() - t0) / 1e3)
        if profiler is not None:
            profiler.disable()
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", default="artifacts")
    ap.add_argument("--requests", type=int, default=3000, help="timed requests per case (1-row cases)")
    ap.add_argument("--no-fast-path", action="store_true", help="every route through FastAPI")
    ap.add_argument("--cprofile", default=None, help="profile this case label (1 row), e.g. 'v2 JSON'")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--v2-model", default=None, help="the v2 model name (default <name>-pixels; an older "
                    "server: <name>)")
    ap.add_argument("--skip", nargs="*", default=[], help="case labels to leave out (e.g. 'v2 binary')")
    ap.add_argument("--data-dir", default=os.environ.get("MNIST_DEPLOY_DATA"))
    args = ap.parse_args(argv)

    import mnist_deploy
    from mnist_deploy.predict import load_model
    from mnist_deploy.serve import create_app

    model = load_model(artifacts=args.artifacts, runtime="onnx", threads=1)
    app = create_app(model=model, fast_path=not args.no_fast_path)
    app.service.start()
    name = json.loads((Path(args.artifacts) / "manifest.json").read_text())["model"]["name"]
    todo = [c for c in bench_v2.cases(name, bench_v2.digits(args.data_dir), args.v2_model) if c.label not in args.skip]
    print(f"package: {Path(mnist_deploy.__file__).parent}; fast path {'off' if args.no_fast_path else 'on'}")
    results = {}
    for case in todo:
        n = args.requests if case.rows == 1 else max(50, args.requests // 20)
        profiler = cProfile.Profile() if case.label == args.cprofile and case.rows == 1 else None
        times = asyncio.run(run(app, case, n, profiler))
        results[(case.label, case.rows)] = med = statistics.median(times)
        p90 = statistics.quantiles(times, n=10)[-1]
        print(f"{case.label:<20} {case.rows:>3} rows  {len(case.body):>7,} bytes  median {med:8.1f} us  "
              f"p90 {p90:8.1f} us  ({n} requests)")
        if profiler is not None:
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(args.top)
            print(out.getvalue())
    base = results[(bench_v2.PREDICT, 1)]
    for key in ((("v2 JSON", 1)), ("v2 binary", 1)):
        if key in results:
            print(f"- {key[0]} / /predict time per request (1 row): {results[key] / base:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
