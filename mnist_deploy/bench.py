"""Benchmark every runtime on every device: latency percentiles, throughput, GFLOP/s against a measured
matmul peak, cold start, artifact size and test accuracy, with the environment that produced them.

One row per runtime x device x batch size. Timing is ``time.perf_counter_ns()`` around the runtime
call alone (``Predictor.run``, plus ``sync`` on CUDA), on inputs prepared beforehand, after warm-up
calls, repeated until ``min_time`` has passed and at least ``min_calls`` calls were made. Runtimes
are measured one after another and released in between, so no two thread pools compete.

A runtime or device that is not available is a row with status ``skipped`` and the reason; one that
raises is a row with status ``failed`` and the error, and the others go on. Bad input (names, batch
sizes, a missing or tampered artifact) raises before anything is timed.

The result is a plain dict; :mod:`bench_report` turns it into the verdict, the tables and the files.
"""

from __future__ import annotations

import array
import contextlib
import datetime as _dt
import gc
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import __version__
from .artifacts import load_manifest, manifest_path, verified_path
from .bench_report import RECORD_KEYS, format_ms, verdict
from .errors import InputError, ManifestError, MnistDeployError, RuntimeUnavailable

DEFAULT_BATCH_SIZES = (1, 32, 256, 1024)
DEVICE_CHOICES = ("cpu", "cuda", "all")
MAX_BATCH = 1 << 20  # the dynamic batch axis the exporters declare
ACCURACY_CHUNK = 1000
PEAK_SIZES = (1024, 2048)  # square fp32 matrix products for the roofline reference (CPU)
CUDA_PEAK_SIZES = (4096, 8192)


# ---------------------------------------------------------------------------------------------
# What can be benchmarked: the eager model, its torch.compile, and one runtime per registry format.


@dataclass(frozen=True)
class BenchRuntime:
    name: str  # the row's runtime name
    format: str  # the manifest key it runs: a format name, or "state_dict" for eager / torch.compile
    description: str


def runtime_table() -> dict[str, BenchRuntime]:
    """Every runtime ``bench`` knows, in table order; file formats come from :data:`formats.FORMATS`."""
    from .formats import FORMATS

    out = {"pytorch": BenchRuntime("pytorch", "state_dict", "PyTorch eager, from the state_dict")}
    out["torch.compile"] = BenchRuntime(
        "torch.compile", "state_dict", "torch.compile (inductor) of the eager model; its first call compiles")
    for fmt in FORMATS.values():
        out[fmt.runtime] = BenchRuntime(fmt.runtime, fmt.name, fmt.description)
    return out


def _aliases() -> dict[str, str]:
    from .formats import FORMATS

    out = {"eager": "pytorch", "torch": "pytorch", "compile": "torch.compile"}
    out.update({fmt.name: fmt.runtime for fmt in FORMATS.values()})
    out.update({name: name for name in runtime_table()})
    return out


def runtime_names() -> tuple[str, ...]:
    return tuple(runtime_table())


# ---------------------------------------------------------------------------------------------
# Input checks: everything here raises before any timing.


def parse_runtimes(value: str | Sequence[str] | None) -> tuple[tuple[str, ...], bool]:
    """``"all"``/None -> every runtime; else a comma list of runtime or format names.

    Returns ``(names, explicit)``: an explicitly named runtime whose artifact was never exported is
    an error, while ``all`` shows it as a skipped row.
    """
    items = _split(value)
    if not items or items == ["all"]:
        return runtime_names(), False
    aliases = _aliases()
    names = []
    for item in items:
        key = item.strip().lower()
        if key not in aliases:
            from .formats import FORMATS

            raise InputError(
                f"unknown runtime '{item}'; choose from {', '.join(runtime_names())} or all "
                f"(format names {', '.join(FORMATS)} work too)"
            )
        names.append(aliases[key])
    order = runtime_names()
    return tuple(sorted(dict.fromkeys(names), key=order.index)), True


def parse_batch_sizes(value: str | Sequence[int] | None) -> tuple[int, ...]:
    """A comma list (or sequence) of positive integers, deduplicated and sorted."""
    if value is None:
        return DEFAULT_BATCH_SIZES
    items = _split(value) if isinstance(value, str) else list(value)
    if not items:
        raise InputError("--batch-sizes is empty; give positive integers such as 1,32,256,1024")
    out = []
    for item in items:
        text = str(item).strip()
        try:
            n = int(text) if not isinstance(item, bool) else None
        except ValueError:
            n = None
        if n is None or str(n) != text.lstrip("+") or n < 1:
            raise InputError(f"batch size '{text}' is not a positive integer (e.g. --batch-sizes 1,32,256,1024)")
        if n > MAX_BATCH:
            raise InputError(f"batch size {n} is larger than {MAX_BATCH}, the exported batch axis's limit")
        out.append(n)
    return tuple(sorted(set(out)))


def _split(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return [str(v).strip() for v in value if str(v).strip()]


def plan_devices(device: str = "all") -> list[tuple[str, str | None]]:
    """The devices a run covers, each with ``None`` when usable or the reason it is not.

    ``all`` is CPU plus CUDA; CUDA without a GPU is not an error here but a reason for skipped rows.
    """
    from .devices import resolve_device

    key = (device or "all").strip().lower()
    if key == "all":
        names = ["cpu", "cuda"]
    elif key == "cpu" or key == "cuda" or key.startswith("cuda:"):
        names = [key]
    else:
        raise InputError(f"unknown device '{device}'; choose one of {', '.join(DEVICE_CHOICES)}")
    out = []
    for name in names:
        try:
            resolve_device(name)
        except RuntimeUnavailable as exc:
            # devices' message ends with advice for train ("use --device cpu or auto"); keep the cause
            out.append((name, str(exc).split(" but ", 1)[-1].split(";")[0]))
        else:
            out.append((name, None))
    return out


def unavailable_reason(runtime: str, device: str) -> str | None:
    """Why ``runtime`` cannot run on ``device`` here, or None; checked before loading anything."""
    import importlib.util

    if runtime.startswith("onnxruntime"):
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed"
        if device.startswith("cuda"):
            import onnxruntime as ort

            if "CUDAExecutionProvider" not in ort.get_available_providers():
                return ("ONNX Runtime has no CUDAExecutionProvider here "
                        f"(providers: {', '.join(ort.get_available_providers())}); install onnxruntime-gpu")
    if runtime == "torch.compile" and device == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except ImportError:
            pass  # a private helper that moved: let the compile itself say what is wrong
        except Exception as exc:  # inductor raises its own InvalidCxxCompiler
            return f"torch.compile on CPU needs a C++ compiler: {_first_line(exc)}"
    return None


@dataclass
class BenchConfig:
    """What decides a bench run; recorded in bench.json."""

    artifacts: str = "artifacts"
    runtimes: tuple[str, ...] = ()
    explicit_runtimes: bool = False
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    device: str = "all"
    threads: int = 1
    warmup: int = 10
    min_time: float = 1.0
    min_calls: int = 20

    def validate(self) -> None:
        if not isinstance(self.threads, int) or self.threads < 1:
            raise InputError(f"--threads must be at least 1, got {self.threads}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise InputError(f"--warmup must be 0 or more calls, got {self.warmup}")
        if not (isinstance(self.min_time, int | float) and math.isfinite(self.min_time) and self.min_time > 0):
            raise InputError(f"--min-time must be a positive number of seconds, got {self.min_time}")
        if not isinstance(self.min_calls, int) or self.min_calls < 1:
            raise InputError(f"min_calls must be at least 1, got {self.min_calls}")


def default_threads() -> int:
    """The cores this process may run on (the affinity mask), else the machine's core count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def check_artifacts(folder: Path, manifest: dict, names: Sequence[str], explicit: bool) -> dict[str, str]:
    """Verify every artifact the run will load before any timing; return {runtime: skip reason}.

    A tampered or missing file is an error whichever way the runtime was chosen. A format that was
    never exported (or whose export failed) is an error when named, a skipped row under ``all``.
    """
    table = runtime_table()
    skip = {}
    entries = manifest.get("artifacts", {})
    verified_path(folder, "state_dict", manifest)
    for name in names:
        key = table[name].format
        if key == "state_dict":
            continue
        entry = entries.get(key)
        if entry is None or entry.get("status") != "ok":
            why = ("was never exported" if entry is None
                   else f"export failed ({entry.get('error') or entry.get('status')})")
            if explicit:
                raise ManifestError(f"{manifest_path(folder)}: '{key}' (runtime {name}) {why}; "
                                    f"run `mnist-deploy export --artifacts {folder} --format {key}` first")
            skip[name] = f"artifact '{key}' {why}; run mnist-deploy export"
            continue
        verified_path(folder, key, manifest)
    return skip


# ---------------------------------------------------------------------------------------------
# Measuring.


def time_calls(run: Callable, prepared, *, warmup: int, min_time: float, min_calls: int,
               sync: Callable | None = None) -> np.ndarray:
    """Per-call durations in ns of ``run(prepared)`` (then ``sync()`` when given), after ``warmup`` calls."""
    for _ in range(warmup):
        run(prepared)
    if sync is not None:
        sync()
    clock = time.perf_counter_ns
    times = array.array("q")
    append = times.append
    deadline = clock() + int(min_time * 1e9)
    if sync is None:
        while True:
            t0 = clock()
            run(prepared)
            t1 = clock()
            append(t1 - t0)
            if t1 >= deadline and len(times) >= min_calls:
                break
    else:
        while True:
            t0 = clock()
            run(prepared)
            sync()
            t1 = clock()
            append(t1 - t0)
            if t1 >= deadline and len(times) >= min_calls:
                break
    return np.frombuffer(times, dtype=np.int64).copy()


def latency_stats(times_ns: np.ndarray, batch_size: int, flops_per_example: int) -> dict:
    """Percentiles of one call in ms; throughput and GFLOP/s from total work over total timed time."""
    ms = times_ns.astype(np.float64) / 1e6
    total_s = float(times_ns.sum()) / 1e9
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99), "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()), "max_ms": float(ms.max()), "std_ms": float(ms.std()), "n_calls": int(len(ms)),
        "throughput_per_s": batch_size * len(ms) / total_s,
        "gflops": flops_per_example * batch_size * len(ms) / total_s / 1e9,
    }


def measure_peak(device: str = "cpu", threads: int | None = None, *, sizes: Sequence[int] | None = None,
                 repeats: int = 5) -> dict:
    """The roofline reference: fp32 GFLOP/s of square matrix products, median of ``repeats`` calls.

    On CPU both PyTorch's GEMM (MKL) and ONNX Runtime's (MLAS, with B a constant that it prepacks,
    as it does a model's weights) are measured at each size with the same thread count, and the
    best median is the peak: the machine's, not one library's (a library that picks a slow kernel
    for this CPU would understate it). On CUDA, torch.mm (cuBLAS) with TF32 off.
    """
    cuda = device.startswith("cuda")
    candidates: dict[str, dict] = {}
    for n in sizes or (CUDA_PEAK_SIZES if cuda else PEAK_SIZES):
        for name, ns in _peak_at(n, device, threads, repeats):
            flops = 2.0 * n ** 3
            candidates[f"{name} {n}"] = {"gflops": flops / float(np.median(ns)), "best_gflops": flops / float(ns.min()),
                                         "n": n, "calls": int(len(ns))}
    best = max(candidates, key=lambda k: candidates[k]["gflops"])
    return {"gflops": candidates[best]["gflops"], "method": best.rsplit(" ", 1)[0], "n": candidates[best]["n"],
            "threads": threads, "candidates": candidates}


def _peak_at(n: int, device: str, threads: int | None, repeats: int):
    """Yield (library, per-call ns) for an n x n fp32 product on ``device``."""
    import torch

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    timing = {"warmup": 2, "min_time": 1e-9, "min_calls": repeats}
    if device.startswith("cuda"):
        dev = torch.device(device)
        ta, tb = torch.from_numpy(a).to(dev), torch.from_numpy(b).to(dev)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            yield "torch.mm (cuBLAS)", time_calls(lambda _: torch.mm(ta, tb), None, **timing,
                                                  sync=lambda: torch.cuda.synchronize(dev))
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        return
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    with torch.inference_mode():
        yield "torch.mm (MKL)", time_calls(lambda _: torch.mm(ta, tb), None, **timing)
    try:
        session = _ort_matmul_session(b, threads)
    except ImportError:
        return
    feeds = {"A": a}
    yield "onnxruntime MatMul (MLAS)", time_calls(lambda _: session.run(None, feeds), None, **timing)


def _ort_matmul_session(b: np.ndarray, threads: int | None):
    """A one-node ONNX graph ``A @ B`` with B a constant, prepacked like a layer's weights."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    shape = list(b.shape)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "B"], ["C"])], "peak",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("C", TensorProto.FLOAT, shape)],
        initializer=[numpy_helper.from_array(b, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------------------------------------
# Loading one runtime.


def _eager_model(folder: Path, manifest: dict):
    from .formats import model_from_state_dict

    return model_from_state_dict(manifest, verified_path(folder, "state_dict", manifest))


def load_runtime(name: str, folder: Path, manifest: dict, device: str, threads: int | None):
    """Load runtime ``name`` as a :class:`formats.Predictor` on ``device`` (sha256-checked first)."""
    from . import formats

    rt = runtime_table()[name]
    if name == "pytorch":
        return formats.load_eager(_eager_model(folder, manifest), device)
    if name == "torch.compile":
        import torch

        model = _eager_model(folder, manifest).to(device)
        return formats.TorchPredictor(torch.compile(model), "torch.compile", device)
    path = verified_path(folder, rt.format, manifest)
    return formats.load_predictor(rt.format, path, device=device, threads=threads)


def _inductor_cache_counts() -> tuple[int, int]:
    with contextlib.suppress(Exception):
        from torch._dynamo.utils import counters

        return int(counters["inductor"]["fxgraph_cache_hit"]), int(counters["inductor"]["fxgraph_cache_miss"])
    return 0, 0


@dataclass
class _Data:
    images: np.ndarray  # float32 (N, *input_shape)
    labels: np.ndarray  # int64 (N,)

    def batch(self, n: int) -> np.ndarray:
        idx = np.arange(n) % len(self.images)
        return np.ascontiguousarray(self.images[idx])


def _accuracy(predictor, data: _Data) -> float:
    correct = 0
    for i in range(0, len(data.images), ACCURACY_CHUNK):
        logits = predictor(data.images[i : i + ACCURACY_CHUNK])
        correct += int((np.asarray(logits).argmax(1) == data.labels[i : i + ACCURACY_CHUNK]).sum())
    return correct / len(data.images)


def _row(rt: BenchRuntime, device: str, batch_size: int | None, status: str, reason: str = "", **values) -> dict:
    row = dict.fromkeys(RECORD_KEYS)
    row.update(runtime=rt.name, format=rt.format, device=device, batch_size=batch_size, status=status,
               reason=reason)
    row.update(values)
    return row


def _bench_runtime(rt: BenchRuntime, device: str, *, folder: Path, manifest: dict, config: BenchConfig,
                   data: _Data, flops: int, peak: float | None, size_bytes: int | None,
                   progress: Callable[[str], None]) -> list[dict]:
    common = {"size_bytes": size_bytes, "threads": config.threads}
    sync = None
    try:
        t0 = time.perf_counter_ns()
        predictor = load_runtime(rt.name, folder, manifest, device, config.threads)
        t_loaded = time.perf_counter_ns()
        # torch.compile() has imported dynamo by now, so reading its counters costs the others nothing
        hits, misses = _inductor_cache_counts() if rt.name == "torch.compile" else (0, 0)
        t1 = time.perf_counter_ns()
        predictor(data.batch(1))
        predictor.sync()
        t2 = time.perf_counter_ns()
        if device.startswith("cuda"):
            sync = predictor.sync
        accuracy = _accuracy(predictor, data)
    except (RuntimeUnavailable, ImportError) as exc:
        progress(f"{rt.name} ({device}): skipped: {_first_line(exc)}")
        return [_row(rt, device, None, "skipped", _first_line(exc), **common)]
    except MnistDeployError as exc:
        progress(f"{rt.name} ({device}): failed: {exc}")
        return [_row(rt, device, None, "failed", str(exc), **common)]
    except Exception as exc:  # any runtime error becomes a failed row; the other runtimes go on
        progress(f"{rt.name} ({device}): failed: {type(exc).__name__}: {_first_line(exc)}")
        return [_row(rt, device, None, "failed", f"{type(exc).__name__}: {_first_line(exc)}", **common)]
    common.update(accuracy=accuracy, load_ms=(t_loaded - t0) / 1e6, first_call_ms=(t2 - t1) / 1e6,
                  cold_start_ms=(t_loaded - t0 + t2 - t1) / 1e6)
    note = ""
    if rt.name == "torch.compile":
        h2, m2 = _inductor_cache_counts()
        cache = "hit" if h2 > hits and m2 == misses else "miss" if m2 > misses else "unknown"
        note = f"cold start includes compilation (inductor cache {cache})"
    progress(f"{rt.name} ({device}): cold start {common['cold_start_ms']:.1f} ms, accuracy {100 * accuracy:.2f}%")
    rows = []
    for bs in config.batch_sizes:
        try:
            prepared = predictor.prepare(data.batch(bs))
            times = time_calls(predictor.run, prepared, warmup=config.warmup, min_time=config.min_time,
                               min_calls=config.min_calls, sync=sync)
            del prepared
        except Exception as exc:  # e.g. out of memory at one batch size: that row fails, the rest go on
            msg = str(exc) if isinstance(exc, MnistDeployError) else f"{type(exc).__name__}: {_first_line(exc)}"
            progress(f"{rt.name} ({device}) batch {bs}: failed: {msg}")
            rows.append(_row(rt, device, bs, "failed", msg, **common))
            continue
        stats = latency_stats(times, bs, flops)
        pct = 100 * stats["gflops"] / peak if peak and "int8" not in rt.name else None
        rows.append(_row(rt, device, bs, "ok", note, **common, **stats, pct_peak=pct))
        progress(f"{rt.name} ({device}) batch {bs}: p50 {format_ms(stats['p50_ms'])} ms, "
                 f"{stats['throughput_per_s']:,.0f} images/s, {stats['n_calls']} calls")
    del predictor
    gc.collect()
    return rows


# ---------------------------------------------------------------------------------------------
# The stage.


def run_bench(*, artifacts="artifacts", runtimes: str | Sequence[str] | None = None,
              batch_sizes: str | Sequence[int] | None = None, device: str = "all", threads: int | None = None,
              warmup: int = 10, min_time: float = 1.0, min_calls: int = 20, peak_sizes: Sequence[int] | None = None,
              data_dir=None, cache_dir=None, allow_download: bool = True,
              progress: Callable[[str], None] | None = None) -> dict:
    """Benchmark ``runtimes`` x devices x ``batch_sizes`` on the artifacts in ``artifacts``.

    Returns a dict with ``records`` (one per row, keys :data:`bench_report.RECORD_KEYS`),
    ``environment``, ``peak`` (per device), ``model``, ``settings`` and ``verdict``;
    :func:`bench_report.write_outputs` writes it.
    Every input is checked, and every artifact's sha256 verified, before the first timed call.
    """
    names, explicit = parse_runtimes(runtimes)
    config = BenchConfig(artifacts=str(artifacts), runtimes=names, explicit_runtimes=explicit,
                         batch_sizes=parse_batch_sizes(batch_sizes), device=device,
                         threads=default_threads() if threads is None else threads, warmup=warmup,
                         min_time=min_time, min_calls=min_calls)
    config.validate()
    plan = plan_devices(device)
    folder = Path(artifacts)
    manifest = load_manifest(folder)
    skip = check_artifacts(folder, manifest, names, explicit)
    data = _load_data(manifest, data_dir, cache_dir, allow_download)
    progress = progress or (lambda _msg: None)

    import torch

    from .models import flops_per_example

    flops = flops_per_example(_eager_model(folder, manifest), tuple(manifest["model"]["input_shape"]))
    table = runtime_table()
    previous_threads = torch.get_num_threads()
    load_before, cpu_before = _loadavg(), _cpu_snapshot()
    torch.set_num_threads(config.threads)
    records: list[dict] = []
    peaks: dict[str, dict] = {}
    try:
        for dev, dev_reason in plan:
            if dev_reason is None:
                progress(f"measuring the fp32 matmul peak on {dev} ({config.threads} threads)")
                try:
                    peaks[dev] = measure_peak(dev, config.threads, sizes=peak_sizes)
                except Exception as exc:  # no reference is no % of peak, not a lost run
                    peaks[dev] = {"gflops": None, "error": f"{type(exc).__name__}: {_first_line(exc)}"}
            for name in names:
                rt = table[name]
                reason = dev_reason or skip.get(name) or unavailable_reason(name, dev)
                if reason:
                    progress(f"{name} ({dev}): skipped: {reason}")
                    records.append(_row(rt, dev, None, "skipped", reason, threads=config.threads))
                    continue
                records += _bench_runtime(rt, dev, folder=folder, manifest=manifest, config=config, data=data,
                                          flops=flops, peak=peaks[dev]["gflops"],
                                          size_bytes=_size(manifest, rt.format), progress=progress)
    finally:
        torch.set_num_threads(previous_threads)
    environment = collect_environment(config.threads, [d for d, r in plan if r is None])
    environment["load_average_before"], environment["load_average_after"] = load_before, _loadavg()
    environment["other_processes_cpu_percent"] = other_cpu_percent(cpu_before, _cpu_snapshot())
    result = {
        "schema": 1,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
        "environment": environment,
        "model": {"name": manifest["model"]["name"], "input_shape": manifest["model"]["input_shape"],
                  "flops_per_example": flops,
                  "state_dict_sha256": manifest["artifacts"]["state_dict"].get("sha256"),
                  "test_images": len(data.labels)},
        "peak": peaks,
        "records": sort_records(records),
        "warnings": _warnings(environment, config.threads),
    }
    result["verdict"] = verdict(result)
    return result


def _load_data(manifest: dict, data_dir, cache_dir, allow_download: bool) -> _Data:
    from .data import load_splits

    splits, _ = load_splits(data_dir, cache_dir=cache_dir, allow_download=allow_download)
    test = splits["test"]
    shape = tuple(manifest["model"]["input_shape"])
    images = np.ascontiguousarray(test.images.numpy().reshape((-1, *shape)), dtype=np.float32)
    return _Data(images, test.labels.numpy().astype(np.int64))


def _size(manifest: dict, key: str) -> int | None:
    entry = manifest.get("artifacts", {}).get(key) or {}
    return entry.get("size_bytes")


def sort_records(records: list[dict]) -> list[dict]:
    """Measured rows by device, batch size, then fastest p50 first; skipped and failed rows last."""
    order = runtime_names()

    def key(r):
        dev = 0 if r["device"] == "cpu" else 1
        if r["status"] == "ok":
            return (0, dev, r["batch_size"], r["p50_ms"], "")
        return (1, dev, r["batch_size"] or 0, 0.0, order.index(r["runtime"]) if r["runtime"] in order else 99)

    return sorted(records, key=key)


def _cpu_snapshot() -> tuple[float, float, float] | None:
    """(busy CPU seconds of the whole machine, CPU seconds of this process, wall seconds), Linux only."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / tick  # minus idle and iowait
    own = os.times()
    return busy, own.user + own.system + own.children_user + own.children_system + _descendants_cpu(tick), \
        time.monotonic()


def _descendants_cpu(tick: int) -> float:
    """CPU seconds of this process's live descendants (torch.compile's compile workers, for one)."""
    parent, cpu = {}, {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue  # it exited meanwhile
            parent[int(entry.name)] = int(fields[1])
            cpu[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    mine, total = {os.getpid()}, 0.0
    for pid in sorted(parent):  # children have larger pids, except after pid wrap-around: a rare miss
        if parent[pid] in mine:
            mine.add(pid)
            total += cpu[pid]
    return total


def other_cpu_percent(before, after) -> float | None:
    """How much of the machine's CPU other processes used between two snapshots (0-100)."""
    if before is None or after is None or after[2] <= before[2]:
        return None
    others = (after[0] - before[0]) - (after[1] - before[1])
    return round(max(0.0, 100 * others / ((after[2] - before[2]) * (os.cpu_count() or 1))), 1)


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _warnings(env: dict, threads: int) -> list[str]:
    out = []
    other = env.get("other_processes_cpu_percent")
    if other is not None and other > 5:
        out.append(f"other processes used {other:.0f}% of the machine's CPU during the run: "
                   "the figures are disturbed; rerun on a quiet machine")
    if env.get("cores") and threads > env["cores"]:
        out.append(f"{threads} threads on {env['cores']} cores: oversubscribed")
    return out


def collect_environment(threads: int, devices: Sequence[str] = ("cpu",)) -> dict:
    """CPU model, cores, threads, OS, Python, library versions, execution providers, GPU, git commit."""
    import importlib.metadata as md

    import torch

    from .devices import cpu_model, device_name

    env = {
        "cpu": cpu_model(), "cores": os.cpu_count(), "cores_usable": default_threads(), "threads": threads,
        "os": platform.platform(), "python": platform.python_version(), "mnist_deploy": __version__,
    }
    for pkg in ("torch", "numpy", "onnx", "onnxruntime", "onnxscript"):
        try:
            env[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env[pkg] = None
    env["torch_cpu_capability"] = _safe(lambda: torch.backends.cpu.get_cpu_capability())
    env["torch_parallel"] = _safe(lambda: torch.__config__.parallel_info().splitlines()[-1].split(":")[-1].strip())
    env["execution_providers"] = _safe(lambda: __import__("onnxruntime").get_available_providers())
    gpus = [d for d in devices if d.startswith("cuda")]
    env["gpu"] = _safe(lambda: device_name(torch.device(gpus[0]))) if gpus else None
    env["cuda"] = torch.version.cuda
    env.update(_git())
    return env


def _safe(fn):
    try:
        return fn()
    except Exception:  # an optional fact we could not read is recorded as null
        return None


def _git() -> dict:
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit or None, "git_dirty": bool(dirty)}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


__all__ = [
    "BenchConfig", "BenchRuntime", "DEFAULT_BATCH_SIZES", "DEVICE_CHOICES", "check_artifacts",
    "collect_environment", "default_threads", "latency_stats", "load_runtime", "measure_peak",
    "parse_batch_sizes", "parse_runtimes", "plan_devices", "run_bench", "runtime_names", "runtime_table",
    "sort_records", "time_calls", "unavailable_reason",
]
