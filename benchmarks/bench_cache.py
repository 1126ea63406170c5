"""Median warm load_splits time (both splits from a cache whose sources are unchanged).
python benchmarks/bench_cache.py DATA CACHE RUNS [full]   (full: drop the .verified notes before each load)"""
import pathlib
import statistics
import sys
import time

from mnist_deploy.data import mnist

data_dir, cache_dir, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
full = sys.argv[4:] == ["full"]
mnist.load_splits(data_dir, cache_dir=cache_dir, allow_download=False)  # builds the cache if needed
for _ in range(2):  # warm-up
    mnist.load_splits(data_dir, cache_dir=cache_dir, allow_download=False)
times = []
for _ in range(runs):
    if full:
        for p in pathlib.Path(cache_dir).glob("*.verified"):
            p.unlink()
    t = time.perf_counter_ns()
    splits, _ = mnist.load_splits(data_dir, cache_dir=cache_dir, allow_download=False)
    times.append((time.perf_counter_ns() - t) / 1e6)
times.sort()
print(f"{mnist.__file__}: format {mnist.CACHE_FORMAT}{' full check' if full else ''}, {runs} warm loads: "
      f"median {statistics.median(times):.1f} ms, min {times[0]:.1f} ms, max {times[-1]:.1f} ms")
