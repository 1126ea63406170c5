"""``onnxruntime-web``: the ONNX file run by ONNX Runtime's JavaScript package in a headless Chromium.

The browser is Debian's Chromium (``/usr/bin/chromium``, or ``$MNIST_DEPLOY_CHROMIUM``) driven by
Playwright; ORT-web's ``.mjs``/``.wasm`` files come from ``js/node_modules/onnxruntime-web/dist``,
installed from the committed ``package-lock.json`` by ``scripts/js_env.sh``. A small HTTP server on
127.0.0.1 (a thread in this process) serves the harness page (``static/harness.js``), those files and
the model, with ``Cross-Origin-Opener-Policy: same-origin`` and ``Cross-Origin-Embedder-Policy:
require-corp``: the page is cross-origin isolated, so SharedArrayBuffer and WASM threads are allowed.
What the page actually got (``crossOriginIsolated``, ``ort.env.wasm.numThreads`` after the session
was made, the timer's resolution) is the predictor's ``details``, recorded with the parity gate and
shown in the bench rows' mode.

Three formats, each a byte-for-byte copy of the ONNX file proved in the same export run:
``onnxruntime-web`` (WASM, ``threads`` threads, ORT's default when none are given),
``onnxruntime-web-1t`` (WASM, one thread: the page that is not cross-origin isolated) and
``onnxruntime-web-webgpu`` (skipped, with the reason, where the browser offers no WebGPU adapter).
The bench's rows are timed inside the page: ``performance.now()`` around ``session.run``.
"""

from __future__ import annotations

import base64
import concurrent.futures
import itertools
import os
import queue
import shutil
import threading
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path

import numpy as np

from ..errors import MnistDeployError
from .base import Format, Predictor, first_line
from .copies import copy_or_export
from .onnx_family import ONNX_PACKAGES, OnnxOptions, _verify_onnx, _write_onnx_fp32, refuse_external_data

CHROMIUM_ENV = "MNIST_DEPLOY_CHROMIUM"
JS_ENV = "MNIST_DEPLOY_JS"  # a folder with node_modules/onnxruntime-web (default: the checkout's js/)
WEBGPU_FALLBACK_ENV = "MNIST_DEPLOY_WEBGPU_FALLBACK"  # also accept a software WebGPU adapter (SwiftShader)
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--enable-unsafe-webgpu")
# The only ORT-web files a page needs: the WASM build and its glue (what the drawing page serves too), and
# the WebGPU build with the asyncify glue it loads (a 27 MB .wasm).
ORT_WASM_FILES = ("ort.wasm.min.mjs", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
ORT_FILES = (*ORT_WASM_FILES, "ort.webgpu.min.mjs", "ort-wasm-simd-threaded.asyncify.mjs",
             "ort-wasm-simd-threaded.asyncify.wasm")
INLINE_BYTES = 64 << 10  # batches up to this size go in the evaluate call as base64; larger ones are fetched
CALL_TIMEOUT_S = 600
ISOLATION = {"Cross-Origin-Opener-Policy": "same-origin", "Cross-Origin-Embedder-Policy": "require-corp",
             "Cross-Origin-Resource-Policy": "same-origin"}
_TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
          ".onnx": "application/octet-stream", ".html": "text/html; charset=utf-8"}
_PAGE = (b'<!doctype html><html><head><meta charset="utf-8"><title>loading</title>'
         b'<script type="module" src="/harness.js"></script></head><body></body></html>')


class BrowserError(MnistDeployError):
    """The browser, its page or ORT-web failed (the message is the page's or Playwright's)."""

    exit_code = 1


# ---------------------------------------------------------------------------------------------
# Where things are, and whether the runtime can run here.


def ort_dist() -> Path:
    env = os.environ.get(JS_ENV)
    root = Path(env) if env else Path(__file__).resolve().parents[2] / "js"
    return root / "node_modules" / "onnxruntime-web" / "dist"


def chromium() -> str | None:
    path = os.environ.get(CHROMIUM_ENV, CHROMIUM)
    return path if os.access(path, os.X_OK) else shutil.which(path)


def unavailable() -> str | None:
    """Why ORT-web cannot run here (the skipped row's reason), or None."""
    if chromium() is None:
        return (f"no Chromium at {os.environ.get(CHROMIUM_ENV, CHROMIUM)} (apt-get install chromium, or set "
                f"${CHROMIUM_ENV}); run scripts/system_deps.sh")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -c constraints.txt playwright)"
    missing = [f for f in ORT_WASM_FILES if not (ort_dist() / f).is_file()]
    if missing:
        return f"onnxruntime-web is not installed ({ort_dist() / missing[0]} is missing); run scripts/js_env.sh"
    return None


@cache
def webgpu_unavailable() -> str | None:
    """Why this Chromium offers no WebGPU adapter (``navigator.gpu.requestAdapter()``), or None."""
    reason = unavailable()
    if reason:
        return reason
    missing = [f for f in ORT_FILES if not (ort_dist() / f).is_file()]
    if missing:
        return f"onnxruntime-web's WebGPU build is not installed ({ort_dist() / missing[0]} is missing)"
    try:
        with LocalServer(b"") as server, Browser(server.url) as browser:
            adapter = browser.evaluate("() => harness.adapterInfo()")
    except (MnistDeployError, OSError) as exc:
        return f"cannot ask Chromium for a WebGPU adapter: {first_line(exc)}"
    if adapter is None:
        return "headless Chromium offers no WebGPU adapter here (navigator.gpu.requestAdapter() returned null)"
    if adapter.get("fallback") and not os.environ.get(WEBGPU_FALLBACK_ENV):
        name = " ".join(str(adapter.get(k) or "") for k in ("vendor", "architecture")).strip() or "software"
        return (f"Chromium offers only a software fallback WebGPU adapter here ({name}), not a GPU; "
                f"{WEBGPU_FALLBACK_ENV}=1 runs on it anyway")
    return None


# ---------------------------------------------------------------------------------------------
# The local server: the harness, ORT-web's files, the model and large batches, cross-origin isolated.


class LocalServer:
    """A threaded HTTP server on 127.0.0.1 (a free port) for one model; ``put(bytes)`` -> a URL to fetch once."""

    def __init__(self, model: bytes) -> None:
        self.model = model
        self.blobs: dict[str, bytes] = {}
        self._ids = itertools.count()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="ort-web-server", daemon=True)
        self._thread.start()

    def put(self, data: bytes) -> str:
        name = f"/batch/{next(self._ids)}"
        self.blobs[name] = data
        return name

    def content(self, path: str) -> bytes | None:
        if path == "/":
            return _PAGE
        if path == "/harness.js":
            return (resources.files("mnist_deploy") / "static" / "harness.js").read_bytes()
        if path == "/model.onnx":
            return self.model
        if path.startswith("/ort/") and path[5:] in ORT_FILES:
            return (ort_dist() / path[5:]).read_bytes()
        return self.blobs.pop(path, None)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _handler(server: LocalServer) -> type:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802  (http.server's name)
            path = self.path.split("?", 1)[0]
            body = server.content(path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", _TYPES.get(Path(path).suffix, "application/octet-stream"
                                                        if path != "/" else _TYPES[".html"]))
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for key, value in ISOLATION.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # quiet
            pass

    return Handler


# ---------------------------------------------------------------------------------------------
# The browser: Playwright's sync API lives on one thread of its own, so any thread may call it.


class Browser:
    """Headless Chromium with the harness page open; ``evaluate`` runs on the browser's own thread."""

    def __init__(self, url: str) -> None:
        self._jobs: queue.Queue = queue.Queue()
        ready: concurrent.futures.Future = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._loop, args=(url, ready), name="ort-web-browser", daemon=True)
        self._thread.start()
        ready.result(timeout=CALL_TIMEOUT_S)

    def _loop(self, url: str, ready: concurrent.futures.Future) -> None:
        try:
            from playwright.sync_api import sync_playwright

            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium(), args=list(CHROMIUM_ARGS), headless=True)
                page = browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda e: errors.append(str(e)))
                page.goto(url + "/")
                page.wait_for_function("() => window.harness !== undefined", timeout=60_000)
                ready.set_result(None)
                self._serve(page, errors)
                browser.close()
        except Exception as exc:  # noqa: BLE001  (Playwright's errors: one line for the caller)
            if not ready.done():
                ready.set_exception(BrowserError(f"headless Chromium: {first_line(exc)}"))

    def _serve(self, page, errors: list[str]) -> None:
        while (job := self._jobs.get()) is not None:
            script, arg, future = job
            try:
                future.set_result(page.evaluate(script, arg))
            except Exception as exc:  # noqa: BLE001
                detail = errors[-1] if errors else first_line(exc)
                future.set_exception(BrowserError(f"onnxruntime-web in Chromium: {first_line(detail)}"))

    def evaluate(self, script: str, arg=None):
        if not self._thread.is_alive():
            raise BrowserError("onnxruntime-web in Chromium: the browser has gone")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._jobs.put((script, arg, future))
        return future.result(timeout=CALL_TIMEOUT_S)

    def close(self) -> None:
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join(timeout=30)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# The predictor.


class WebPredictor(Predictor):
    """The ONNX file in an ORT-web ``InferenceSession`` inside headless Chromium."""

    def __init__(self, path: Path, runtime: str, ep: str = "wasm", threads: int = 0) -> None:
        self.runtime = runtime
        self.device = "cpu"
        self._server = LocalServer(Path(path).read_bytes())
        try:
            self._browser = Browser(self._server.url)
            info = self._browser.evaluate("(args) => harness.init(args)", {"ep": ep, "threads": threads})
        except BaseException:
            self._server.close()
            if getattr(self, "_browser", None) is not None:
                self._browser.close()
            raise
        used = info["numThreads"]
        self.details = {
            "precision": "f32", "execution_provider": ep, "threads_requested": threads, "threads": used,
            "cross_origin_isolated": info["crossOriginIsolated"], "ort_web": info["ort_web"],
            "timer_resolution_us": round(info["timer_resolution_us"], 3),
            "hardware_concurrency": info["hardware_concurrency"], "browser": info["user_agent"],
            "performance_mode": f"{ep}, {used} thread{'s' if used != 1 else ''}"
                                f"{', cross-origin isolated' if info['crossOriginIsolated'] else ''}",
            "webgpu_adapter": info.get("webgpu_adapter"),
            "timed_by": "the page (performance.now() around session.run)",
        }

    def _source(self, x: np.ndarray) -> dict:
        data = np.ascontiguousarray(x, dtype="<f4").tobytes()
        if len(data) <= INLINE_BYTES:
            return {"b64": base64.b64encode(data).decode("ascii")}
        return {"url": self._server.put(data)}

    def prepare(self, x: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(x, dtype=np.float32)

    def run(self, prepared: np.ndarray) -> np.ndarray:
        out = self._browser.evaluate("([src, shape]) => harness.run(src, shape)",
                                     [self._source(prepared), list(prepared.shape)])
        return _logits(out)

    def finish(self, out: np.ndarray) -> np.ndarray:
        return out

    def run_batches(self, x: np.ndarray, batch: int) -> np.ndarray:
        """Logits of ``x`` run ``batch`` images per session.run, all in one trip to the page (parity's hook)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = self._browser.evaluate("([src, shape, b]) => harness.runEach(src, shape, b)",
                                     [self._source(x), list(x.shape), int(batch)])
        return _logits(out)

    def time_calls(self, prepared: np.ndarray, *, warmup: int, min_time: float, min_calls: int,
                   sync=None) -> np.ndarray:
        """Per-call ns timed by the page: performance.now() around each session.run (5 us steps when
        cross-origin isolated)."""
        script = "([src, shape, w, t, n]) => harness.time(src, shape, w, t, n)"
        ms = self._browser.evaluate(script, [self._source(prepared), list(prepared.shape), warmup,
                                             min_time * 1000.0, min_calls])
        return np.round(np.asarray(ms, dtype=np.float64) * 1e6).astype(np.int64)

    def close(self) -> None:
        browser, self._browser = getattr(self, "_browser", None), None
        if browser is not None:
            browser.close()
            self._server.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001  (interpreter shutdown)
            pass


def _logits(out: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(out["b64"]), dtype="<f4").reshape(out["dims"]).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The entries: byte-for-byte copies of the ONNX file proved in the same run.


def _loader(ep: str, runtime: str, one_thread: bool = False):
    def load(path: Path, *, device: str, threads: int | None, manifest: dict) -> Predictor:
        refuse_external_data(path)
        return WebPredictor(path, runtime, ep, 1 if one_thread else (threads or 0))

    return load


def _available(device: str) -> str | None:
    return unavailable()


def _webgpu_available(device: str) -> str | None:
    return webgpu_unavailable()


def _entry(name: str, file: str, ep: str, description: str, available, one_thread: bool = False) -> Format:
    return Format(name, name, description, files=(file,), load=_loader(ep, name, one_thread), export=copy_or_export("onnx", _write_onnx_fp32),
                  options=OnnxOptions, devices=("cpu",), available=available,
                  packages=(*ONNX_PACKAGES, "playwright"), check=_verify_onnx, copy_of="onnx")


ORT_WEB = _entry("onnxruntime-web", "mnist_model_web.onnx", "wasm",
                 "The ONNX file run by onnxruntime-web (WASM, threads) in headless Chromium", _available)
ORT_WEB_1T = _entry("onnxruntime-web-1t", "mnist_model_web_1t.onnx", "wasm",
                    "The ONNX file run by onnxruntime-web (WASM, one thread) in headless Chromium", _available,
                    one_thread=True)
ORT_WEB_WEBGPU = _entry("onnxruntime-web-webgpu", "mnist_model_webgpu.onnx", "webgpu",
                        "The ONNX file run by onnxruntime-web on WebGPU in headless Chromium", _webgpu_available)

__all__ = ["ORT_FILES", "ORT_WASM_FILES", "ORT_WEB", "ORT_WEB_1T", "ORT_WEB_WEBGPU", "BrowserError", "Browser", "LocalServer",
           "WebPredictor", "chromium", "ort_dist", "unavailable", "webgpu_unavailable"]
