"""``onnx-node``: the ONNX file run by ONNX Runtime for Node.js (``onnxruntime-node``), where a Node
service would run it.

The Node program is ``js/node_runner.mjs``; onnxruntime-node is installed beside it in
``js/node_modules`` by ``scripts/js_env.sh`` (``npm ci`` from the committed ``js/package-lock.json``).
One Node process per loaded model, driven over the framed protocol the C++ runner speaks
(:mod:`.framed`): the parity gate, ``verify`` and the bench rows go through it, and the bench uses the
runner's own timing of ``await session.run(...)`` (``time_calls``).

The artifact is a byte-for-byte copy of the file the ``onnx`` format proved in the same export run
(``copy_of``), or a fresh export when exported alone. The session gets the configured thread count as
``intraOpNumThreads`` (and ``interOpNumThreads`` 1), as the Python ``onnxruntime`` row does.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path

from ..errors import RuntimeUnavailable
from .base import ExportContext, Format, Predictor, first_line
from .copies import copy_or_export
from .framed import FramedPredictor, RunnerError
from .onnx_family import OnnxOptions, _verify_onnx, _write_onnx_fp32, refuse_external_data

JS_DIR_ENV = "MNIST_DEPLOY_JS_DIR"  # a folder with node_runner.mjs and node_modules/ (default: js/)
NODE_ENV = "MNIST_DEPLOY_NODE"  # the node executable (default: node on PATH)
RUNNER = "node_runner.mjs"
PACKAGE = "onnxruntime-node"
MIN_NODE = (16, 0, 0)  # onnxruntime-node's README: "works on Node.js v16.x+"
PROBE_TIMEOUT_S = 60
SETUP = "run scripts/js_env.sh (npm ci from js/package-lock.json)"


class NodeError(RunnerError):
    """The Node runner refused a request or died."""

    exit_code = 1


# ---------------------------------------------------------------------------------------------
# Where things are, and whether the runner can run here.


def js_dir() -> Path:
    env = os.environ.get(JS_DIR_ENV)
    return Path(env) if env else Path(__file__).resolve().parents[2] / "js"


def node_executable() -> str | None:
    """``$MNIST_DEPLOY_NODE`` if set (it must be an executable), else ``node`` on PATH."""
    env = os.environ.get(NODE_ENV)
    return shutil.which(env) if env else shutil.which("node")


def _stamp(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def installed_version(folder: Path) -> str | None:
    """The onnxruntime-node version installed in ``folder/node_modules``, None when it is not there."""
    try:
        return json.loads((folder / "node_modules" / PACKAGE / "package.json").read_text(encoding="utf-8"))["version"]
    except (OSError, ValueError, KeyError):
        return None


def locked_version(folder: Path) -> str | None:
    """The onnxruntime-node version ``folder/package-lock.json`` pins, None without a lock file."""
    try:
        lock = json.loads((folder / "package-lock.json").read_text(encoding="utf-8"))
        return lock["packages"][f"node_modules/{PACKAGE}"]["version"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


@cache
def _node_version(node: str, stamp: float | None) -> tuple[int, ...] | str:
    """``node --version`` as a tuple, or why it could not be read."""
    try:
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{node} --version failed: {first_line(exc)}"
    m = re.match(r"v?(\d+)\.(\d+)\.(\d+)", out.stdout.strip())
    if out.returncode != 0 or m is None:
        return f"{node} --version did not print a version ({first_line(out.stderr or out.stdout or 'no output')})"
    return tuple(int(g) for g in m.groups())


@cache
def _probe(node: str, folder: str, stamps: tuple) -> dict | str:
    """The versions the runner reports after loading onnxruntime-node (``probe``), or why it cannot."""
    try:
        out = subprocess.run([node, str(Path(folder) / RUNNER), "probe"], capture_output=True, text=True,
                             timeout=PROBE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"the Node runner did not start: {first_line(exc)}"
    if out.returncode != 0:
        return first_line(out.stderr or out.stdout or f"exit {out.returncode}")
    try:
        return json.loads(out.stdout)
    except ValueError:
        return f"the Node runner's probe printed no JSON: {first_line(out.stdout or 'no output')}"


def probe() -> dict | str:
    """What the Node runtime is here: its versions (a dict), or why it cannot run (a string, one line).

    Cached per node executable and install (their modification times), so an availability check
    starts Node once per process, and a change (npm ci, another node on PATH) is seen.
    """
    node = node_executable()
    folder = js_dir()
    if node is None:
        env = os.environ.get(NODE_ENV)
        if env:
            return f"{NODE_ENV}={env} is not an executable"
        return ("no node on PATH: Node.js 16 or newer is needed for onnxruntime-node; run scripts/system_deps.sh "
                f"(Debian's nodejs and npm), then {SETUP}")
    if not (folder / RUNNER).is_file():
        return f"the Node runner is not at {folder / RUNNER} (a source checkout has js/; or set ${JS_DIR_ENV})"
    installed = installed_version(folder)
    if installed is None:
        return f"{PACKAGE} is not installed in {folder / 'node_modules'}; {SETUP}"
    locked = locked_version(folder)
    if locked is not None and installed != locked:
        return f"{PACKAGE} {installed} is installed in {folder / 'node_modules'}, the lock file pins {locked}; {SETUP}"
    version = _node_version(node, _stamp(Path(node)))
    if isinstance(version, str):
        return version
    if version < MIN_NODE:
        have, need = ".".join(map(str, version)), ".".join(map(str, MIN_NODE[:1]))
        return f"node {have} at {node} is too old: {PACKAGE} needs Node.js {need} or newer"
    package_json = folder / "node_modules" / PACKAGE / "package.json"
    result = _probe(node, str(folder), (_stamp(Path(node)), _stamp(folder / RUNNER), _stamp(package_json)))
    if isinstance(result, str):
        return f"{PACKAGE} does not load in node {'.'.join(map(str, version))}: {result}"
    return {**result, "node_path": node}


def unavailable(device: str = "cpu") -> str | None:
    """None when the Node runtime can run here; else why not (the skipped row's reason)."""
    found = probe()
    return found if isinstance(found, str) else None


def versions() -> dict:
    """The versions recorded with bench runs and exports: node and onnxruntime-node ({} when unavailable)."""
    found = probe()
    if isinstance(found, str):
        return {}
    return {"node": found.get("node"), PACKAGE: found.get("onnxruntime_node"), "node_path": found.get("node_path")}


# ---------------------------------------------------------------------------------------------
# Running.


class NodePredictor(FramedPredictor):
    """The ONNX file in an onnxruntime-node ``InferenceSession`` in its own Node process."""

    what = "the Node runner"
    error = NodeError

    def __init__(self, path: Path, threads: int | None = None) -> None:
        found = probe()
        if isinstance(found, str):
            raise RuntimeUnavailable(found)
        refuse_external_data(path)  # the manifest's sha256 covers this one file only
        self.runtime = "onnxruntime-node"
        self.device = "cpu"
        runner = js_dir() / RUNNER
        info = self._start([found["node_path"], str(runner), "serve", "--model", str(path),
                            "--threads", str(threads or 0)], path)
        self.details = {"precision": "f32", "threads": info.get("threads"),
                        "intra_op_num_threads": info.get("intra_op_num_threads"),
                        "inter_op_num_threads": info.get("inter_op_num_threads"),
                        "execution_providers": info.get("execution_providers"),
                        "node": info.get("node"), PACKAGE: info.get("onnxruntime_node"), "runner": str(runner),
                        "timed_by": "the Node runner (process.hrtime.bigint around each await session.run)"}


def _load(path: Path, *, device: str, threads: int | None, manifest: dict) -> Predictor:
    return NodePredictor(path, threads)


_copy_onnx = copy_or_export("onnx", _write_onnx_fp32)


def _export(model, path: Path, options: OnnxOptions, ctx: ExportContext) -> None:
    """A copy of the ONNX file ``onnx`` just proved in this run (so Node is gated on those very bytes),
    or a fresh export when ``onnx`` was not exported in this run."""
    _copy_onnx(model, path, options, ctx)
    ctx.notes["node"] = versions()


ONNX_NODE = Format(
    "onnx-node", "onnxruntime-node",
    "The ONNX file run from Node.js (onnxruntime-node in the js/node_runner.mjs process)",
    files=("mnist_model_node.onnx",), load=_load, export=_export, options=OnnxOptions, devices=("cpu",),
    packages=("onnx", "onnxscript"), available=unavailable, check=_verify_onnx, copy_of="onnx", versions=versions,
)


__all__ = ["JS_DIR_ENV", "MIN_NODE", "NODE_ENV", "ONNX_NODE", "NodeError", "NodePredictor", "installed_version",
           "js_dir", "locked_version", "node_executable", "probe", "unavailable", "versions"]
