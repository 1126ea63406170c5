"""The parity gate: how far an artifact's logits are from the PyTorch model's, whether that passes,
which thresholds would have passed, and the table that reports it.

``compare_logits`` measures one run against the reference, ``judge`` turns the runs at every batch
size into a verdict with its reasons, and ``parity_check`` runs a loaded predictor at batch sizes 1
and 10,000 and does both. The export stage (:mod:`mnist_deploy.export`) calls it for every format
it writes and again in verify; nothing here writes files.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..artifacts.files import size_text
from ..errors import ExportError, MnistDeployError, first_line

PARITY_BATCH_SIZES = (1, 10_000)
_FIRST_DISAGREEMENTS = 10


# ---------------------------------------------------------------------------------------------
# Parity: numbers, verdict, and what would have passed.


def compare_logits(reference: np.ndarray, candidate: np.ndarray, labels: np.ndarray, *, atol: float | None = 0.0,
                   rtol: float = 0.0) -> dict:
    """Differences between two (N, 10) logit arrays and their top-1 predictions.

    Returns max/mean absolute and max relative difference, whether every element is within
    ``atol + rtol * |reference|`` (numpy's ``allclose`` rule), the smallest ``atol`` (with this
    ``rtol``) and ``rtol`` (with this ``atol``) that would hold, top-1 agreement, the candidate's
    accuracy and the indices of the first images whose predicted digit differs. With ``atol=None``
    (prediction-level parity, INT8) the tolerance fields are left out.
    """
    check_tolerance = atol is not None
    atol = atol or 0.0
    if candidate.shape != reference.shape:
        raise ExportError(f"output shape {tuple(candidate.shape)} is not the reference's {tuple(reference.shape)}")
    ref = reference.astype(np.float64)
    cand = candidate.astype(np.float64)
    finite = bool(np.isfinite(cand).all())
    diff = np.abs(cand - ref) if finite else np.full_like(ref, np.inf)
    absref = np.abs(ref)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.where(diff == 0, 0.0, diff / absref)
        need_rtol = np.where(diff <= atol, 0.0, (diff - atol) / absref)
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape)
    pred_ref = reference.argmax(axis=1)
    pred = candidate.argmax(axis=1) if finite else np.full_like(pred_ref, -1)
    agree = pred == pred_ref
    out = {
        "images": int(reference.shape[0]),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "max_rel_diff": float(rel.max()),
        "worst_element": {"image": int(worst[0]), "class": int(worst[1])},
    }
    if check_tolerance:
        out.update(within_tolerance=bool(np.all(diff <= atol + rtol * absref)),
                   atol_needed=float(max(0.0, float(np.max(diff - rtol * absref)))),
                   rtol_needed=float(np.max(need_rtol)))
    return {
        **out,
        "agreement": float(agree.mean()),
        "disagreements": int((~agree).sum()),
        "first_disagreements": [int(i) for i in np.flatnonzero(~agree)[:_FIRST_DISAGREEMENTS]],
        "accuracy": float((pred == labels).mean()),
        "finite": finite,
    }


def judge(runs: dict[str, dict], criteria: dict, reference_accuracy: float) -> tuple[bool, list[str], dict]:
    """Verdict for one format from its per-batch-size comparisons.

    Returns (passed, the reasons it failed, and for each criterion it failed the loosest threshold
    that would have passed: ``atol`` (at the given rtol) or alternatively ``rtol`` (at the given
    atol), ``min_agreement``, ``max_accuracy_drop``).
    """
    found: dict[str, list[str]] = {}  # reason -> batch sizes it happened at (usually both)
    logits = criteria["kind"] == "logits"
    for batch, r in runs.items():
        if not r["finite"]:
            found.setdefault("output has NaN or infinity", []).append(batch)
            continue
        if logits and not r["within_tolerance"]:
            w = r["worst_element"]
            text = (f"max abs diff {r['max_abs_diff']:.3g} (image {w['image']}, class {w['class']}) exceeds "
                    f"atol {criteria['atol']:g} + rtol {criteria['rtol']:g} x |PyTorch logit|")
            found.setdefault(text, []).append(batch)
        if r["agreement"] < criteria["min_agreement"]:
            first = ", ".join(str(i) for i in r["first_disagreements"])
            text = (f"top-1 agreement {100 * r['agreement']:.2f}% < {100 * criteria['min_agreement']:.2f}% "
                    f"({r['disagreements']} images predict another digit; first: {first})")
            found.setdefault(text, []).append(batch)
        drop = reference_accuracy - r["accuracy"]
        if not logits and drop > criteria["max_accuracy_drop"] + 1e-12:
            text = (f"accuracy {100 * r['accuracy']:.2f}% is {100 * drop:.2f} points below the fp32 model's "
                    f"{100 * reference_accuracy:.2f}% (allowed {100 * criteria['max_accuracy_drop']:.2f})")
            found.setdefault(text, []).append(batch)
    reasons = [f"batch size {' and '.join(batches)}: {text}" for text, batches in found.items()]
    would: dict[str, float] = {}
    if reasons and all(r["finite"] for r in runs.values()):
        if logits and not all(r["within_tolerance"] for r in runs.values()):
            would["atol"] = _ceil_sig(max(r["atol_needed"] for r in runs.values()))
            rtol = max(r["rtol_needed"] for r in runs.values())
            if np.isfinite(rtol):
                would["rtol"] = _ceil_sig(rtol)
        worst = min(r["agreement"] for r in runs.values())
        if worst < criteria["min_agreement"]:
            would["min_agreement"] = float(np.floor(worst * 1e4) / 1e4)
        drop = max(reference_accuracy - r["accuracy"] for r in runs.values())
        if not logits and drop > criteria["max_accuracy_drop"] + 1e-12:
            would["max_accuracy_drop"] = _ceil_sig(drop)
    return not reasons, reasons, would


def _ceil_sig(x: float, digits: int = 3) -> float:
    """``x`` rounded up to ``digits`` significant digits (a threshold printed this way still passes)."""
    if x <= 0 or not np.isfinite(x):
        return float(x)
    step = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return float(f"{math.ceil(x / step - 1e-9) * step:.{digits}g}")


def would_pass_hint(kind: str, would: dict | None) -> str:
    """``would_pass_with`` as command-line options, e.g. ``--atol 1.34e-05 (or --rtol 0.0141)``.

    ``kind`` is the parity kind the format is judged by: prediction-level thresholds are the
    ``--int8-*`` options (they apply to every reduced-precision format)."""
    if not would:
        return ""
    prefix = "int8-" if kind == "predictions" else ""
    parts = []
    if "atol" in would:
        alt = f" (or --rtol {would['rtol']:g})" if "rtol" in would else ""
        parts.append(f"--atol {would['atol']:g}{alt}")
    if "min_agreement" in would:
        parts.append(f"--{prefix}min-agreement {would['min_agreement']:g}")
    if "max_accuracy_drop" in would:
        parts.append(f"--{prefix}max-accuracy-drop {would['max_accuracy_drop']:g}")
    return "would pass with " + " and ".join(parts)


def run_batched(predictor, images: np.ndarray, batch: int) -> np.ndarray:
    """Run ``predictor`` over ``images`` in batches of ``batch`` and stack the logits (in one request to a
    runtime that runs outside this process and offers ``run_batches``)."""
    if getattr(predictor, "run_batches", None) is not None:
        return predictor.run_batches(images, batch)
    outs = [predictor(images[i : i + batch]) for i in range(0, len(images), batch)]
    return np.concatenate(outs, axis=0)


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """Run PyTorch with ``n`` intra-op threads inside the block. One image at a time gains nothing
    from a second thread, and on a busy 2-core machine its spin-waits made the 10,000 batch-1 calls
    10 to 100 times slower."""
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def parity_check(predictor, reference: np.ndarray, images: np.ndarray, labels: np.ndarray, criteria: dict,
                 reference_accuracy: float, batch_sizes=PARITY_BATCH_SIZES) -> dict:
    """Run ``predictor`` on ``images`` at each batch size, compare with ``reference`` and judge."""
    runs: dict[str, dict] = {}
    for batch in batch_sizes:
        batch = min(batch, len(images))
        t0 = time.perf_counter()
        try:
            with _torch_threads(1 if batch == 1 else None):
                out = run_batched(predictor, images, batch)
        except MnistDeployError:
            raise
        except Exception as exc:  # a runtime that cannot run batch size N fails parity, with the reason
            raise ExportError(f"running it at batch size {batch} failed: {first_line(exc)}") from None
        seconds = time.perf_counter() - t0
        runs[str(batch)] = compare_logits(reference, out, labels, atol=criteria.get("atol"),
                                          rtol=criteria.get("rtol", 0.0))
        runs[str(batch)]["seconds"] = seconds  # wall time of the whole pass, for the record (not a benchmark)
    passed, reasons, would_pass = judge(runs, criteria, reference_accuracy)
    return {
        "passed": passed,
        "criteria": criteria,
        "reference": "pytorch eager (fp32, batch 10000)",
        "reference_accuracy": reference_accuracy,
        "batch_sizes": runs,
        "max_abs_diff": max(r["max_abs_diff"] for r in runs.values()),
        "agreement": min(r["agreement"] for r in runs.values()),
        "accuracy": min(r["accuracy"] for r in runs.values()),
        "reasons": reasons,
        "would_pass_with": would_pass,
    }


# ---------------------------------------------------------------------------------------------
# Results and the parity table.


@dataclass
class FormatResult:
    """What happened to one format: where it went, how big, how long, and its parity verdict."""

    format: str
    file: str
    status: str  # ok | failed (parity or exporter) | error (I/O: the previous artifact was kept) | skipped
    size_bytes: int | None = None
    sha256: str | None = None
    export_seconds: float | None = None
    parity: dict | None = None
    error: str | None = None
    notes: dict | None = None  # what the exporter recorded (INT8: the chosen rung, every rung's score)

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "skipped")


@dataclass
class ExportReport:
    """One export run: the reference accuracy and what happened to each format; ``table()`` prints it."""

    artifacts: Path
    source_state_dict_sha256: str
    model: str
    reference_accuracy: float | None
    results: list[FormatResult] = field(default_factory=list)
    parity_path: Path | None = None
    test_images: int = 10_000  # how many test images parity was judged on (ExportConfig.parity_images)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    @property
    def failures(self) -> list[FormatResult]:
        return [r for r in self.results if not r.ok]

    def table(self, markdown: bool = False) -> str:
        """The parity table: format, file, size, export time, max abs diff, agreement, accuracy, verdict."""
        header = ["format", "file", "size", "export time", "max abs diff", "agreement", "accuracy", "verdict"]
        rows = [["pytorch (reference)", "-", "-", "-", "0", "100.00%",
                 _pct(self.reference_accuracy), "reference"]]
        for r in self.results:
            p = r.parity or {}
            rows.append([
                r.format, r.file, size_text(r.size_bytes),
                "-" if r.export_seconds is None else f"{r.export_seconds:.2f} s",
                "-" if p.get("max_abs_diff") is None else f"{p['max_abs_diff']:.2e}",
                _pct(p.get("agreement")), _pct(p.get("accuracy")), _verdict(r),
            ])
        table = format_table(header, rows, markdown=markdown)
        lines = [line for r in self.results for line in int8_lines(r)]
        return "\n".join([table, *(f"- {line}" if markdown else line for line in lines)])

    def to_dict(self) -> dict:
        return {
            "artifacts": str(self.artifacts),
            "model": self.model,
            "source_state_dict_sha256": self.source_state_dict_sha256,
            "reference_accuracy": self.reference_accuracy,
            "test_images": self.test_images,
            "ok": self.ok,
            "results": [asdict(r) for r in self.results],
            "parity_path": str(self.parity_path) if self.parity_path else None,
        }


def int8_lines(r: FormatResult) -> list[str]:
    """The INT8 story of one format: the CPU's 8-bit path, each ladder rung's score on the held-out
    training images, the rung chosen and the layers kept in fp32."""
    q = (r.notes or {}).get("int8")
    if not q:
        return []
    from ..formats.cpu_int8 import describe

    lines = [f"{r.format}: 8-bit path here {describe(q.get('cpu_int8_path'))}"]
    rungs = q.get("rungs") or []
    if rungs:
        tuned = q.get("tuned_on") or {}
        lines[0] += (f"; tuned on {tuned.get('images', '?')} held-out training images (gate + "
                     f"{100 * tuned.get('margin', 0):.1f} pt margin), verdict above on the test images")
        for i, rung in enumerate(rungs, 1):
            score = ("error: " + str(rung["error"])) if rung.get("error") else (
                f"agreement {100 * rung['agreement']:.2f}%, accuracy drop {100 * rung['accuracy_drop']:+.2f} pt")
            mark = "chosen" if rung["step"] == q.get("chosen_step") and rung["config"] == q["chosen"]["config"] \
                else ("pass" if rung["passed"] else "miss")
            lines.append(f"  rung {i} {rung['step']}: {rung['label']}: {score} [{mark}]")
        kept = q.get("fp32_layers") or []
        lines.append(f"  fp32 layers: {', '.join(kept) if kept else 'none'}")
    return lines


def _verdict(r: FormatResult) -> str:
    if r.status == "skipped":
        return "skipped"
    if r.parity and r.parity.get("skipped"):
        return "not checked"
    if r.ok:
        return "PASS"
    return "FAIL" if r.parity and r.parity.get("passed") is False else "ERROR"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def format_table(header: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    """A plain aligned text table, or a Markdown one (numbers right-aligned)."""
    numeric = [all(_looks_numeric(row[i]) for row in rows) for i in range(len(header))]
    if markdown:
        lines = ["| " + " | ".join(header) + " |",
                 "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]

    def fmt(row):
        return "  ".join(c.rjust(w) if n else c.ljust(w) for c, w, n in zip(row, widths, numeric, strict=True)).rstrip()

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *[fmt(r) for r in rows]])


def _looks_numeric(cell: str) -> bool:
    return cell == "-" or cell[:1].isdigit()


__all__ = [
    "PARITY_BATCH_SIZES",
    "ExportReport",
    "FormatResult",
    "compare_logits",
    "format_table",
    "int8_lines",
    "judge",
    "parity_check",
    "run_batched",
    "would_pass_hint",
]
