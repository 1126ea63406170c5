"""Report a bench run: the verdict paragraph, the terminal and Markdown tables, the CSV, and the files.

Everything here reads the plain result dict that :func:`bench.run_bench` returns (its ``records``
carry the keys :data:`RECORD_KEYS`) and measures nothing, so a saved bench.json can be re-reported.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from ..artifacts.files import atomic_path, atomic_write_json, atomic_write_text, size_text

OUTPUT_NAMES = ("bench.json", "bench.csv", "bench.md", "bench.png")
RECORD_KEYS = (
    "runtime", "format", "device", "batch_size", "status", "reason",
    "p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "max_ms", "std_ms", "n_calls",
    "throughput_per_s", "gflops", "pct_peak", "accuracy", "size_bytes", "cold_start_ms", "load_ms",
    "first_call_ms", "threads", "precision", "performance_mode", "variant_of", "shapes",
)
COLUMNS = ("runtime", "device", "batch", "p50 ms", "p90 ms", "p99 ms", "mean ms", "min ms", "images/s",
           "GFLOP/s", "% peak", "accuracy", "size", "cold start ms", "status")


def format_ms(v: float | None) -> str:
    """A duration in ms as a table cell or progress figure: 3 significant digits, ``-`` for none."""
    if v is None:
        return "-"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _rate(v: float) -> str:
    return f"{v / 1e6:.2f} M" if v >= 1e6 else f"{v / 1e3:.1f} k" if v >= 1e3 else f"{v:.0f}"  # no unit: callers add it


def best_rows(records: Sequence[dict]) -> dict[tuple[str, int], dict]:
    """The lowest-p50 measured row per (device, batch size)."""
    best: dict[tuple[str, int], dict] = {}
    for r in records:
        if r["status"] == "ok":
            k = (r["device"], r["batch_size"])
            if k not in best or r["p50_ms"] < best[k]["p50_ms"]:
                best[k] = r
    return best


def verdict(result: dict) -> str:
    """One paragraph: fastest at batch 1, fastest at the largest batch, INT8's gain, accuracy loss."""
    records = result["records"]
    env = result["environment"]
    parts = []
    best = best_rows(records)
    for dev in dict.fromkeys(r["device"] for r in records if r["status"] == "ok"):
        ok = [r for r in records if r["status"] == "ok" and r["device"] == dev]
        sizes = sorted({r["batch_size"] for r in ok})
        where = env.get("gpu") if dev.startswith("cuda") else env.get("cpu")
        head = f"On {dev} ({where}, {env.get('threads')} threads)"
        small, large = best[(dev, sizes[0])], best[(dev, sizes[-1])]
        eager = next((r for r in ok if r["runtime"] == "pytorch" and r["batch_size"] == sizes[0]), None)
        vs = (f", {small['p50_ms'] / eager['p50_ms']:.2f}x PyTorch eager's {format_ms(eager['p50_ms'])} ms"
              if eager and small is not eager else "")
        parts.append(f"{head} the fastest at batch {sizes[0]} is {small['runtime']} "
                     f"(p50 {format_ms(small['p50_ms'])} ms{vs}).")
        if len(sizes) > 1:
            peak = result["peak"].get(dev, {}).get("gflops")
            pct = f", {large['pct_peak']:.0f}% of the measured {peak:.0f} GFLOP/s fp32 matmul peak" if (
                large.get("pct_peak") is not None and peak) else ""
            parts.append(f"At batch {sizes[-1]} the fastest is {large['runtime']}: "
                         f"{_rate(large['throughput_per_s'])} images/s, {large['gflops']:.0f} GFLOP/s{pct}.")
        for low in (r for r in ok if r.get("variant_of") and r["batch_size"] == sizes[-1]):
            fp32 = next((r for r in ok if r["runtime"] == low["variant_of"] and r["batch_size"] == sizes[-1]), None)
            if fp32 is None:
                continue
            of_peak = f", {fp32['pct_peak']:.0f}% of the matmul peak" if fp32.get("pct_peak") is not None else ""
            parts.append(f"{low['runtime']} ({(low.get('precision') or 'reduced precision').upper()}) runs "
                         f"{low['throughput_per_s'] / fp32['throughput_per_s']:.2f}x {fp32['runtime']}'s fp32 "
                         f"throughput at batch {sizes[-1]} ({fp32['runtime']}: {fp32['gflops']:.0f} GFLOP/s{of_peak}), "
                         f"at {100 * low['accuracy']:.2f}% accuracy against fp32's {100 * fp32['accuracy']:.2f}%.")
        ref = next((r["accuracy"] for r in ok if r["runtime"] == "pytorch"), None)
        if ref is not None:
            accs = {r["runtime"]: r["accuracy"] for r in ok}
            n = result["model"]["test_images"]
            lost = {k: v for k, v in accs.items() if round((ref - v) * n) != 0}
            if not lost:
                parts.append(f"Accuracy: every runtime matches eager's {100 * ref:.2f}% on the {n:,} test images.")
            else:
                diffs = ", ".join(f"{k} {100 * v:.2f}% ({100 * (v - ref):+.2f} pp)" for k, v in lost.items())
                parts.append(f"Accuracy against eager's {100 * ref:.2f}%: {diffs}; the rest match.")
    for status, dev, reason, who in _problem_groups(records):
        every = len(who) == len(result["settings"]["runtimes"]) and all(" batch " not in w for w in who)
        parts.append(f"{status.capitalize()} on {dev}: {'every runtime' if every else ', '.join(who)} ({reason}).")
    if not any(r["status"] == "ok" for r in records):
        parts.insert(0, "Nothing was measured.")
    return " ".join(parts)



def table_rows(records: Sequence[dict]) -> list[list[str]]:
    """The table's cells, best p50 per device and batch size marked with ``*``.

    Runtimes skipped or failed on one device for one and the same reason (every runtime on CUDA when
    there is no GPU) are one row, ``every runtime`` or ``N runtimes``; the notes name them and the reason.
    """
    best = {id(r) for r in best_rows(records).values()}
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["status"] != "ok" and r["batch_size"] is None:
            groups.setdefault((r["status"], r["device"], r["reason"]), []).append(r)
    shown: set[tuple] = set()
    rows = []
    for r in records:
        ok = r["status"] == "ok"
        group = groups.get((r["status"], r["device"], r["reason"]), []) if not ok else []
        if len(group) > 1:
            key = (r["status"], r["device"], r["reason"])
            if key in shown:
                continue
            shown.add(key)
            every = len(group) == sum(x["device"] == r["device"] for x in records)
            name = "every runtime" if every else f"{len(group)} runtimes"
            rows.append([name, r["device"], "-", *["-"] * 11, r["status"]])
            continue
        rows.append([
            r["runtime"] + (" *" if id(r) in best else ""), r["device"],
            str(r["batch_size"]) if r["batch_size"] else "-",
            *(format_ms(r[k]) if ok else "-" for k in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms")),
            _rate(r["throughput_per_s"]) if ok else "-",
            f"{r['gflops']:.1f}" if ok else "-",
            f"{r['pct_peak']:.0f}%" if ok and r["pct_peak"] is not None else "-",
            f"{100 * r['accuracy']:.2f}%" if r["accuracy"] is not None else "-",
            size_text(r["size_bytes"]),
            f"{r['cold_start_ms']:.0f}" if r["cold_start_ms"] is not None else "-",
            r["status"],
        ])
    return rows


def _problem_groups(records: Sequence[dict]) -> list[tuple[str, str, str, list[str]]]:
    """Skipped and failed rows grouped by (status, device, reason): one line per distinct reason."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for r in records:
        if r["status"] != "ok":
            who = r["runtime"] + (f" batch {r['batch_size']}" if r["batch_size"] else "")
            groups.setdefault((r["status"], r["device"], r["reason"]), []).append(who)
    return [(status, dev, reason, who) for (status, dev, reason), who in groups.items()]


def _notes(result: dict) -> list[str]:
    notes = [f"{status} on {dev}: {', '.join(who)}: {reason}"
             for status, dev, reason, who in _problem_groups(result["records"])]
    for r in result["records"]:
        if r["status"] == "ok" and r["reason"]:
            note = f"{r['runtime']} ({r['device']}): {r['reason']}"
            if note not in notes:
                notes.append(note)
    return notes


def _caption(result: dict, marker: str = "*") -> str:
    env, model = result["environment"], result["model"]
    peaks = "; ".join(f"{dev} fp32 matmul peak {p['gflops']:.0f} GFLOP/s ({p['method']}, {p['n']}x{p['n']})"
                      if p.get("gflops") else f"{dev} matmul peak not measured ({p.get('error')})"
                      for dev, p in result["peak"].items())
    s = result["settings"]
    int8 = (env.get("cpu_int8_path") or {}).get("path")
    return (f"{model['name']} ({model['flops_per_example']:,} FLOP/image) on {env['cpu']}"
            f"{f' (8-bit path {int8})' if int8 else ''}, {env['cores']} cores, "
            f"{env['threads']} threads{', GPU ' + env['gpu'] if env.get('gpu') else ''}; torch {env['torch']}, "
            f"{_versions(env)}; warm-up {s['warmup']} calls, min time {s['min_time']} s per row. "
            f"{peaks}. Latency is one call; images/s and GFLOP/s are total images over total timed time; "
            f"{marker} = lowest p50 for that device and batch size.")


def _versions(env: dict) -> str:
    skip = {"torch", "numpy", "python", "mnist_deploy"}
    names = [k for k in env.get("packages", []) if k not in skip and env.get(k)]
    return ", ".join(f"{k} {env[k]}" for k in names)


def format_table(result: dict) -> str:
    """The plain, aligned terminal table, its notes, and the verdict."""
    rows = table_rows(result["records"])
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(COLUMNS)]
    left = {0, 1, 14}

    def line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    out = [_caption(result), "", line(COLUMNS), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    notes = _notes(result)
    if notes:
        out += [""] + notes
    out += ["", result["verdict"]]
    out += [f"warning: {w}" for w in result.get("warnings", [])]
    return "\n".join(out).rstrip() + "\n"


def format_markdown(result: dict) -> str:
    """A Markdown table ready to paste, with the caption above and notes and verdict below."""
    rows = table_rows(result["records"])
    right = "|".join("---" if i in (0, 1, 14) else "---:" for i in range(len(COLUMNS)))
    out = [_caption(result, "**best**"), "", "| " + " | ".join(COLUMNS) + " |", "|" + right + "|"]
    out += ["| " + " | ".join(c.replace("*", "**best**") if i == 0 else c for i, c in enumerate(r)) + " |" for r in rows]
    notes = _notes(result)
    if notes:
        out += [""] + [f"- {n}" for n in notes]
    out += ["", result["verdict"]]
    out += [f"\n> warning: {w}" for w in result.get("warnings", [])]
    return "\n".join(out).rstrip() + "\n"


def format_csv(result: dict) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RECORD_KEYS, lineterminator="\n")
    writer.writeheader()
    for r in result["records"]:
        writer.writerow({k: r.get(k) for k in RECORD_KEYS})
    return buf.getvalue()


def write_outputs(result: dict, out: str | os.PathLike) -> dict[str, Path]:
    """Write bench.json, bench.csv, bench.md and bench.png into ``out`` (each atomically)."""
    from ..plots import bench_plot

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / name for name in OUTPUT_NAMES}
    atomic_write_json(paths["bench.json"], result)
    atomic_write_text(paths["bench.csv"], format_csv(result))
    atomic_write_text(paths["bench.md"], format_markdown(result))
    env = result["environment"]
    with atomic_path(paths["bench.png"]) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # matplotlib complains of an empty legend when nothing ran
        bench_plot(result["records"], tmp, f"{result['model']['name']} on {env['cpu']}, {env['threads']} threads")
    return paths


__all__ = [
    "COLUMNS", "OUTPUT_NAMES", "RECORD_KEYS", "best_rows", "format_csv", "format_markdown", "format_ms",
    "format_table", "table_rows", "verdict", "write_outputs",
]
