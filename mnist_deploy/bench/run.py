"""Benchmark every runtime in the registry on every device: latency percentiles, throughput, GFLOP/s
against a measured matmul peak, cold start, artifact size and test accuracy, with the environment.

One row per runtime x device x batch size. Timing (:mod:`.timing`) is ``time.perf_counter_ns()``
around the runtime call alone (``Predictor.run``, plus ``sync`` on CUDA), on inputs prepared
beforehand, after warm-up calls, repeated until ``min_time`` has passed and at least ``min_calls``
calls were made. Runtimes are measured one after another and released in between, so no two thread
pools compete. The matmul peak is measured before and after the rows and the highest kept.

A runtime or device that is not available is a row with status ``skipped`` and the reason; one that
raises is a row with status ``failed`` and the error, and the others go on. Bad input (names, batch
sizes, a missing or tampered artifact) raises before anything is timed.

The result is a plain dict; :mod:`.report` turns it into the verdict, the tables and the files.
"""

from __future__ import annotations

import datetime as _dt
import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np

from ..artifacts.manifest import load_manifest, manifest_path, verified_path
from ..errors import ManifestError, MnistDeployError, RuntimeUnavailable, first_line
from ..formats import FORMATS, Format, entry_problem, open_artifact
from .config import (  # the input checks, re-exported as the bench API
    BENCH_DEVICES,
    DEFAULT_BATCH_SIZES,
    BenchConfig,
    by_runtime,
    parse_batch_sizes,
    parse_runtimes,
    plan_devices,
    runtime_names,
    unavailable_reason,
)
from .env import collect_environment, cpu_snapshot, default_threads, loadavg, other_cpu_percent, run_warnings
from .report import RECORD_KEYS, format_ms, verdict
from .timing import best_peak, latency_stats, measure_peak, time_calls

ACCURACY_CHUNK = 1000
PEAK_OVER_100 = "measured above the matmul peak: a measurement warning (the peak was understated or the row disturbed)"


def check_artifacts(folder: Path, manifest: dict, names: Sequence[str], explicit: bool) -> dict[str, str]:
    """Verify every artifact the run will load before any timing; return {runtime: skip reason}.

    A tampered or missing file is an error whichever way the runtime was chosen. A format whose
    export failed is an error when named, a skipped row under ``all`` with the error export recorded.
    One never exported is a skipped row with the availability check's reason when it cannot run here
    (export skipped it for that reason; running export again would not help), else an error when
    named and a skipped row under ``all``.
    """
    skip = {}
    entries = manifest.get("artifacts", {})
    verified_path(folder, "state_dict", manifest)
    for name in names:
        fmt = by_runtime(name)
        key = fmt.key
        if key == "state_dict":
            continue
        entry = entries.get(key)
        if entry is None and (cannot := fmt.unavailable("cpu")):  # export runs on CPU: why it skipped it
            skip[name] = f"not exported: {cannot}"
            continue
        why = entry_problem(entry)  # formats decides what a usable entry is, for every stage
        if why is not None:
            advice = "; run mnist-deploy export" if entry is None else ""
            if explicit:
                raise ManifestError(f"{manifest_path(folder)}: '{key}' (runtime {name}) {why}; "
                                    f"run `mnist-deploy export --artifacts {folder} --format {key}` first")
            skip[name] = f"artifact '{key}' {why}{advice}"
            continue
        verified_path(folder, key, manifest)
    return skip


# ---------------------------------------------------------------------------------------------
# Loading and measuring one runtime.


def load_runtime(name: str, folder: Path, manifest: dict, device: str, threads: int | None):
    """Load runtime ``name`` as a :class:`formats.Predictor` on ``device`` (sha256-checked first)."""
    return open_artifact(manifest, by_runtime(name).name, folder, device=device, threads=threads)


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


def _row(fmt: Format, device: str, batch_size: int | None, status: str, reason: str = "", **values) -> dict:
    row = dict.fromkeys(RECORD_KEYS)
    variant_of = FORMATS[fmt.variant_of].runtime if fmt.variant_of in FORMATS else None
    row.update(runtime=fmt.runtime, format=fmt.name, device=device, batch_size=batch_size, status=status,
               reason=reason, variant_of=variant_of)
    row.update(values)
    return row


def _bench_runtime(fmt: Format, device: str, *, folder: Path, manifest: dict, config: BenchConfig,
                   data: _Data, flops: int, size_bytes: int | None, progress: Callable[[str], None]) -> list[dict]:
    common = {"size_bytes": size_bytes, "threads": config.threads}
    sync = None
    try:
        t0 = time.perf_counter_ns()
        predictor = load_runtime(fmt.runtime, folder, manifest, device, config.threads)
        t_loaded = time.perf_counter_ns()
        cold_start = fmt.cold_start() if fmt.cold_start is not None else None  # the entry says what to note
        t1 = time.perf_counter_ns()
        predictor(data.batch(1))
        predictor.sync()
        t2 = time.perf_counter_ns()
        if device.startswith("cuda"):
            sync = predictor.sync
        accuracy = _accuracy(predictor, data)
    except (RuntimeUnavailable, ImportError) as exc:
        progress(f"{fmt.runtime} ({device}): skipped: {first_line(exc)}")
        return [_row(fmt, device, None, "skipped", first_line(exc), **common)]
    except MnistDeployError as exc:
        progress(f"{fmt.runtime} ({device}): failed: {exc}")
        return [_row(fmt, device, None, "failed", str(exc), **common)]
    except Exception as exc:  # any runtime error becomes a failed row; the other runtimes go on
        progress(f"{fmt.runtime} ({device}): failed: {type(exc).__name__}: {first_line(exc)}")
        return [_row(fmt, device, None, "failed", f"{type(exc).__name__}: {first_line(exc)}", **common)]
    details = dict(getattr(predictor, "details", {}) or {})
    common.update(accuracy=accuracy, load_ms=(t_loaded - t0) / 1e6, first_call_ms=(t2 - t1) / 1e6,
                  cold_start_ms=(t_loaded - t0 + t2 - t1) / 1e6, precision=details.get("precision"),
                  performance_mode=details.get("performance_mode"), shapes=details.get("shapes"))
    note = "; ".join(n for n in (cold_start() if cold_start is not None else "", details.get("note")) if n)
    progress(f"{fmt.runtime} ({device}): cold start {common['cold_start_ms']:.1f} ms, accuracy {100 * accuracy:.2f}%")
    rows = []
    for bs in config.batch_sizes:
        try:
            prepared = predictor.prepare(data.batch(bs))
            timer = predictor.time_calls or partial(time_calls, predictor.run)  # a runtime may time itself
            times = timer(prepared, warmup=config.warmup, min_time=config.min_time, min_calls=config.min_calls,
                          sync=sync)
            del prepared
        except Exception as exc:  # e.g. out of memory at one batch size: that row fails, the rest go on
            msg = str(exc) if isinstance(exc, MnistDeployError) else f"{type(exc).__name__}: {first_line(exc)}"
            progress(f"{fmt.runtime} ({device}) batch {bs}: failed: {msg}")
            rows.append(_row(fmt, device, bs, "failed", msg, **common))
            continue
        stats = latency_stats(times, bs, flops)
        rows.append(_row(fmt, device, bs, "ok", note, **common, **stats))
        progress(f"{fmt.runtime} ({device}) batch {bs}: p50 {format_ms(stats['p50_ms'])} ms, "
                 f"{stats['throughput_per_s']:,.0f} images/s, {stats['n_calls']} calls")
    del predictor
    gc.collect()
    return rows


def _apply_peaks(records: list[dict], peaks: dict[str, dict]) -> list[str]:
    """Fill ``pct_peak`` from each device's final (highest) peak; warn about rows above 100%."""
    warnings = []
    for r in records:
        fmt = FORMATS.get(r["format"])
        peak = (peaks.get(r["device"]) or {}).get("gflops")
        if r["status"] != "ok" or not peak or fmt is None or not fmt.roofline:
            continue
        r["pct_peak"] = 100 * r["gflops"] / peak
        if r["pct_peak"] > 100:
            r["reason"] = "; ".join(x for x in (r["reason"], PEAK_OVER_100) if x)
            warnings.append(f"{r['runtime']} ({r['device']}, batch {r['batch_size']}) ran at {r['pct_peak']:.0f}% "
                            "of the measured matmul peak: a measurement warning, rerun on a quiet machine")
    return warnings


def _peak(dev: str, config: BenchConfig, peak_sizes, progress, when: str) -> dict:
    progress(f"measuring the fp32 matmul peak on {dev} ({config.threads} threads, {when} the rows)")
    try:
        return measure_peak(dev, config.threads, sizes=peak_sizes)
    except Exception as exc:  # no reference is no % of peak, not a lost run
        return {"gflops": None, "error": f"{type(exc).__name__}: {first_line(exc)}"}


# ---------------------------------------------------------------------------------------------
# The stage.


def run_bench(*, artifacts="artifacts", runtimes: str | Sequence[str] | None = None,
              batch_sizes: str | Sequence[int] | None = None, device: str = BenchConfig.device,
              threads: int | None = None, warmup: int = BenchConfig.warmup, min_time: float = BenchConfig.min_time,
              min_calls: int = BenchConfig.min_calls, peak_sizes: Sequence[int] | None = None,
              data_dir=None, cache_dir=None, allow_download: bool = True,
              progress: Callable[[str], None] | None = None) -> dict:
    """Benchmark ``runtimes`` x devices x ``batch_sizes`` on the artifacts in ``artifacts``.

    Returns a dict with ``records`` (one per row, keys :data:`.report.RECORD_KEYS`),
    ``environment``, ``peak`` (per device), ``model``, ``settings`` and ``verdict``;
    :func:`.report.write_outputs` writes it.
    Every input is checked, and every artifact's sha256 verified, before the first timed call.
    """
    names, explicit = parse_runtimes(runtimes)
    config = BenchConfig(artifacts=str(artifacts), runtimes=names, explicit_runtimes=explicit,
                         batch_sizes=parse_batch_sizes(batch_sizes), device=device,
                         threads=default_threads() if threads is None else threads, warmup=warmup,
                         min_time=min_time, min_calls=min_calls)
    config.validate()
    folder = Path(artifacts)
    manifest = load_manifest(folder)  # before plan_devices: a wrong folder is refused before torch is imported
    plan = plan_devices(device)
    skip = check_artifacts(folder, manifest, names, explicit)
    data = _load_data(manifest, data_dir, cache_dir, allow_download)
    progress = progress or (lambda _msg: None)

    import torch

    from ..formats import model_from_state_dict
    from ..models import flops_per_example

    model = model_from_state_dict(manifest, verified_path(folder, "state_dict", manifest))
    flops = flops_per_example(model, tuple(manifest["model"]["input_shape"]))
    previous_threads = torch.get_num_threads()
    load_before, cpu_before = loadavg(), cpu_snapshot()
    torch.set_num_threads(config.threads)
    try:
        records, peaks = _measure(plan, names, skip, folder=folder, manifest=manifest, config=config, data=data,
                                  flops=flops, peak_sizes=peak_sizes, progress=progress)
    finally:
        torch.set_num_threads(previous_threads)
    environment = collect_environment(config.threads, [d for d, r in plan if r is None])
    environment["load_average_before"], environment["load_average_after"] = load_before, loadavg()
    environment["other_processes_cpu_percent"] = other_cpu_percent(cpu_before, cpu_snapshot())
    peak_warnings = _apply_peaks(records, peaks)
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
        "warnings": run_warnings(environment, config.threads) + peak_warnings,
    }
    result["verdict"] = verdict(result)
    return result


def _measure(plan, names, skip: dict[str, str], *, folder: Path, manifest: dict, config: BenchConfig, data: _Data,
             flops: int, peak_sizes, progress: Callable[[str], None]) -> tuple[list[dict], dict[str, dict]]:
    """Every runtime on every planned device, between two matmul-peak measurements per device."""
    records: list[dict] = []
    peaks: dict[str, dict] = {}
    for dev, dev_reason in plan:
        first = _peak(dev, config, peak_sizes, progress, "before") if dev_reason is None else None
        if dev_reason:  # one line for the device, not one per runtime (bench.json keeps a row each)
            progress(f"{dev}: skipped every runtime: {dev_reason}")
        for name in names:
            fmt = by_runtime(name)
            reason = dev_reason or fmt.unavailable(dev) or skip.get(name)
            if reason:
                if not dev_reason:
                    progress(f"{name} ({dev}): skipped: {reason}")
                records.append(_row(fmt, dev, None, "skipped", reason, threads=config.threads))
                continue
            records += _bench_runtime(fmt, dev, folder=folder, manifest=manifest, config=config, data=data,
                                      flops=flops, size_bytes=_size(manifest, fmt.key), progress=progress)
        if dev_reason is None:
            peaks[dev] = best_peak(first, _peak(dev, config, peak_sizes, progress, "after"))
    return records, peaks


def _load_data(manifest: dict, data_dir, cache_dir, allow_download: bool) -> _Data:
    from ..data.mnist import load_splits

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




__all__ = [
    "BENCH_DEVICES", "BenchConfig", "DEFAULT_BATCH_SIZES", "best_peak", "check_artifacts", "collect_environment",
    "default_threads", "latency_stats", "load_runtime", "measure_peak", "parse_batch_sizes", "parse_runtimes",
    "plan_devices", "run_bench", "runtime_names", "sort_records", "time_calls", "unavailable_reason",
]
