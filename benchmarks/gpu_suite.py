"""The CUDA suite: train, parity, bench and serve on one GPU, in one command, into one folder.

    bash benchmarks/gpu_suite.sh [--device cuda] [--out DIR] [--tiny] [--budget-s 480]
    bash benchmarks/gpu_suite.sh --device cpu --tiny          # the dry run CI keeps green

Runs from the source tree with whatever Python it is started with (``PYTHONPATH`` points at the
checkout; nothing is installed), so it works on a GPU machine whose torch is not the one the
project pins. Every step is a subprocess with its own log and time limit; a step whose imports are
missing is a ``skipped`` line naming them, a step that fails is a ``failed`` line, and the others
go on. Steps, in the order they run (the most wanted first, so a spent budget drops the least wanted):

1. ``train`` the MLP and the CNN on the device, and the MLP through torchrun (``--nproc-per-node 1``:
   a process group of one, NCCL on CUDA, gloo on the CPU).
2. ``export`` every format, then the parity gate on the device: every registered format that runs
   there (plus bf16 eager and torch.compile with CUDA graphs) against PyTorch eager on the device,
   with TF32 off so that fp32 is judged as fp32.
3. ``bench`` on the device, batch 1 to 65,536, with the fp32 matmul peak (cuBLAS on CUDA) for the
   roofline, the device's copy bandwidth, and for each row whose arithmetic intensity is under the
   machine balance, the % of that bandwidth it reaches. On CUDA also a CPU bench of the same models
   for the comparison.
4. ``serve`` on the device with dynamic batching (and without, for the ratio) under a bounded load
   on 127.0.0.1.

The output folder holds at most eight files (what a device run can bring back): ``suite.json``
(steps, environment, parity, serve), ``bench.json`` (every bench run, rows annotated with the
roofline), ``summary.md``, ``suite.log`` (every step's output), ``nvidia-smi.txt`` and
``work.tar.gz`` (the artifacts' manifests, parity reports, bench tables and logs). docs/gpu.md
says how to run it and read it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the source tree, whatever is installed
sys.path.insert(0, str(REPO / "benchmarks"))

BATCH_SIZES = (1, 16, 256, 1024, 4096, 16384, 65536)
TINY_BATCH_SIZES = (1, 64)
CPU_COMPARE_BATCH_SIZES = (1, 16, 256, 1024, 4096)
TINY_RUNTIMES = ("pytorch", "pytorch-bf16", "torchscript", "torch.export", "onnxruntime")
CPU_COMPARE_RUNTIMES = ("pytorch", "torchscript", "onnxruntime")
OUTPUT_FILES = ("suite.json", "bench.json", "summary.md", "suite.log", "nvidia-smi.txt", "work.tar.gz")
BANDWIDTH_BYTES = 1 << 30  # the copy that measures the device's memory bandwidth (CPU: a quarter of it)

# What each step imports: a missing one makes the step a skipped line, not a traceback.
NEEDS = {
    "train": ("torch", "numpy", "click", "rich"),
    "export": ("torch", "click", "rich", "onnx", "onnxruntime", "onnxscript"),
    "parity": ("torch", "numpy", "onnx", "onnxruntime"),
    "bench": ("torch", "numpy", "click", "rich", "matplotlib"),
    "serve": ("torch", "click", "fastapi", "starlette", "uvicorn", "orjson", "python_multipart", "prometheus_client",
              "pydantic", "PIL"),
}
ORT_CUDA_SKIP = ("the GPU machine has ONNX Runtime's CPU build only, and an onnxruntime-gpu wheel (well over "
                 "100 MB) does not fit the 64 MiB a device run carries")


# ---------------------------------------------------------------------------------------------
# Settings.


def settings(device: str, tiny: bool) -> dict:
    """Every knob of a run, in one dict recorded in suite.json."""
    cuda = device.startswith("cuda")
    s = {
        "device": device, "tiny": tiny,
        "train": {"epochs": 5, "subset": None},
        "parity_images": None,  # all 10,000 test images
        "parity_skip": [],
        # "all": every registered runtime (a format that lands later, AOTInductor say, included), the
        # opt-in bf16 and CUDA-graphs entries with them; what cannot run on the device is a skipped row
        "bench": {"batch_sizes": list(BATCH_SIZES), "warmup": 10, "min_time": 0.2, "min_calls": 20,
                  "runtimes": ["all"], "peak_sizes": [4096, 8192] if cuda else [1024]},
        "cpu_compare": {"batch_sizes": list(CPU_COMPARE_BATCH_SIZES), "warmup": 3, "min_time": 0.1,
                        "min_calls": 5, "runtimes": list(CPU_COMPARE_RUNTIMES)} if cuda else None,
        "serve": {"requests": 20000, "concurrency": 64, "max_batch_size": 64, "max_queue_delay_us": 500,
                  "runtime": "pytorch"},
        "export_formats": ["torchscript", "pt2", "onnx", "onnx-int8"],
        "models": ["mlp", "cnn"],
    }
    if tiny:
        s["train"] = {"epochs": 1, "subset": 2000}
        s["parity_images"] = 200
        s["parity_skip"] = ["torch.compile", "torch.compile-cudagraphs"]
        # torch.compile's compilation takes minutes on a small, busy CPU: the dry run leaves it out
        s["bench"].update(batch_sizes=list(TINY_BATCH_SIZES), warmup=1, min_time=0.01, min_calls=2,
                          peak_sizes=[256], runtimes=list(TINY_RUNTIMES))
        if s["cpu_compare"]:
            s["cpu_compare"].update(batch_sizes=[1, 64], warmup=1, min_time=0.01, min_calls=2)
        s["serve"].update(requests=200, concurrency=8)
        s["export_formats"] = ["torchscript", "pt2", "onnx"]
        s["models"] = ["mlp"]
    return s


# ---------------------------------------------------------------------------------------------
# The environment: what is there, recorded before anything runs.


def module_versions(names) -> dict[str, str | None]:
    """Each module's version (or "present"), None where it cannot be imported."""
    out = {}
    for name in names:
        try:
            mod = importlib.import_module(name)
        except Exception:  # noqa: BLE001 - ImportError, or a broken install that raises anything
            out[name] = None
            continue
        out[name] = _version(name, mod)
    return out


def _version(name: str, mod) -> str:
    import importlib.metadata as md

    dist = {"PIL": "pillow", "python_multipart": "python-multipart", "prometheus_client": "prometheus-client"}.get(name, name)
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return str(getattr(mod, "__version__", None) or "present")


def environment(device: str = "cuda") -> dict:
    import platform

    mods = sorted({m for needs in NEEDS.values() for m in needs} | {"openvino", "triton", "httpx"})
    env = {"python": sys.version.split()[0], "executable": sys.executable, "platform": platform.platform(),
           "cpus": os.cpu_count(), "modules": module_versions(mods), "ab": shutil.which("ab"),
           "nvidia_smi": shutil.which("nvidia-smi"), "git_commit": _git_commit()}
    try:
        import torch

        from mnist_deploy.devices import cpu_model, cuda_numerics

        env.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                   cpu=cpu_model(), cuda_numerics_default=cuda_numerics())
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            env.update(gpu=props.name, gpu_memory_bytes=int(props.total_memory), gpu_sms=props.multi_processor_count,
                       gpu_capability=f"{props.major}.{props.minor}", nccl=_safe(lambda: ".".join(
                           map(str, torch.cuda.nccl.version()))))
    except Exception as exc:  # noqa: BLE001 - recorded; the steps say what they cannot do
        env["torch_error"] = f"{type(exc).__name__}: {exc}"
    env["ort_providers"] = _safe(lambda: importlib.import_module("onnxruntime").get_available_providers())
    return env


def environment_of_child() -> dict:
    """:func:`environment`, read in a child process: the suite's own process imports no runtime and
    holds no CUDA context while the steps run (a GPU in exclusive-process mode would refuse them)."""
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_env"], capture_output=True,
                              text=True, timeout=180, cwd=str(REPO),
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(
                                  [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])})
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as exc:
        return {"python": sys.version.split()[0], "modules": module_versions(sorted({m for n in NEEDS.values() for m in n})), "error":
                f"reading the environment failed: {type(exc).__name__}: {exc}"}


def _safe(fn):
    try:
        return fn()
    except Exception:  # noqa: BLE001 - an optional fact
        return None


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def missing(step: str, env: dict) -> list[str]:
    return [m for m in NEEDS[step] if env["modules"].get(m) is None]


def find_mnist(explicit: str | None) -> Path | None:
    """The MNIST folder: --data-dir, $MNIST_DEPLOY_DATA, then .mnist/ or shared/data/mnist in the checkout
    (a GPU machine reaches nothing outside: the files travel with the tree)."""
    candidates = [explicit, os.environ.get("MNIST_DEPLOY_DATA"), REPO / ".mnist", REPO / "shared" / "data" / "mnist",
                  REPO.parent / "shared" / "data" / "mnist"]
    for c in candidates:
        if c and any(Path(c).glob("t10k-images-idx3-ubyte*")):
            return Path(c)
    return None


# ---------------------------------------------------------------------------------------------
# Steps: a subprocess each, with a log and a time limit, recorded whatever happens.


class Suite:
    def __init__(self, out: Path, work: Path, budget_s: float, env: dict) -> None:
        self.out, self.work, self.env = out, work, env
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + budget_s
        self.steps: list[dict] = []
        self.base_env = dict(os.environ)
        self.base_env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])
        self.base_env["PYTHONUNBUFFERED"] = "1"
        self.base_env.setdefault("TORCHINDUCTOR_CACHE_DIR", str(work / "inductor-cache"))  # shared by the steps

    def say(self, line: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)

    def skip(self, name: str, reason: str) -> dict:
        rec = {"name": name, "status": "skipped", "reason": reason, "seconds": 0.0, "rc": None, "log": None}
        self.steps.append(rec)
        self.say(f"{name}: skipped: {reason}")
        return rec

    def run(self, name: str, cmd: list[str], *, timeout: float, needs: str | None = None,
            requires: list[str] | None = None) -> dict:
        """Run ``cmd``; ``needs`` names the modules it imports (NEEDS), ``requires`` the earlier steps it uses."""
        if needs and (gone := missing(needs, self.env)):
            return self.skip(name, f"missing Python modules {', '.join(gone)} (carry them as wheels; docs/gpu.md)")
        for dep in requires or ():
            rec = next((s for s in self.steps if s["name"] == dep), None)
            if rec is None or rec["status"] != "ok":
                return self.skip(name, f"needs step '{dep}', which {'did not run' if rec is None else rec['status']}")
        left = self.deadline - time.monotonic()
        if left < 5:
            return self.skip(name, "the suite's time budget is spent (--budget-s)")
        limit = min(timeout, left)
        log = self.logs / f"{len(self.steps) + 1:02d}-{name.replace(' ', '_').replace('/', '_')}.log"
        self.say(f"{name}: {' '.join(_short(c) for c in cmd)}")
        t0 = time.monotonic()
        with open(log, "w", encoding="utf-8") as fh:
            fh.write(f"$ {' '.join(cmd)}\n")
            fh.flush()
            # its own process group: a step stopped at its limit takes its children with it (torchrun's
            # workers, a server under load), so nothing is left holding the GPU or a port
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=self.base_env, cwd=str(REPO), start_new_session=True)
            try:
                rc = proc.wait(timeout=limit)
                _kill_group(proc)  # anything the step left running in its group (none, normally)
                status = "ok" if rc == 0 else "failed"
                reason = "" if rc == 0 else f"exit code {rc}; last line: {_last_line(log)}"
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                rc, status = None, "timeout"
                reason = f"stopped after {limit:.0f} s"
            except BaseException:  # Ctrl-C: stop the step's whole group too, then stop
                _kill_group(proc)
                raise
        rec = {"name": name, "status": status, "reason": reason, "seconds": round(time.monotonic() - t0, 2),
               "rc": rc, "log": str(log.relative_to(self.work)), "command": " ".join(cmd)}
        self.steps.append(rec)
        self.say(f"{name}: {status} in {rec['seconds']:.1f} s{': ' + reason if reason else ''}")
        return rec


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the step's whole process group, then SIGKILL to whatever is left after 10 s."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader, so that only live members keep the group
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                proc.wait()
                return
            time.sleep(0.2)
    proc.wait()


def _short(arg: str) -> str:
    return arg.replace(str(REPO) + "/", "")


def _last_line(path: Path) -> str:
    lines = [ln for ln in path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


def run_suite(args) -> int:
    device = args.device
    s = settings(device, args.tiny)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="gpu-suite-"))
    work.mkdir(parents=True, exist_ok=True)
    budget = args.budget_s or (300.0 if args.tiny else 480.0)
    started = _dt.datetime.now(_dt.UTC)
    t0 = time.monotonic()
    env = environment_of_child()
    suite = Suite(out, work, budget, env)
    py = sys.executable
    me = str(Path(__file__).resolve())
    suite.say(f"gpu suite: device {device}{' (tiny)' if args.tiny else ''}, python {env['python']}, "
              f"torch {env.get('torch')}, CUDA {env.get('torch_cuda')}, GPU {env.get('gpu')}; out {out}, work {work}")

    _nvidia_smi(out / "nvidia-smi.txt", suite)
    data = find_mnist(args.data_dir)
    if data is None:
        suite.skip("data", "no MNIST files found (--data-dir, $MNIST_DEPLOY_DATA, or .mnist/ in the checkout)")
    elif device.startswith("cuda") and not env.get("cuda_available"):
        suite.skip("data", f"--device {device} but torch {env.get('torch')} sees no CUDA device")
        data = None
    else:
        suite.steps.append({"name": "data", "status": "ok", "reason": str(data), "seconds": 0.0, "rc": 0,
                            "log": None})
    common = ["--data-dir", str(data), "--no-download"] if data else []
    cli = [py, "-m", "mnist_deploy"]
    tr = s["train"]
    train_args = ["--epochs", str(tr["epochs"]), "--device", device, "--quiet"]
    if tr["subset"]:
        train_args += ["--subset", str(tr["subset"])]
    models = s["models"]
    if data:
        # 1. train: each model on the device, then the MLP through torchrun (a process group of one)
        for model in models:
            suite.run(f"train {model}", [*cli, "train", "--model", model, *train_args, "--out",
                                         str(work / model), *common], timeout=240, needs="train")
        suite.run("train mlp torchrun", [*cli, "train", "--model", "mlp", *train_args, "--nproc-per-node", "1",
                                         "--out", str(work / "mlp-torchrun"), *common], timeout=240, needs="train")
        # 2 to 4, model by model: export, parity on the device, bench, serve
        for model in models:
            art = work / model
            fmts = [a for f in s["export_formats"] for a in ("--format", f)]
            suite.run(f"export {model}", [*cli, "export", "--artifacts", str(art), *fmts, *common],
                      timeout=300, needs="export", requires=[f"train {model}"])
            suite.run(f"parity {model}", [py, me, "_parity", "--artifacts", str(art), "--device", device,
                                          "--out", str(work / f"parity-{model}.json"), *common,
                                          *(["--images", str(s["parity_images"])] if s["parity_images"] else []),
                                          *[a for f in s["parity_skip"] for a in ("--skip", f)]],
                      timeout=300, needs="parity", requires=[f"train {model}"])
            suite.run(f"bench {model} {device}", [py, me, "_bench", "--artifacts", str(art), "--device", device,
                                                  "--out", str(work / f"bench-{model}-{device.split(':')[0]}"),
                                                  "--config", json.dumps(s["bench"]), *common],
                      timeout=300, needs="bench", requires=[f"train {model}"])
            if model == models[0]:
                sv = s["serve"]
                suite.run(f"serve {model} {device}", [py, me, "_serve", "--artifacts", str(art), "--device", device,
                                                      "--out", str(work / f"serve-{model}.json"),
                                                      "--config", json.dumps(sv), *common],
                          timeout=240, needs="serve", requires=[f"train {model}"])
        if s["cpu_compare"]:
            for model in models:
                suite.run(f"bench {model} cpu", [py, me, "_bench", "--artifacts", str(work / model), "--device", "cpu",
                                                 "--out", str(work / f"bench-{model}-cpu"),
                                                 "--config", json.dumps(s["cpu_compare"]), *common],
                          timeout=240, needs="bench", requires=[f"train {model}"])
    return finish(suite, s, started, time.monotonic() - t0)


def _nvidia_smi(path: Path, suite: Suite) -> None:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        path.write_text("nvidia-smi: not found on this machine (no NVIDIA driver tools; a CPU run)\n", encoding="utf-8")
        suite.say("nvidia-smi: skipped: not found")
        return
    try:
        proc = subprocess.run([exe, "-q"], capture_output=True, text=True, timeout=30)
        path.write_text(proc.stdout + proc.stderr, encoding="utf-8")
    except (OSError, subprocess.SubprocessError) as exc:
        path.write_text(f"nvidia-smi -q failed: {exc}\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Collecting: one suite.json, one bench.json, a summary, the logs.


def finish(suite: Suite, s: dict, started, seconds: float) -> int:
    work, out = suite.work, suite.out
    benches = {}
    for path in sorted(work.glob("bench-*/bench.json")):
        benches[path.parent.name.removeprefix("bench-")] = json.loads(path.read_text(encoding="utf-8"))
    parity = {p.stem.removeprefix("parity-"): json.loads(p.read_text(encoding="utf-8"))
              for p in sorted(work.glob("parity-*.json"))}
    serve = {p.stem.removeprefix("serve-"): json.loads(p.read_text(encoding="utf-8"))
             for p in sorted(work.glob("serve-*.json"))}
    trained = {}
    for model in (*s["models"], "mlp-torchrun"):
        mpath = work / model / "manifest.json"
        if mpath.is_file():
            man = json.loads(mpath.read_text(encoding="utf-8"))
            trained[model] = {"metrics": man.get("metrics"), "distributed": man.get("distributed"),
                              "device": (man.get("training") or {}).get("device"),
                              "exports": {k: v.get("status") for k, v in man.get("artifacts", {}).items()
                                          if k not in ("state_dict", "metrics")}}
    counts = {st: sum(1 for x in suite.steps if x["status"] == st) for st in ("ok", "failed", "timeout", "skipped")}
    result = {
        "schema": 1, "started": started.isoformat(timespec="seconds"), "seconds": round(seconds, 1),
        "settings": s, "environment": suite.env, "steps": suite.steps, "counts": counts, "train": trained,
        "parity": parity, "serve": serve,
    }
    (out / "suite.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (out / "bench.json").write_text(json.dumps({"schema": 1, "suite_started": result["started"],
                                                "environment": suite.env, "runs": benches}, indent=2) + "\n",
                                    encoding="utf-8")
    summary = summary_markdown(result, benches)
    (out / "summary.md").write_text(summary, encoding="utf-8")
    with open(out / "suite.log", "w", encoding="utf-8") as fh:
        for rec in suite.steps:
            fh.write(f"==== {rec['name']}: {rec['status']} ({rec['seconds']} s) {rec.get('reason') or ''}\n")
            if rec.get("log"):
                fh.write((work / rec["log"]).read_text(encoding="utf-8", errors="replace"))
                fh.write("\n")
    with tarfile.open(out / "work.tar.gz", "w:gz") as tar:
        for path in sorted(work.rglob("*")):
            if path.is_file() and path.suffix in (".json", ".log", ".md", ".csv") and "inductor-cache" not in path.parts:
                tar.add(path, arcname=str(path.relative_to(work)))
    print(steps_table(suite.steps))
    print(f"\n{counts['ok']} ok, {counts['failed']} failed, {counts['timeout']} timed out, {counts['skipped']} skipped "
          f"in {seconds:.0f} s; wrote {', '.join(OUTPUT_FILES)} to {out}/")
    return 0 if counts["failed"] == 0 and counts["timeout"] == 0 and counts["ok"] > 0 else 1


def steps_table(steps: list[dict]) -> str:
    rows = [(x["name"], x["status"], f"{x['seconds']:.1f}", (x.get("reason") or "")[:110]) for x in steps]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(("step", "status", "s", "note"))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(("step", "status", "s", "note"), widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def summary_markdown(result: dict, benches: dict) -> str:
    env = result["environment"]
    lines = [f"# GPU suite, {result['started']}", "",
             f"Device `{result['settings']['device']}`{' (tiny)' if result['settings']['tiny'] else ''}: "
             f"{env.get('gpu') or env.get('cpu')}; torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), "
             f"Python {env.get('python')}, {env.get('cpus')} CPUs, commit {str(env.get('git_commit'))[:12]}.", "",
             "## Steps", "", "| step | status | seconds | note |", "|---|---|---:|---|"]
    lines += [f"| {x['name']} | {x['status']} | {x['seconds']:.1f} | {(x.get('reason') or '').replace('|', '/')} |"
              for x in result["steps"]]
    for model, p in result["parity"].items():
        lines += ["", f"## Parity on {p.get('device')}: {model} (reference: {p.get('reference')})", "",
                  "| format | verdict | max abs diff | agreement | accuracy | note |", "|---|---|---:|---:|---:|---|"]
        for r in p.get("results", []):
            q = r.get("parity") or {}
            mad = "-" if q.get("max_abs_diff") is None else f"{q['max_abs_diff']:.2e}"
            agr = "-" if q.get("agreement") is None else f"{100 * q['agreement']:.2f}%"
            acc = "-" if q.get("accuracy") is None else f"{100 * q['accuracy']:.2f}%"
            lines.append(f"| {r['format']} | {r['status']} | {mad} | {agr} | {acc} | {(r.get('reason') or '')[:120]} |")
    for name, b in benches.items():
        lines += ["", f"## Bench {name}", "", "| runtime | batch | p50 ms | images/s | GFLOP/s | % peak | bound | "
                  "% bandwidth | note |", "|---|---:|---:|---:|---:|---:|---|---:|---|"]
        for r in b.get("records", []):
            if r["status"] != "ok":
                lines.append(f"| {r['runtime']} | - | - | - | - | - | - | - | {r['status']}: "
                             f"{(r.get('reason') or '')[:120]} |")
                continue
            pct = "-" if r.get("pct_peak") is None else f"{r['pct_peak']:.1f}"
            bw = "-" if r.get("pct_bandwidth") is None else f"{r['pct_bandwidth']:.1f}" + (
                " (cache)" if r.get("bandwidth_note") else "")
            lines.append(f"| {r['runtime']} | {r['batch_size']} | {r['p50_ms']:.4g} | {r['throughput_per_s']:,.0f} | "
                         f"{r['gflops']:.1f} | {pct} | {r.get('bound') or '-'} | {bw} | |")
        peak, bwm = b.get("peak", {}), b.get("bandwidth") or {}
        for dev, pk in peak.items():
            lines.append(f"\nPeak on {dev}: {pk.get('gflops') or 0:,.0f} GFLOP/s fp32 ({pk.get('method')}); copy "
                         f"bandwidth {bwm.get('gb_per_s') or 0:,.0f} GB/s; balance {bwm.get('balance_flop_per_byte') or 0:.1f}"
                         " FLOP/byte.")
    for model, sv in result["serve"].items():
        lines += ["", f"## Serve {model} on {sv.get('device')} ({sv.get('runtime')}, load: {sv.get('generator')})", "",
                  "| server | requests | concurrency | req/s | p50 ms | p99 ms | errors |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in sv.get("runs", []):
            if r.get("error"):
                lines.append(f"| {r['label']} | - | - | - | - | - | {r['error'][:100]} |")
                continue
            lines.append(f"| {r['label']} | {r['requests']} | {r['concurrency']} | {r['requests_per_second']:,.0f} | "
                         f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['errors']} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Sub-steps (run as subprocesses of the suite): parity on the device, bench, serve under load.


def _register_extras() -> None:
    from mnist_deploy.formats import EXTRA_FORMATS, FORMATS, register

    for fmt in EXTRA_FORMATS:
        if fmt.name not in FORMATS:
            register(fmt)


def parity_step(args) -> int:
    """The parity gate on the device: every registered format that runs there against PyTorch eager on
    that device, fp32 judged on logits with TF32 off, reduced precision (bf16, INT8) on predictions."""
    import numpy as np

    from mnist_deploy.artifacts.manifest import load_manifest, verified_path
    from mnist_deploy.devices import cuda_numerics, strict_fp32
    from mnist_deploy.errors import first_line
    from mnist_deploy.export.parity import parity_check
    from mnist_deploy.export.source import load_eval_data
    from mnist_deploy.formats import FORMATS, load_eager, load_predictor, model_from_state_dict

    _register_extras()
    folder = Path(args.artifacts)
    manifest = load_manifest(folder)
    data = load_eval_data(manifest, args.data_dir, None, not args.no_download)
    images, labels = data.images, data.labels
    if args.images:
        images, labels = images[: args.images], labels[: args.images]
    results, failed = [], 0
    with strict_fp32():
        ref_model = model_from_state_dict(manifest, verified_path(folder, "state_dict", manifest))
        reference = load_eager(ref_model, args.device)(images)  # one batch: all the images
        ref_acc = float((reference.argmax(1) == labels).mean())
        entries = manifest.get("artifacts", {})
        for fmt in FORMATS.values():
            if fmt.name == "pytorch":
                continue
            rec = {"format": fmt.name, "runtime": fmt.runtime}
            why = ("--tiny leaves it out (its compilation takes minutes on a small, busy CPU)"
                   if fmt.name in args.skip else fmt.unavailable(args.device))
            entry = entries.get(fmt.key)
            if why is None and (entry is None or (not fmt.source and entry.get("status") != "ok")):
                why = f"artifact '{fmt.key}' was not exported ({(entry or {}).get('status', 'absent')})"
            if why:
                if fmt.name.startswith("onnx") and args.device.startswith("cuda"):
                    why = f"{why}; {ORT_CUDA_SKIP}"
                rec.update(status="skipped", reason=why)
                print(f"{fmt.name}: skipped: {why}", flush=True)
                results.append(rec)
                continue
            try:
                t0 = time.perf_counter()
                predictor = load_predictor(fmt.name, verified_path(folder, fmt.key, manifest), args.device,
                                           manifest=manifest)
                parity = parity_check(predictor, reference, images, labels, fmt.parity.criteria(), ref_acc)
                rec.update(status="pass" if parity["passed"] else "FAIL", parity=parity,
                           reason="; ".join(parity["reasons"]), seconds=round(time.perf_counter() - t0, 2),
                           details=getattr(predictor, "details", None))
                failed += not parity["passed"]
                del predictor
            except Exception as exc:  # noqa: BLE001 - one format's error is its row; the rest go on
                rec.update(status="error", reason=f"{type(exc).__name__}: {first_line(exc)}")
                failed += 1
            print(f"{fmt.name}: {rec['status']} {rec.get('reason') or ''}", flush=True)
            results.append(rec)
        numerics = cuda_numerics()
    out = {"device": args.device, "reference": f"pytorch eager on {args.device}, fp32, TF32 off, one batch",
           "reference_accuracy": ref_acc, "images": int(len(labels)), "numerics": numerics, "results": results,
           "labels_checksum": int(np.asarray(labels).sum())}
    Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n", encoding="utf-8")
    return 1 if failed else 0


def measure_bandwidth(device: str, nbytes: int = BANDWIDTH_BYTES, repeats: int = 10) -> dict:
    """The device's memory bandwidth from a large tensor copy, bytes read plus bytes written over the
    median time (synchronized before each clock read on CUDA)."""
    import numpy as np
    import torch

    from mnist_deploy.bench.timing import time_calls
    from mnist_deploy.devices import is_cuda, synchronize

    dev = torch.device(device)
    if not is_cuda(dev):
        nbytes //= 4
    src = torch.randn(nbytes // 4, device=dev)  # random, never zeros
    dst = torch.empty_like(src)
    ns = time_calls(lambda _: dst.copy_(src), None, warmup=2, min_time=1e-9, min_calls=repeats,
                    sync=(lambda: synchronize(dev)) if is_cuda(dev) else None)
    moved = 2 * src.numel() * src.element_size()
    return {"gb_per_s": moved / float(np.median(ns)), "bytes_copied": int(src.numel() * src.element_size()),
            "method": "tensor.copy_ (read + write)", "calls": int(len(ns))}


def annotate_roofline(result: dict, manifest: dict, bandwidth: dict) -> None:
    """Each ok row's bytes per call (a lower bound: the weights, the input and the logits once each;
    activations between layers not counted), arithmetic intensity, which roof bounds it at this
    machine's balance (peak FLOP/s over copy bandwidth), and for memory-bound rows the % of bandwidth."""
    import torch

    from mnist_deploy.formats import FORMATS
    from mnist_deploy.models import build_model

    model = build_model(manifest["model"]["name"], manifest["model"].get("hparams"))
    params = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers()
                                                              if b.dtype.is_floating_point)
    per_image = int(torch.tensor(manifest["model"]["input_shape"]).prod()) + 10
    flops = result["model"]["flops_per_example"]
    for r in result["records"]:
        if r["status"] != "ok":
            continue
        peak = (result["peak"].get(r["device"]) or {}).get("gflops")
        elem = 2 if (r.get("precision") or "").startswith("bf16") else 1 if r.get("precision") == "int8" else 4
        in_elem = 2 if elem == 2 else 4
        nbytes = params * elem + r["batch_size"] * per_image * in_elem
        intensity = flops * r["batch_size"] / nbytes
        r["bytes_per_call"] = int(nbytes)
        r["flop_per_byte"] = intensity
        bw = bandwidth.get("gb_per_s")
        if not bw or not peak:
            continue
        balance = peak / bw  # (GFLOP/s) / (GB/s): FLOP per byte
        fmt = FORMATS.get(r["format"])
        r["bound"] = "memory" if intensity < balance else "compute"
        if r["bound"] == "memory" or (fmt is not None and not fmt.roofline):
            r["pct_bandwidth"] = 100 * nbytes / (r["p50_ms"] * 1e6) / bw  # bytes per ns is GB/s
            if r["pct_bandwidth"] > 100:  # a working set that fits in cache (the MLP's weights, in L2)
                r["bandwidth_note"] = "above the measured memory bandwidth: the data came from cache"
    if bandwidth.get("gb_per_s"):
        for pk in result["peak"].values():
            if pk and pk.get("gflops"):
                bandwidth["balance_flop_per_byte"] = pk["gflops"] / bandwidth["gb_per_s"]


def bench_step(args) -> int:
    from mnist_deploy.artifacts.manifest import load_manifest
    from mnist_deploy.bench.report import format_table, write_outputs
    from mnist_deploy.bench.run import run_bench
    from mnist_deploy.devices import cuda_numerics, strict_fp32
    from mnist_deploy.errors import first_line

    _register_extras()
    cfg = json.loads(args.config)
    with strict_fp32():
        result = run_bench(artifacts=args.artifacts, runtimes=",".join(cfg["runtimes"]),
                           batch_sizes=cfg["batch_sizes"], device=args.device, warmup=cfg["warmup"],
                           min_time=cfg["min_time"], min_calls=cfg["min_calls"],
                           peak_sizes=cfg.get("peak_sizes"), data_dir=args.data_dir,
                           allow_download=not args.no_download,
                           progress=lambda m: print(m, flush=True))
        result["environment"]["cuda_numerics"] = cuda_numerics()
        try:
            bandwidth = measure_bandwidth(args.device)
        except Exception as exc:  # noqa: BLE001 - no bandwidth is no % of it, not a lost run
            bandwidth = {"gb_per_s": None, "error": f"{type(exc).__name__}: {first_line(exc)}"}
    if args.device.startswith("cuda"):
        for r in result["records"]:
            if r["runtime"].startswith("onnxruntime") and r["status"] == "skipped":
                r["reason"] = f"{r['reason']}; {ORT_CUDA_SKIP}"
    annotate_roofline(result, load_manifest(Path(args.artifacts)), bandwidth)
    result["bandwidth"] = bandwidth
    write_outputs(result, args.out)
    print(format_table(result), flush=True)
    statuses = [r["status"] for r in result["records"]]
    return 0 if "ok" in statuses and "failed" not in statuses else 1


def serve_step(args) -> int:
    """``mnist-deploy serve --device D`` (one worker: one model on the GPU) with dynamic batching, and
    without for the ratio, under a bounded load on 127.0.0.1: ab when it is installed, else a small
    keep-alive client in threads (a GPU machine has no ab)."""
    from load_test import ServerError, _get, pixel_body, serve_subprocess

    cfg = json.loads(args.config)
    body = pixel_body(args.data_dir)
    runs, ok = [], True
    base = ["--runtime", cfg["runtime"], "--device", args.device, "--workers", "1", "--log-level", "warning"]
    configs = [("batching", ["--max-batch-size", str(cfg["max_batch_size"]), "--max-queue-delay-us",
                             str(cfg["max_queue_delay_us"])]),
               ("no batching", ["--max-batch-size", "1"])]
    generator = "ab" if shutil.which("ab") else "python threads (http.client, keep-alive)"
    for label, extra in configs:
        try:
            with serve_subprocess(args.artifacts, [*base, *extra], startup_timeout=120) as (url, _proc):
                _, model = _get(url + "/model")
                warm = max(cfg["concurrency"], cfg["requests"] // 10)
                load(url, body, requests=warm, concurrency=cfg["concurrency"])
                r = load(url, body, requests=cfg["requests"], concurrency=cfg["concurrency"])
                r.update(label=label, server=json.loads(model).get("runtime"))
        except (ServerError, OSError, RuntimeError) as exc:
            r = {"label": label, "error": f"{type(exc).__name__}: {str(exc)[:500]}"}
        ok = ok and not r.get("error") and r["errors"] == 0
        print(json.dumps(r), flush=True)
        runs.append(r)
    out = {"device": args.device, "runtime": cfg["runtime"], "generator": generator, "settings": cfg, "runs": runs}
    ratio = [r for r in runs if not r.get("error")]
    if len(ratio) == 2:
        out["batching_speedup"] = ratio[0]["requests_per_second"] / ratio[1]["requests_per_second"]
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return 0 if ok else 1


def load(url: str, body: bytes, *, requests: int, concurrency: int) -> dict:
    """``requests`` POSTs of ``body`` to url/predict from ``concurrency`` connections: ab if installed,
    else keep-alive http.client connections in threads. Latency per request, p50/p99, errors."""
    if shutil.which("ab"):
        from load_test import run_ab

        r = run_ab(url + "/predict", body, requests=requests, concurrency=concurrency, keepalive=True)
        return {"requests": r["complete"], "concurrency": concurrency, "requests_per_second": r["requests_per_second"],
                "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"], "errors": r["failed"] + r["non_2xx"],
                "generator": r["command"]}
    return _thread_load(url, body, requests=requests, concurrency=concurrency)


def _thread_load(url: str, body: bytes, *, requests: int, concurrency: int) -> dict:
    import http.client
    import threading
    from urllib.parse import urlsplit

    import numpy as np

    parts = urlsplit(url)
    lock = threading.Lock()
    todo = [requests]
    lat, errors = [], [0]

    def worker():
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
        mine = []
        while True:
            with lock:
                if todo[0] <= 0:
                    break
                todo[0] -= 1
            t0 = time.perf_counter_ns()
            try:
                conn.request("POST", "/predict", body=body, headers={"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                good = resp.status == 200
            except (OSError, http.client.HTTPException):
                good = False
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
            mine.append(time.perf_counter_ns() - t0)
            if not good:
                with lock:
                    errors[0] += 1
        conn.close()
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    ms = np.asarray(lat, dtype=np.float64) / 1e6
    p50, p99 = np.percentile(ms, [50, 99]) if len(ms) else (float("nan"), float("nan"))
    return {"requests": len(lat), "concurrency": concurrency, "requests_per_second": len(lat) / seconds,
            "p50_ms": float(p50), "p99_ms": float(p99), "errors": errors[0], "seconds": seconds,
            "generator": "python threads (http.client, keep-alive)"}


# ---------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="step")
    sub.add_parser("_env")
    for name in ("_parity", "_bench", "_serve"):
        p = sub.add_parser(name)
        p.add_argument("--artifacts", required=True)
        p.add_argument("--device", required=True)
        p.add_argument("--out", required=True)
        p.add_argument("--data-dir", default=None)
        p.add_argument("--no-download", action="store_true")
        p.add_argument("--images", type=int, default=None)
        p.add_argument("--config", default="{}")
        p.add_argument("--skip", action="append", default=[])
    ap.add_argument("--device", default="cuda", help="cuda (or cuda:N), or cpu for the dry run")
    ap.add_argument("--tiny", action="store_true", help="tiny settings: one model, 1 epoch on 2,000 images, 2 batch sizes")
    ap.add_argument("--out", default=os.environ.get("OUT") or "gpu-suite-out",
                    help="the output folder (default: $OUT, else ./gpu-suite-out)")
    ap.add_argument("--work", default=None, help="where artifacts and logs go (default: a new temporary folder)")
    ap.add_argument("--data-dir", default=None, help="the MNIST folder (default: $MNIST_DEPLOY_DATA, or .mnist/)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting steps after this many seconds (default 480; 300 with --tiny)")
    args = ap.parse_args(argv)
    steps = {"_parity": parity_step, "_bench": bench_step, "_serve": serve_step}
    if args.step == "_env":
        print(json.dumps(environment(args.device), default=str))
        return 0
    if args.step:
        return steps[args.step](args)
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        ap.error(f"--device must be cpu, cuda or cuda:N, not {args.device!r}")
    return run_suite(args)


if __name__ == "__main__":
    sys.exit(main())
