"""bench.report: the verdict, tables, CSV and files from a result dict (measures nothing, so a hand-made
result is a fair input)."""

from __future__ import annotations

import csv
import io
import json

import pytest

from mnist_deploy.bench.report import (
    COLUMNS,
    OUTPUT_NAMES,
    RECORD_KEYS,
    best_rows,
    format_csv,
    format_markdown,
    format_ms,
    format_table,
    table_rows,
    verdict,
    write_outputs,
)


def _row(runtime, batch, p50, status="ok", reason="", device="cpu", **kw):
    r = dict.fromkeys(RECORD_KEYS)
    r.update(runtime=runtime, format=runtime, device=device, batch_size=batch, status=status, reason=reason)
    if status == "ok":
        r.update(p50_ms=p50, p90_ms=p50 * 1.1, p99_ms=p50 * 1.5, mean_ms=p50, min_ms=p50 * 0.9, max_ms=p50 * 2,
                 std_ms=0.01, n_calls=20, throughput_per_s=batch / p50 * 1e3, gflops=batch / p50 * 0.2,
                 pct_peak=10.0, accuracy=0.98, size_bytes=400_000, cold_start_ms=12.0)
    r.update(kw)
    return r


def _result(records):
    return {
        "records": records, "peak": {"cpu": {"gflops": 100.0, "method": "torch.mm (MKL)", "n": 1024}},
        "settings": {"runtimes": ["pytorch", "onnxruntime", "openvino"], "warmup": 1, "min_time": 0.1},
        "environment": {"cpu": "Test CPU", "cores": 2, "threads": 2, "torch": "2.13", "gpu": None,
                        "packages": ["numpy", "torch", "onnxruntime"], "onnxruntime": "1.23"},
        "model": {"name": "mlp", "flops_per_example": 218_000, "test_images": 10_000},
        "warnings": ["other processes used 40% of the machine's CPU"],
    }


RECORDS = [
    _row("pytorch", 1, 0.05), _row("onnxruntime", 1, 0.02), _row("pytorch", 256, 1.0),
    _row("onnxruntime", 256, 0.8, accuracy=0.97),
    _row("openvino", None, None, status="skipped", reason="openvino is not installed"),
]


def test_format_ms():
    assert format_ms(None) == "-" and format_ms(0.012345) == "0.0123" and format_ms(150.4) == "150"


def test_best_rows_are_the_lowest_p50_per_device_and_batch():
    best = best_rows(RECORDS)
    assert {k: r["runtime"] for k, r in best.items()} == {("cpu", 1): "onnxruntime", ("cpu", 256): "onnxruntime"}


def test_verdict_names_the_fastest_and_the_accuracy_lost():
    text = verdict(_result(RECORDS))
    assert "the fastest at batch 1 is onnxruntime (p50 0.02 ms, 0.40x PyTorch eager's 0.05 ms)" in text
    assert "At batch 256 the fastest is onnxruntime" in text
    assert "onnxruntime 97.00% (-1.00 pp)" in text
    assert "Skipped on cpu: openvino (openvino is not installed)." in text


def test_nothing_measured():
    text = verdict(_result([_row("openvino", None, None, status="failed", reason="boom")]))
    assert text.startswith("Nothing was measured.") and "Failed on cpu" in text


def test_table_marks_the_best_rows_and_dashes_the_unmeasured():
    rows = table_rows(RECORDS)
    assert [r[0] for r in rows] == ["pytorch", "onnxruntime *", "pytorch", "onnxruntime *", "openvino"]
    assert rows[-1][2] == "-" and rows[-1][3] == "-" and rows[-1][-1] == "skipped"
    result = _result(RECORDS)
    result["verdict"] = verdict(result)
    table = format_table(result)
    assert all(c in table for c in COLUMNS) and "warning: other processes used 40%" in table
    assert "skipped on cpu: openvino: openvino is not installed" in table
    md = format_markdown(result)
    assert "| onnxruntime **best** |" in md and "> warning:" in md


def test_csv_has_every_record_key_in_order():
    result = _result(RECORDS)
    rows = list(csv.DictReader(io.StringIO(format_csv(result))))
    assert len(rows) == len(RECORDS) and list(rows[0]) == list(RECORD_KEYS)
    assert rows[1]["runtime"] == "onnxruntime" and float(rows[1]["p50_ms"]) == pytest.approx(0.02)


def test_write_outputs_writes_every_file(tmp_path):
    result = _result(RECORDS)
    result["verdict"] = verdict(result)
    paths = write_outputs(result, tmp_path / "out")
    assert sorted(paths) == sorted(OUTPUT_NAMES) and all(p.is_file() and p.stat().st_size for p in paths.values())
    assert json.loads(paths["bench.json"].read_text())["records"][0]["runtime"] == "pytorch"
    assert paths["bench.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list((tmp_path / "out").glob("*.tmp*"))
