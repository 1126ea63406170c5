"""What the drawing page needs to run the model in the browser: the ONNX file and ORT-web's WASM build.

Both are served by this server (``/model.onnx`` and ``/static/ort/<file>``, a fixed list of files), never
by a CDN. The ONNX file is the manifest's ``onnx`` entry, read once at startup after its sha256 matched;
``/model`` carries that sha256 under ``browser``, and the page checks the bytes it fetched against it
(``crypto.subtle.digest``) before it uses them. Where either is missing, ``browser.unavailable`` says
why, and the page's switch is disabled with that reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MnistDeployError

MODEL_URL = "/model.onnx"
ORT_URL = "/static/ort/"
ORT_MODULE = "ort.wasm.min.mjs"
ORT_TYPES = {".mjs": "text/javascript; charset=utf-8", ".wasm": "application/wasm"}
# Cross-origin isolation: SharedArrayBuffer, so ORT-web may use WASM threads in the page.
ISOLATION_HEADERS = {"cross-origin-opener-policy": "same-origin", "cross-origin-embedder-policy": "require-corp"}


@dataclass
class InBrowser:
    """The bytes the page fetches for in-browser inference, or why there are none."""

    model: bytes | None = None
    sha256: str | None = None
    ort: dict[str, bytes] = field(default_factory=dict)
    unavailable: str | None = None

    def info(self) -> dict:
        """``/model``'s ``browser`` field."""
        if self.unavailable:
            return {"unavailable": self.unavailable}
        return {"model_url": MODEL_URL, "sha256": self.sha256, "size_bytes": len(self.model or b""),
                "ort_module": ORT_URL + ORT_MODULE, "ort_path": ORT_URL}


def load_in_browser(folder: str | Path, manifest: dict) -> InBrowser:
    """The ``onnx`` artifact of ``folder`` (sha256-checked) and ORT-web's files, or the reason they cannot be served."""
    from ..formats import artifact_path, get_format
    from ..formats.js_web import ORT_WASM_FILES, ort_dist

    missing = [f for f in ORT_WASM_FILES if not (ort_dist() / f).is_file()]
    if missing:
        return InBrowser(unavailable=f"onnxruntime-web is not installed on the server ({ort_dist() / missing[0]} "
                                     "is missing; run scripts/js_env.sh)")
    try:
        path = artifact_path(manifest, "onnx", folder, advice=" to run the model in the browser")
        model = path.read_bytes()
    except (MnistDeployError, OSError) as exc:
        return InBrowser(unavailable=f"no ONNX model to send to the browser: {exc}")
    entry = manifest["artifacts"][get_format("onnx").key]
    ort = {name: (ort_dist() / name).read_bytes() for name in ORT_WASM_FILES}
    return InBrowser(model=model, sha256=entry["sha256"], ort=ort)


__all__ = ["ISOLATION_HEADERS", "MODEL_URL", "ORT_TYPES", "ORT_URL", "InBrowser", "load_in_browser"]
