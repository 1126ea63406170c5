"""Issue 17's done-when matrix: does INT8 export pass its gate with default flags on every model?

Trains (or reuses) the MLP at seeds 0-4 x {1, 5} epochs, a 1-epoch MLP on the first 5,000 training
images (seed 5) and a 1-epoch CNN, exports onnx-int8 and openvino-int8 with default flags, and prints one
row per model and format: seed, epochs, the ladder rung chosen (and fp32 layers), top-1 agreement with
fp32 and accuracy drop on the 10,000 test images, verdict. Rows are appended to ``--out``/matrix.jsonl
as they finish, so an interrupted run keeps what it measured; a model folder that already holds a
state_dict trained with the same settings is reused.

    MNIST_DEPLOY_DATA=/work/shared/data/mnist python benchmarks/int8_matrix.py --work /tmp/int8-matrix

``--only`` picks rows by label (``mlp-s0-e1``, ``mlp-s5-e1-sub5000``, ``cnn-s0-e1``...), repeatable.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

FORMATS = ("onnx-int8", "openvino-int8")


def plan() -> list[dict]:
    rows = [dict(model="mlp", seed=s, epochs=1) for s in range(5)]
    rows += [dict(model="mlp", seed=5, epochs=1, subset=5000), dict(model="cnn", seed=0, epochs=1)]
    rows += [dict(model="mlp", seed=s, epochs=5) for s in range(5)]
    return rows


def label(cfg: dict) -> str:
    return f"{cfg['model']}-s{cfg['seed']}-e{cfg['epochs']}" + (f"-sub{cfg['subset']}" if cfg.get("subset") else "")


def trained(folder: Path, cfg: dict) -> bool:
    try:
        t = json.loads((folder / "manifest.json").read_text())["training"]
    except (OSError, ValueError, KeyError):
        return False
    return ((folder / "mnist_model_state_dict.pth").is_file() and t["model"] == cfg["model"]
            and t["seed"] == cfg["seed"] and t["epochs"] == cfg["epochs"] and t.get("subset") == cfg.get("subset"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, required=True, help="one artifacts folder per model goes here")
    ap.add_argument("--only", action="append", help="row labels to run (default: all)")
    ap.add_argument("--threads", type=int, default=1, help="PyTorch threads for training")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()

    from mnist_deploy.export.run import export_artifacts
    from mnist_deploy.formats import get_format
    from mnist_deploy.formats.cpu_int8 import int8_path
    from mnist_deploy.train.loop import TrainConfig, train

    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "matrix.jsonl"
    path = int8_path()
    print(f"8-bit path here: {path['path']} ({path['detail']}); rows appended to {log}", flush=True)
    formats = [f for f in FORMATS if get_format(f).unavailable("cpu") is None]
    failures = 0
    for cfg in plan():
        name = label(cfg)
        if args.only and name not in args.only:
            continue
        folder = args.work / name
        if not trained(folder, cfg):
            t0 = time.perf_counter()
            train(TrainConfig(model=cfg["model"], seed=cfg["seed"], epochs=cfg["epochs"], subset=cfg.get("subset"),
                              threads=args.threads), data_dir=args.data_dir, out=folder)
            print(f"{name}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
        report = export_artifacts(artifacts=folder, formats=formats, data_dir=args.data_dir)
        for r in report.results:
            q = (r.notes or {}).get("int8") or {}
            p = r.parity or {}
            row = {
                "label": name, **cfg, "format": r.format, "status": r.status,
                "fp32_accuracy": report.reference_accuracy,
                "rung": q.get("chosen_step"), "rungs_tried": len(q.get("rungs") or []),
                "fp32_layers": q.get("fp32_layers") or [],
                "agreement": p.get("agreement"),
                "accuracy_drop": None if p.get("accuracy") is None else report.reference_accuracy - p["accuracy"],
                "export_seconds": r.export_seconds, "cpu_int8_path": path["path"], "error": r.error,
                "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            }
            failures += r.status != "ok"
            with open(log, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"{name:<20} {r.format:<14} rung {row['rung']!s:<28} fp32 layers "
                  f"{','.join(row['fp32_layers']) or 'none':<10} agreement "
                  f"{100 * (row['agreement'] or 0):6.2f}%  drop {100 * (row['accuracy_drop'] or 0):+.2f} pt  "
                  f"{'PASS' if r.status == 'ok' else r.status.upper()}", flush=True)
    return 1 if failures else 0


def table(log: Path) -> str:
    """The Markdown table of a matrix.jsonl (the last row per model and format)."""
    rows = {}
    for line in log.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        rows[(r["label"], r["format"])] = r
    out = ["| model | seed | epochs | train images | format | rung chosen | fp32 layers | agreement | accuracy drop "
           "| verdict |", "|---|---:|---:|---:|---|---|---|---:|---:|---|"]
    for r in rows.values():
        out.append(f"| {r['model']} | {r['seed']} | {r['epochs']} | {r.get('subset') or 60000} | {r['format']} | "
                   f"{r['rung']} | {', '.join(r['fp32_layers']) or 'none'} | {100 * r['agreement']:.2f}% | "
                   f"{100 * r['accuracy_drop']:+.2f} pt | {'PASS' if r['status'] == 'ok' else 'FAIL'} |")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--table":
        print(table(Path(sys.argv[2])))
        sys.exit(0)
    sys.exit(main())
